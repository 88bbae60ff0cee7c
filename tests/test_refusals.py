"""Bad input to the newer commands is refused in one line naming the key, value or file, before any work.

Each case is what a new user typed (issue 22's list): the command exits with status 2, prints one line
``perta <command>: error: ...`` holding the expected words, and leaves no output folder behind (no stage
started).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from perta_lightning.cli import main

ROOT = Path(__file__).resolve().parents[1]


def refused(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([str(arg) for arg in argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"perta {argv[0]}: error: "), err
    return err


STUDY_CASES = {
    "negative beta": ("--candidates", "[{statistic: grad, beta: -1}]", "beta (β, the weight of the retain importance) must be >= 0, got -1.0"),
    "level 0": ("--search.levels", "[0, 0.1]", "search.levels must lie in (0, 1]"),
    "level 1.5": ("--search.levels", "[0.1, 1.5]", "got [1.5]"),
    "level 2": ("--search.levels", "[2]", "got [2.0]"),
    "repeated test seed": ("--test_seeds", "[0, 1, 1]", "test_seeds: seed(s) [1] given more than once"),
    "repeated validation seed": ("--validation_seeds", "[5, 5]", "validation_seeds: seed(s) [5] given more than once"),
    "negative seed": ("--test_seeds", "[-1, 2]", "test_seeds: seeds must be >= 0, got [-1]"),
    "no candidates": ("--candidates", "[]", "candidates: [] leaves nothing to run"),
}


@pytest.mark.parametrize("case", list(STUDY_CASES))
def test_study_options(case, capsys, tmp_path):
    key, value, expected = STUDY_CASES[case]
    out = tmp_path / "study"
    err = refused(["study", "--config", ROOT / "configs/demo/study.yaml", "--output", out, key, value], capsys)
    assert expected in err
    assert not out.exists()


PIPELINE_CASES = {
    "negative beta": ("--variants", "[{statistic: fisher, beta: -1}]", "must be >= 0, got -1.0"),
    "no variants": ("--variants", "[]", "variants: [] leaves nothing to run"),
    "negative seed": ("--seed", "-1", "seed: seeds must be >= 0, got [-1]"),
    "level 0": ("--search.levels", "[0]", "search.levels must lie in (0, 1]"),
}


@pytest.mark.parametrize("case", list(PIPELINE_CASES))
def test_pipeline_options(case, capsys, tmp_path):
    key, value, expected = PIPELINE_CASES[case]
    out = tmp_path / "pipeline"
    err = refused(["pipeline", "--config", ROOT / "configs/demo/pipeline.yaml", "--output", out, key, value], capsys)
    assert expected in err
    assert not out.exists()


def test_a_negative_beta_in_a_study_yaml(capsys, tmp_path):
    config = tmp_path / "study.yaml"
    config.write_text(f"output: {tmp_path / 'study'}\npreset: tiny\ncandidates:\n  - {{statistic: grad, beta: -1}}\n")
    assert "must be >= 0, got -1.0" in refused(["study", "--config", config], capsys)
    assert not (tmp_path / "study").exists()


@pytest.mark.parametrize("command", ["synthetic", "muse-synthetic"])
def test_data_into_an_existing_folder(command, capsys, tmp_path):
    """The README's first by-hand line, run twice."""
    out = tmp_path / "data"
    out.mkdir()
    (out / "mine.txt").write_text("kept")
    err = refused(["data", command, "--output", out], capsys)
    assert f"{out} already exists; pass overwrite to replace it" in err
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]


@pytest.mark.parametrize("command", ["synthetic", "muse-synthetic"])
def test_data_with_a_vocabulary_too_small(command, capsys, tmp_path):
    err = refused(["data", command, "--output", tmp_path / "data", "--tokenizer_vocab_size", "5"], capsys)
    assert "tokenizer_vocab_size must be at least 261" in err and "got 5" in err
    assert not (tmp_path / "data").exists()


def test_evaluating_a_model_folder_that_does_not_exist(capsys, tmp_path, tiny_benchmark):
    missing = tmp_path / "runs/demo/models/nothere"
    err = refused(["test", "--config", ROOT / "configs/demo/eval.yaml", "--model.model", missing,
                   "--model.output_json", tmp_path / "eval.json", "--data.source.path", tiny_benchmark], capsys)
    assert f"{missing}: no such model directory" in err
    assert not (tmp_path / "eval.json").exists()


def test_compare_refuses_files_that_are_not_study_results(capsys, tmp_path):
    evaluation = tmp_path / "eval.json"
    evaluation.write_text(json.dumps({"format": "perta-tofu-eval/1", "aggregates": {}, "settings": {}}))
    err = refused(["compare", evaluation, evaluation], capsys)
    assert f"{evaluation}: not a study result" in err


def replication(folder: Path, module: str = "perta_lightning") -> subprocess.CompletedProcess:
    """``perta replication FOLDER`` (or, with ``module``, ``python -m <module> FOLDER``)."""
    command = [sys.executable, "-m", module, *(["replication"] if module == "perta_lightning" else []), str(folder)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_replication_table_of_a_folder_that_holds_no_study(tmp_path):
    empty, missing, other = tmp_path / "empty", tmp_path / "missing", tmp_path / "other"
    empty.mkdir()
    other.mkdir()
    (other / "study.json").write_text(json.dumps({"rows": []}))
    for folder, expected in ((empty, "no study result here"), (missing, "no study result here"),
                             (other, "not a study result")):
        run = replication(folder)
        assert run.returncode == 2, run.stderr
        assert run.stderr.count("\n") == 1 and expected in run.stderr, run.stderr
        assert not (folder / "REPLICATION.md").exists()


def test_a_config_naming_a_moved_class_is_refused_naming_the_new_path(capsys, tmp_path, tiny_benchmark):
    """configs written before the benchmarks had their own folders name ``perta_lightning.evaluate.TofuEvaluator``."""
    old = (ROOT / "configs/demo/eval.yaml").read_text().replace(
        "perta_lightning.benchmarks.tofu.evaluator.TofuEvaluator", "perta_lightning.evaluate.TofuEvaluator")
    config = tmp_path / "old_eval.yaml"
    config.write_text(old)
    err = refused(["test", "--config", config, "--data.source.path", tiny_benchmark], capsys)
    assert (f"{config}: class_path perta_lightning.evaluate.TofuEvaluator has moved to "
            "perta_lightning.benchmarks.tofu.evaluator.TofuEvaluator") in err


def test_the_old_replication_module_names_the_command_that_replaced_it(tmp_path):
    run = replication(tmp_path, module="perta_lightning.replication")
    assert run.returncode == 2 and "perta replication STUDY_DIR" in run.stderr and run.stderr.count("\n") == 1
