"""Evaluation through ``perta`` as a user meets it: one-line errors naming the file, valid JSON, named sets."""

import inspect
import json
import shutil
from pathlib import Path

import pytest
import yaml

from perta_lightning.benchmarks.tofu.evaluator import DEFAULT_MAX_NEW_TOKENS, TofuEvaluator, evaluate_model
from perta_lightning.cli import main
from tests.tiny import make_tiny_setup

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo" / "eval.yaml"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_setup(tmp_path_factory.mktemp("tiny"))


def _one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"perta {command}: error: ")
    return err[0]


def _our_file(path: Path, ratios: list[float]) -> Path:
    path.write_text(json.dumps({"format": "perta-tofu-eval/1", "aggregates": {"mia_min_k_auc": None},
                                "examples": {"forget": {"truth_ratio": ratios, "question": [f"q{i}" for i in range(len(ratios))]}}}))
    return path


def test_summarize_writes_null_not_nan(tmp_path, capsys):
    ckpt = _our_file(tmp_path / "ckpt.json", [float("nan"), 1.0, 2.0])
    retain = _our_file(tmp_path / "retain.json", [0.5, 1.0, 2.0])
    main(["summarize", "--ckpt_result", str(ckpt), "--retain_result", str(retain)])

    def refuse(constant):
        raise AssertionError(f"invalid JSON constant {constant}")

    printed = json.loads(capsys.readouterr().out, parse_constant=refuse)
    assert printed["forget_quality"] is None and printed["ks_statistic"] is None
    assert any("NaN" in note and str(ckpt) in note for note in printed["notes"])


@pytest.mark.parametrize("content", ["", '{"format": "perta-tofu-eval/1", "aggre'])
def test_summarize_on_empty_or_truncated_json_is_one_line(tmp_path, capsys, content):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    good = _our_file(tmp_path / "good.json", [0.5, 1.0])
    with pytest.raises(SystemExit) as exit_info:
        main(["summarize", "--ckpt_result", str(bad), "--retain_result", str(good)])
    assert exit_info.value.code == 2
    assert str(bad) in _one_error_line(capsys, "summarize")


def _test_args(tmp_path, data, model, *extra):
    return ["test", "--config", str(CONFIG), f"--trainer.default_root_dir={tmp_path}",
            f"--model.init_args.model={model}", f"--model.init_args.output_json={tmp_path / 'eval.json'}",
            "--model.init_args.max_new_tokens=4", f"--data.init_args.source.path={data}",
            "--data.init_args.max_examples=3", *extra]


def test_forget_split_as_retain_split_is_refused(tiny, tmp_path, capsys):
    data, model = tiny
    with pytest.raises(SystemExit) as exit_info:
        main(_test_args(tmp_path, data, model, "--data.init_args.retain_split=forget10_perturbed"))
    assert exit_info.value.code == 2
    line = _one_error_line(capsys, "test")
    assert "forget_split" in line and "retain_split" in line and "'forget10_perturbed'" in line


def test_model_directory_without_tokenizer_is_one_line(tiny, tmp_path, capsys):
    data, model = tiny
    bare = tmp_path / "bare"
    bare.mkdir()
    for file in Path(model).iterdir():
        if not file.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(file, bare / file.name)
    with pytest.raises(SystemExit) as exit_info:
        main(_test_args(tmp_path, data, bare))
    assert exit_info.value.code == 2
    line = _one_error_line(capsys, "test")
    assert str(bare) in line and "no tokenizer files" in line


def test_one_documented_max_new_tokens_default():
    """200, open-unlearning's TOFU generation length, in the class and the function; the demo config sets its
    own smaller value explicitly."""
    assert DEFAULT_MAX_NEW_TOKENS == 200
    assert inspect.signature(TofuEvaluator).parameters["max_new_tokens"].default == DEFAULT_MAX_NEW_TOKENS
    assert inspect.signature(evaluate_model).parameters["max_new_tokens"].default == DEFAULT_MAX_NEW_TOKENS
    assert yaml.safe_load(CONFIG.read_text())["model"]["init_args"]["max_new_tokens"] == 64


def test_results_table_names_each_set(tiny, tmp_path):
    """Each dataloader's column of Lightning's results holds only the scores named by its own set."""
    from lightning.pytorch import Trainer

    from perta_lightning.benchmarks.tofu.evaluation import TofuEvalDataModule
    from perta_lightning.benchmarks.tofu.source import TofuSource
    from perta_lightning.data.formatting import PromptFormat

    data, model = tiny
    datamodule = TofuEvalDataModule(TofuSource(path=str(data)), PromptFormat(tokenizer=str(model)), max_examples=3,
                                    batch_size=3)
    trainer = Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False)
    results = trainer.test(TofuEvaluator(str(model), max_new_tokens=4), datamodule=datamodule, verbose=False)
    across = {"model_utility", "forget_quality", "ks_statistic", "privleak"}
    names = list(datamodule.sets)
    assert names == ["forget", "retain", "real_authors", "world_facts", "holdout"]
    for name, result in zip(names, results):
        own = {key.split("/dataloader_idx_")[0] for key in result} - across
        expected = {"mia_min_k_auc"} if name == "holdout" else {f"{name}_{m}" for m in ("probability", "rouge", "truth_ratio")}
        if name in ("forget", "retain"):
            expected.add(f"{name}_extraction_strength")
        assert own == expected, name


def test_generations_are_stripped(tiny):
    """Generated text is stored and scored without surrounding white space, as open-unlearning's."""
    from perta_lightning.benchmarks.evaluator import generation_text
    from perta_lightning.data.formatting import load_tokenizer

    tokenizer = load_tokenizer(str(tiny[1]))
    ids = tokenizer.encode(" the answer\n", add_special_tokens=False)
    raw = tokenizer.decode(ids, skip_special_tokens=True)
    assert raw != raw.strip()  # the case is not vacuous: this tokenizer keeps the white space
    assert generation_text(tokenizer, ids + [-1, -1]) == raw.strip()
