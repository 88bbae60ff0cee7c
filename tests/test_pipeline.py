"""The tiny preset end to end: report structure and ranges, resume, and the analysis notebook."""

import json
import math
import os
from pathlib import Path

import pytest

from perta_lightning.pipeline import STAGE_FILE, pipeline

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    return pipeline(output=str(tmp_path_factory.mktemp("pipeline") / "run"), preset="tiny")


def test_report_rows_are_real_and_in_range(tiny_run):
    report = json.loads((tiny_run / "report.json").read_text())
    rows = report["rows"]
    methods = {row["method"] for row in rows}
    assert {"retain", "target", "tv", "perta_grad", "perta_fisher", "grad_ascent", "grad_diff", "npo"} <= methods
    for row in rows:
        assert Path(row["eval_file"]).is_file() and Path(row["eval_file"]).is_relative_to(tiny_run)
        evaluation = json.loads(Path(row["eval_file"]).read_text())
        assert evaluation["aggregates"]["model_utility"] == pytest.approx(row["model_utility"])
        for key in ("forget_quality", "model_utility", "forget_rouge", "forget_truth_ratio", "extraction_strength"):
            assert math.isfinite(row[key]) and 0.0 <= row[key] <= 1.0, (row["method"], key, row[key])
        if row["method"] not in ("retain", "target"):
            assert row["unlearn_seconds"] > 0
    retain = next(row for row in rows if row["method"] == "retain")
    assert retain["forget_quality"] == pytest.approx(1.0)
    alphas = sorted(row["alpha"] for row in rows if row["method"] == "tv")
    assert alphas == sorted(report["settings"]["alphas"])
    table = (tiny_run / "report.md").read_text()
    assert table.count("\n| ") == len(rows) + 1
    for picture in ("tradeoff.png", "weights.png"):
        assert (tiny_run / picture).read_bytes()[:4] == b"\x89PNG"


def test_rerun_skips_every_stage(tiny_run, capsys):
    before = {path: path.stat().st_mtime_ns for path in tiny_run.rglob(STAGE_FILE)}
    pipeline(output=str(tiny_run), preset="tiny")
    assert {path: path.stat().st_mtime_ns for path in tiny_run.rglob(STAGE_FILE)} == before
    assert "running" not in capsys.readouterr().out


def test_adding_importance_at_theta0_runs_only_the_new_stages(tiny_run, capsys):
    before = {path: path.stat().st_mtime_ns for path in tiny_run.rglob(STAGE_FILE)}
    pipeline(output=str(tiny_run), preset="tiny", importance_at=["full", "base"])
    after = {path: path.stat().st_mtime_ns for path in tiny_run.rglob(STAGE_FILE)}
    assert all(after[path] == stamp for path, stamp in before.items())  # nothing already done was redone
    new = {path.parent.relative_to(tiny_run).as_posix() for path in after.keys() - before.keys()}
    assert {"importance/at_base/grad", "importance/at_base/fisher", "models/perta_grad_at_base"} <= new
    assert all("at_base" in name for name in new)
    rows = json.loads((tiny_run / "report.json").read_text())["rows"]
    alphas = set(json.loads((tiny_run / "report.json").read_text())["settings"]["alphas"])
    assert {row["alpha"] for row in rows if row["method"] == "perta_fisher_at_base"} == alphas
    assert "## Importance at θ_full against importance at θ0" in (tiny_run / "report.md").read_text()


def test_notebook_executes_on_the_run(tiny_run):
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(REPO / "notebooks" / "perta_analysis.ipynb", as_version=4)
    os.environ["PERTA_RUN"] = str(tiny_run)
    try:
        NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    finally:
        del os.environ["PERTA_RUN"]
    outputs = "".join(str(output) for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs)
    assert "rows from" in outputs and "mean w" in outputs
