"""The multi-seed study on the tiny preset: held-out choice, the aggregate, resume, damage, the notebook.

One study (one validation seed, two test seeds) is run once for the module; each test reads or extends it.
"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from perta_lightning.functional.tradeoff import CurvePoint, utilities_at_levels
from perta_lightning.stages import RECORD_DIR
from perta_lightning.study import study
from perta_lightning.study_types import AlphaSearch, PertaVariant

REPO = Path(__file__).resolve().parents[1]
CANDIDATES = [PertaVariant("fisher"), PertaVariant("fisher", beta=16.0)]
SEARCH = AlphaSearch(rounds=2)
OPTIONS = dict(preset="tiny", validation_seeds=[7], test_seeds=[0, 1], candidates=CANDIDATES,
               baselines=["grad_diff"], search=SEARCH)


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory) -> Path:
    return study(output=str(tmp_path_factory.mktemp("study") / "run"), **OPTIONS)


def _without_seconds(report: dict) -> dict:
    for row in report["rows"]:
        row.pop("unlearn_seconds")
    return report


def test_the_choice_is_made_on_validation_seeds_only(tiny_study):
    result = json.loads((tiny_study / "study.json").read_text())
    assert result["validation"]["seeds"] == [7] and result["test"]["seeds"] == [0, 1]
    report = json.loads((tiny_study / "validation" / "seed_7" / "forget10" / "report.json").read_text())
    # recompute each candidate's score from the validation seed's evaluated models
    levels = result["settings"]["levels"]
    scores = {}
    for candidate in CANDIDATES:
        target = next(r for r in report["rows"] if r["method"] == "target")
        points = [CurvePoint(0.0, target["forget_quality"], target["model_utility"])]
        points += [CurvePoint(r["alpha"], r["forget_quality"], r["model_utility"], r["collapsed"])
                   for r in report["rows"] if r["method"] == candidate.label]
        values = utilities_at_levels(points, levels)
        scores[candidate.label] = sum(v or 0.0 for v in values) / len(values)
        assert result["validation"]["scores"][candidate.label]["mean"] == pytest.approx(scores[candidate.label])
    best = max(CANDIDATES, key=lambda c: scores[c.label]).label
    assert result["validation"]["chosen"] == {"fisher": best}
    test_report = json.loads((tiny_study / "test" / "seed_0" / "forget10" / "report.json").read_text())
    assert {r["method"] for r in test_report["rows"]} == {"retain", "target", "grad_diff", "tv", best}
    assert not (tiny_study / "test" / "seed_7").exists()


def test_the_aggregate_is_finite_and_follows_the_seeds(tiny_study):
    result = json.loads((tiny_study / "study.json").read_text())
    families = result["test"]["splits"]["forget10"]
    assert set(families) == {"tv", "perta_fisher", "grad_diff"}
    for family, data in families.items():
        for index, stat in enumerate(data["at_levels"]):
            values = [data["per_seed"][seed][index] for seed in ("0", "1")]
            present = [v for v in values if v is not None]
            assert stat["n"] == len(present) and stat["n_total"] == 2
            if present:
                assert math.isfinite(stat["mean"]) and stat["mean"] == pytest.approx(sum(present) / len(present))
        if family != "tv":
            for index, difference in enumerate(data["vs_tv"]):
                pairs = [(data["per_seed"][s][index], families["tv"]["per_seed"][s][index]) for s in ("0", "1")]
                both = [a - b for a, b in pairs if a is not None and b is not None]
                assert difference["n"] == len(both)
    markdown = (tiny_study / "study.md").read_text()
    assert "test seeds" in markdown and "[0, 1]" in markdown
    assert (tiny_study / "study.png").read_bytes()[:4] == b"\x89PNG"


def test_every_row_is_read_back_from_its_evaluation(tiny_study):
    report = json.loads((tiny_study / "test" / "seed_1" / "forget10" / "report.json").read_text())
    root = tiny_study / "test" / "seed_1"
    tv_rows = [r for r in report["rows"] if r["method"] == "tv"]
    assert report["search_evaluations"]["tv"] == len(tv_rows) >= len(SEARCH.initial)
    for row in report["rows"]:
        evaluation = json.loads((root / row["eval_file"]).read_text())
        assert evaluation["aggregates"]["model_utility"] == pytest.approx(row["model_utility"])
    assert (root / "forget10" / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"


def test_a_rerun_skips_every_stage_even_from_another_spelling_of_the_path(tiny_study, capsys, monkeypatch):
    records = {p: p.stat().st_mtime_ns for p in tiny_study.rglob(f"{RECORD_DIR}/**/*.json")}
    monkeypatch.chdir(tiny_study.parent)
    study(output=os.path.relpath(tiny_study), **OPTIONS)
    assert {p: p.stat().st_mtime_ns for p in tiny_study.rglob(f"{RECORD_DIR}/**/*.json")} == records
    assert "done in" not in capsys.readouterr().out


def test_a_damaged_artifact_reruns_its_stage_and_what_depends_on_it(tiny_study, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_study, copy)
    seed = copy / "test" / "seed_1"
    (seed / "forget10" / "models" / "reinforced" / "model.safetensors").unlink()
    evaluation = seed / "forget10" / "eval" / "target.json"
    evaluation.write_text(evaluation.read_text()[:100])  # truncated
    study(output=str(copy), **OPTIONS)
    out = capsys.readouterr().out
    assert "running again: forget10/models/reinforced/model.safetensors is missing" in out
    assert "forget10/eval/target.json has" in out
    for name in ("study.json",):
        assert json.loads((copy / name).read_text()) == json.loads((tiny_study / name).read_text())
    for seed_name in ("seed_0", "seed_1"):
        path = Path("test") / seed_name / "forget10" / "report.json"
        assert _without_seconds(json.loads((copy / path).read_text())) == \
            _without_seconds(json.loads((tiny_study / path).read_text()))


def test_a_killed_run_resumes_to_the_uninterrupted_report(tiny_study, tmp_path):
    """Kill a pipeline of test seed 0 mid-way (SIGKILL at its importance stage), resume: the same report."""
    run = tmp_path / "killed"
    config = tmp_path / "pipeline.yaml"
    chosen = json.loads((tiny_study / "study.json").read_text())["validation"]["chosen"]["fisher"]
    variant = next(c for c in CANDIDATES if c.label == chosen)
    config.write_text(json.dumps({
        "output": str(run), "preset": "tiny", "seed": 0, "variants": [{"statistic": "fisher", "beta": variant.beta}],
        "baselines": ["grad_diff"], "search": {"rounds": SEARCH.rounds}}))
    command = [sys.executable, "-m", "perta_lightning", "pipeline", "--config", str(config)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed = False
    for line in process.stdout:
        if "importance/" in line and "[stage" in line:
            process.send_signal(signal.SIGKILL)
            killed = True
            break
    process.wait(timeout=120)
    assert killed and process.returncode == -signal.SIGKILL
    assert not (run / "forget10" / "report.json").exists()
    resumed = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "up to date, skipped" in resumed.stdout
    # progress a person can watch: a line per stage, and no carriage-return bars when not on a terminal
    assert "[stage 1/" in resumed.stdout and "forget10/models/reinforced: reinforce θ_full" in resumed.stdout
    assert "\r" not in resumed.stdout and "GPU available" not in resumed.stdout
    report = _without_seconds(json.loads((run / "forget10" / "report.json").read_text()))
    clean = _without_seconds(json.loads((tiny_study / "test" / "seed_0" / "forget10" / "report.json").read_text()))
    assert report["rows"] == clean["rows"]
    assert report["matched"] == clean["matched"]


def test_analysis_notebook_reads_one_seed(tiny_study):
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(REPO / "notebooks" / "perta_analysis.ipynb", as_version=4)
    os.environ["PERTA_RUN"] = str(tiny_study / "test" / "seed_0" / "forget10")
    try:
        NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    finally:
        del os.environ["PERTA_RUN"]
    outputs = "".join(str(output) for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs)
    assert "rows from" in outputs and "mean w" in outputs


def test_notebook_reads_the_study(tiny_study):
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(REPO / "notebooks" / "perta_study.ipynb", as_version=4)
    os.environ["PERTA_STUDY"] = str(tiny_study)
    try:
        NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    finally:
        del os.environ["PERTA_STUDY"]
    outputs = "".join(str(output) for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs)
    assert "test seeds [0, 1]" in outputs and "paired difference" in outputs
