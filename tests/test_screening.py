"""Screening the α search (issue 25): one tiny seed with and without it gives the same matched table and the same
row for every model both evaluated in full, with fewer full evaluations when screening.

Each run goes through the ``perta pipeline`` command, as a user's would. The screened run starts from a copy of the
unscreened one, so it reuses the stages both share (data, models, importance, merges, the evaluations both make)
and runs only its screenings: what it evaluates in full is decided by its own search, not by what the copy holds.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from perta_lightning.stages import StageRecord

#: the default levels. On the tiny preset's seed 0 the target model already reaches them all, so the search stops
#: after its first round; TV's α = 4 falls below the lowest (a model that can never enter the table) and PerTA's
#: stays above it: one screened out, one evaluated in full.
LEVELS = [0.01, 0.05, 0.1, 0.3]


def _pipeline(tmp_path: Path, output: Path, screen: bool) -> dict:
    config = tmp_path / f"pipeline_{'screened' if screen else 'full'}.yaml"
    config.write_text(json.dumps({
        "output": str(output), "preset": "tiny", "seed": 0, "variants": [{"statistic": "fisher"}], "baselines": [],
        "search": {"rounds": 2, "levels": LEVELS, "screen": screen}}))
    command = [sys.executable, "-m", "perta_lightning", "pipeline", "--config", str(config)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return json.loads((output / "forget10" / "report.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, dict, Path, dict]:
    tmp = tmp_path_factory.mktemp("screening")
    full = _pipeline(tmp, tmp / "full", screen=False)
    shutil.copytree(tmp / "full", tmp / "screened")
    return tmp / "full", full, tmp / "screened", _pipeline(tmp, tmp / "screened", screen=True)


def _rows(report: dict) -> dict:
    return {(row["method"], row["alpha"]): {k: v for k, v in row.items() if k != "unlearn_seconds"}
            for row in report["rows"]}


def test_screening_keeps_the_matched_table_with_fewer_full_evaluations(runs):
    full_root, full, screened_root, screened = runs
    assert screened["matched"] == full["matched"]
    full_rows, screened_rows = _rows(full), _rows(screened)
    assert set(screened_rows) <= set(full_rows)
    for key, row in screened_rows.items():  # every model both evaluated in full: the same row
        assert row == full_rows[key], key
    methods = ("tv", "perta_fisher")
    assert full["search_screens"] == dict.fromkeys(methods, 0)
    assert sum(screened["search_evaluations"][m] for m in methods) < sum(full["search_evaluations"][m] for m in methods)
    for method in methods:
        # the same α were searched: each screened once, and those left out of the table fall below every level
        probed = {alpha for (m, alpha) in full_rows if m == method}
        assert screened["search_screens"][method] == len(probed)
        kept = {alpha for (m, alpha) in screened_rows if m == method}
        assert screened["search_evaluations"][method] == len(kept)
        for alpha in probed - kept:
            assert full_rows[(method, alpha)]["forget_quality"] < min(LEVELS), (method, alpha)
        # the search's cost charges its screenings beside its evaluations
        assert screened["costs"][method]["screens"] == len(probed)
        assert screened["costs"][method]["evaluations"] == len(kept)
    assert "screenings" in (screened_root / "forget10" / "report.md").read_text()


def test_a_screening_is_a_cached_stage_keyed_by_its_settings(runs):
    _, _, screened_root, screened = runs
    name = screened["search_stages"]["tv"][1]  # round 0's merge, then its first screening
    assert name == "forget10/screen/tv/alpha_1"
    record = StageRecord.load(screened_root / "stages" / f"{name}.json")
    assert record.settings["sets"] == ["forget"] and record.settings["generate"] is False
    assert record.work == {"screens": 1.0}
    screen = json.loads((screened_root / f"{name}.json").read_text())
    evaluation = json.loads((screened_root / "forget10" / "eval" / "tv" / "alpha_1.json").read_text())
    assert screen["aggregates"]["forget_quality"] == pytest.approx(evaluation["aggregates"]["forget_quality"], rel=1e-9)
