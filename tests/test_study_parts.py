"""``perta study`` in parts: seeds run in several invocations (here, on two "machines": two output folders sharing
only the parts folder), aggregated from the part files alone, to the study one invocation writes.

One real study (one validation seed, two test seeds, a cut-down tiny preset) runs once for the module; the
invocations in parts start from copies of its seed folders, so their stages are skipped (resumed) and each
invocation's work is the parts' own: writing, reading, checking and aggregating.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from perta_lightning.errors import PertaValueError
from perta_lightning.study.options import AlphaSearch, PertaVariant, RunOptions
from perta_lightning.study.parts import PART_FORMAT, settings_digest
from perta_lightning.study.study import study

PRESET_OVERRIDES = {"num_authors": 10, "pretrain_epochs": 2, "finetune_epochs": 3, "reinforce_epochs": 1,
                    "unlearn_epochs": 1, "eval_max_new_tokens": 4}
RUN = RunOptions(preset="tiny", preset_overrides=PRESET_OVERRIDES, baselines=["grad_diff"],
                 search=AlphaSearch(rounds=1))
CANDIDATES = [PertaVariant("fisher"), PertaVariant("fisher", beta=16.0)]
OPTIONS = dict(validation_seeds=[7], test_seeds=[0, 1], candidates=CANDIDATES)
#: The same study as a config, as a user writes it.
CONFIG = {"preset": "tiny", "preset_overrides": PRESET_OVERRIDES, "baselines": ["grad_diff"], "search": {"rounds": 1},
          "validation_seeds": [7], "test_seeds": [0, 1],
          "candidates": [{"statistic": "fisher", "beta": 1.0}, {"statistic": "fisher", "beta": 16.0}]}
REPO = Path(__file__).resolve().parents[1]
PERTA = Path(sys.executable).with_name("perta")  # the console script the package installs beside python
ENV = {**os.environ, "PYTHONPATH": str(REPO)}  # this checkout's package, wherever the script was installed from
#: What differs between two runs of the same study by its nature: this invocation's time, its machine, the parts.
MACHINE_KEYS = ("invocation", "machine", "parts")


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> Path:
    """The study in one invocation, without parts."""
    return study(RUN, output=str(tmp_path_factory.mktemp("whole") / "run"), **OPTIONS)


@pytest.fixture(scope="module")
def in_parts(whole, tmp_path_factory) -> dict[str, object]:
    """The same study in two invocations: the validation seed and test seed 0 on one machine, test seed 1 on
    another (as ``perta study --parts --run_seeds`` from the command line) that has neither seed 7's nor seed 0's
    folder, only their part files."""
    root = tmp_path_factory.mktemp("in_parts")
    parts, first, second = root / "parts", root / "first", root / "second"
    shutil.copytree(whole / "validation", first / "validation")
    shutil.copytree(whole / "test" / "seed_0", first / "test" / "seed_0")
    shutil.copytree(whole / "test" / "seed_1", second / "test" / "seed_1")
    first_out = _in_process(first, parts, [7, 0])
    config = root / "study.yaml"
    config.write_text(json.dumps(CONFIG | {"output": str(second)}))  # JSON is YAML
    command = [str(PERTA), "study", "--config", str(config), "--parts", str(parts), "--run_seeds", "[1]"]
    second_run = subprocess.run(command, capture_output=True, text=True, timeout=600, env=ENV)
    assert second_run.returncode == 0, second_run.stdout[-3000:] + second_run.stderr[-3000:]
    return {"parts": parts, "first": first, "second": second, "first_out": first_out,
            "second_out": second_run.stdout}


def _in_process(output: Path, parts: Path, run_seeds: list[int], run: RunOptions = RUN) -> str:
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        study(run, output=str(output), parts=str(parts), run_seeds=run_seeds, **OPTIONS)
    return buffer.getvalue()


def _without_machine(result: dict) -> dict:
    return {key: value for key, value in result.items() if key not in MACHINE_KEYS}


def test_a_study_in_parts_aggregates_to_the_study_in_one_invocation(whole, in_parts):
    parts, second = in_parts["parts"], in_parts["second"]
    assert sorted(p.name for p in parts.iterdir()) == ["test_seed_0.json", "test_seed_1.json",
                                                       "validation_seed_7.json"]
    # the second machine ran seed 1 only: the choice and seed 0 came from the parts
    assert not (second / "validation").exists() and not (second / "test" / "seed_0").exists()
    one, split = (json.loads((folder / "study.json").read_text()) for folder in (whole, second))
    assert _without_machine(split) == _without_machine(one)
    assert split["test"]["splits"]["forget10"]["tv"]["per_seed"].keys() == {"0", "1"}
    assert (second / "study.md").read_text() == (whole / "study.md").read_text()
    table_one, table_split = (json.loads((folder / "replication.json").read_text()) for folder in (whole, second))
    for table in (table_one, table_split):
        for key in ("wall_seconds", "peak_rss_gib"):  # this invocation's process's, as study.json's
            table["invocation"].pop(key)
    assert table_split == table_one
    markdown_one, markdown_split = ([line for line in (folder / "REPLICATION.md").read_text().splitlines()
                                     if not line.startswith("Produced on")] for folder in (whole, second))
    assert markdown_split == markdown_one
    assert (second / "study.png").read_bytes()[:4] == b"\x89PNG"
    # study.json says which machine ran which seed, and on what
    record = split["parts"]
    assert record["folder"] == str(parts)
    assert set(record["validation"]) == {"7"} and set(record["test"]) == {"0", "1"}
    for seed in ("0", "1"):
        entry = record["test"][seed]
        assert entry["machine"]["aten_cpu_capability"] and entry["versions"]["torch"]
        assert entry["wall_seconds"] > 0 and entry["stage_seconds"] > 0
    assert one["parts"]["folder"] is None and set(one["parts"]["test"]) == {"0", "1"}
    # the stage seconds of the study are those of its seeds, however they were run
    assert split["invocation"]["stage_seconds"] == pytest.approx(one["invocation"]["stage_seconds"])


def test_a_part_file_holds_what_the_aggregate_reads(in_parts):
    part = json.loads((in_parts["parts"] / "test_seed_1.json").read_text())
    assert part["format"] == PART_FORMAT and part["phase"] == "test" and part["seed"] == 1
    assert part["settings_digest"] == settings_digest(part["settings"])
    assert part["settings"]["choice"]["families"]["perta_fisher"] in {c.label for c in CANDIDATES}
    split = part["splits"][0]
    assert split["forget_split"] == "forget10" and split["forget_examples"] > 0
    assert {r["method"] for r in split["rows"]} >= {"retain", "target", "tv", "grad_diff"}
    assert set(split["costs"]) == {r["method"] for r in split["rows"] if r["family"] != "reference"}
    assert set(split["search_evaluations"]) == set(split["costs"])
    assert not any(split["search_screens"].values())  # no screening here; a screened search's counts travel too
    assert split["diagnostic"]["seed"] == 1
    assert all(not Path(w["forget"]).is_absolute() for w in split["weights"].values())
    assert part["commit"] is None or len(part["commit"].split("+")[0]) == 40
    assert len(json.dumps(part)) < 200_000  # small enough to commit


def test_an_invocation_leaving_seeds_missing_writes_no_aggregate_and_names_them(in_parts, tmp_path):
    assert not (in_parts["first"] / "study.json").exists()
    assert "1 of 2 test seeds are in" in in_parts["first_out"] and "run seeds [1] (run_seeds" in in_parts["first_out"]
    assert "test seed 0: part written to" in in_parts["first_out"]
    assert "[perta study]" in in_parts["second_out"] and "study.md" in in_parts["second_out"]
    # a validation seed missing: no test seed runs, even one run_seeds names
    out = _in_process(tmp_path / "run", tmp_path / "parts", [0])
    assert "0 of 1 validation seeds are in" in out and "run seeds [7]" in out and "no test seed ran" in out
    assert not (tmp_path / "run").exists() and not (tmp_path / "run" / "study.json").exists()


def test_a_part_made_under_other_settings_is_refused_naming_the_file_and_key(in_parts, tmp_path):
    parts = tmp_path / "parts"
    shutil.copytree(in_parts["parts"], parts)
    other = RunOptions(preset="tiny", preset_overrides=PRESET_OVERRIDES, baselines=["grad_diff"],
                       search=AlphaSearch(rounds=2))
    with pytest.raises(PertaValueError) as error:
        _in_process(tmp_path / "run", parts, [], other)
    message = str(error.value)
    assert str(parts / "validation_seed_7.json") in message and "run.search.rounds" in message
    assert "\n" not in message
    # a test part whose choice differs from the one the validation part makes is refused too
    test_part = json.loads((parts / "test_seed_0.json").read_text())
    test_part["settings"]["choice"]["families"]["perta_fisher"] = "someone_else"
    test_part["settings_digest"] = settings_digest(test_part["settings"])
    (parts / "test_seed_0.json").write_text(json.dumps(test_part))
    with pytest.raises(PertaValueError, match=r"test_seed_0\.json: .*choice\.families\.perta_fisher"):
        _in_process(tmp_path / "run", parts, [])
    # an unreadable part names its file
    (parts / "validation_seed_7.json").write_text('{"format": "perta-study-part/1", "ph')
    with pytest.raises(PertaValueError, match=r"validation_seed_7\.json: cannot read the study part"):
        _in_process(tmp_path / "run", parts, [])


def test_run_seeds_naming_a_seed_not_in_the_study_is_refused_before_any_stage(tmp_path):
    with pytest.raises(PertaValueError, match=r"^run_seeds: \[5\] are not seeds of this study"):
        study(RUN, output=str(tmp_path / "run"), parts=str(tmp_path / "parts"), run_seeds=[0, 5], **OPTIONS)
    assert not (tmp_path / "run").exists() and not (tmp_path / "parts").exists()
    config = tmp_path / "study.yaml"
    config.write_text(json.dumps(CONFIG | {"output": str(tmp_path / "run")}))
    refused = subprocess.run([str(PERTA), "study", "--config", str(config), "--run_seeds", "[3]"],
                             capture_output=True, text=True, timeout=300, env=ENV)
    assert refused.returncode != 0 and "run_seeds: [3] are not seeds of this study" in refused.stderr
    assert not (tmp_path / "run").exists()
