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

from perta_lightning.functional.tradeoff import CurvePoint, utility_area
from perta_lightning.stages import RECORD_DIR
from perta_lightning.study.options import AlphaSearch, BaselineVariant, PertaVariant, RunOptions
from perta_lightning.study.study import study

REPO = Path(__file__).resolve().parents[1]
CANDIDATES = [PertaVariant("fisher"), PertaVariant("fisher", beta=16.0)]
PROPOSED = [PertaVariant("fisher", transform="excess")]
SEARCH = AlphaSearch(rounds=2)
RUN = RunOptions(preset="tiny", baselines=["grad_diff"], search=SEARCH)
BASELINE_CANDIDATES = [BaselineVariant("grad_diff"), BaselineVariant("grad_diff", lr=2e-3)]
OPTIONS = dict(validation_seeds=[7], test_seeds=[0, 1], candidates=CANDIDATES, proposed=PROPOSED,
               importance_at_base=True, baseline_candidates=BASELINE_CANDIDATES)


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory) -> Path:
    return study(RUN, output=str(tmp_path_factory.mktemp("study") / "run"), **OPTIONS)


def _without_seconds(report: dict) -> dict:
    for row in report["rows"]:
        row.pop("unlearn_seconds")
    for cost in report.pop("costs").values():  # the counts stay; seconds are the machine's
        assert cost["seconds"] > 0
    return report


def test_the_choice_is_made_on_validation_seeds_only(tiny_study):
    result = json.loads((tiny_study / "study.json").read_text())
    assert result["validation"]["seeds"] == [7] and result["test"]["seeds"] == [0, 1]
    report = json.loads((tiny_study / "validation" / "seed_7" / "forget10" / "report.json").read_text())
    assert result["validation"]["score_rule"] == "area"
    # recompute each candidate's score from the validation seed's evaluated models
    levels = result["settings"]["levels"]
    scores = {}
    for candidate in CANDIDATES + PROPOSED:
        target = next(r for r in report["rows"] if r["method"] == "target")
        points = [CurvePoint(0.0, target["forget_quality"], target["model_utility"])]
        points += [CurvePoint(r["alpha"], r["forget_quality"], r["model_utility"], r["collapsed"])
                   for r in report["rows"] if r["method"] == candidate.label]
        scores[candidate.label] = utility_area(points, min(levels), max(levels))  # the default score
        assert result["validation"]["scores"][candidate.label]["mean"] == pytest.approx(scores[candidate.label])
    best = max(CANDIDATES, key=lambda c: scores[c.label])
    assert result["validation"]["chosen"] == {"fisher": best.label}
    # the baseline's learning rate is chosen on the same seeds by the same score, from its curve's points
    for baseline in BASELINE_CANDIDATES:
        target = next(r for r in report["rows"] if r["method"] == "target")
        points = [CurvePoint(0.0, target["forget_quality"], target["model_utility"])]
        points += [CurvePoint(r["alpha"], r["forget_quality"], r["model_utility"], r["collapsed"])
                   for r in report["rows"] if r["method"] == baseline.label]
        scores[baseline.label] = utility_area(points, min(levels), max(levels))
        assert result["validation"]["scores"][baseline.label]["mean"] == pytest.approx(scores[baseline.label])
    chosen_baseline = max(BASELINE_CANDIDATES, key=lambda b: scores[b.label])
    assert result["validation"]["baselines_chosen"] == {"grad_diff": chosen_baseline.label}
    # the proposed variant goes to the test seeds only if it beats the chosen candidate on validation
    accepted = scores[PROPOSED[0].label] > scores[best.label]
    assert result["validation"]["proposed"][0]["accepted"] is accepted
    # one validation seed: every resample of it makes the same choice
    assert result["validation"]["stability"] == {
        "fisher": {c.label: float(c == best) for c in CANDIDATES},
        "grad_diff": {b.label: float(b == chosen_baseline) for b in BASELINE_CANDIDATES}}
    assert "How stable the choice is" in (tiny_study / "study.md").read_text()
    test_report = json.loads((tiny_study / "test" / "seed_0" / "forget10" / "report.json").read_text())
    expected = {"retain", "target", chosen_baseline.label, "tv", best.label, best.at("base").label}
    assert {r["method"] for r in test_report["rows"]} == expected | ({PROPOSED[0].label} if accepted else set())
    assert not (tiny_study / "test" / "seed_7").exists()


def _exact_stability(per_split, labels):
    """The naive twin of choice_stability: every ordered resample of the seeds, each as likely as the others."""
    import itertools

    seeds = sorted(next(iter(per_split.values())))
    wins = dict.fromkeys(labels, 0)
    draws = list(itertools.product(seeds, repeat=len(seeds)))
    for drawn in draws:
        score = {label: sum(sum(by_seed[s][label] for s in drawn) / len(drawn) for by_seed in per_split.values())
                 for label in labels}
        best = labels[0]
        for label in labels[1:]:
            best = label if score[label] > score[best] else best
        wins[best] += 1
    return {label: count / len(draws) for label, count in wins.items()}


def test_choice_stability_against_every_resample():
    from perta_lightning.study.study import choice_stability

    # by hand: x wins on seed 1 (1 vs 0), y on seed 2 (0.5 vs 0); resamples {1,1} → x, {2,2} → y, {1,2} (twice as
    # likely) → x (0.5 vs 0.25): x 3/4, y 1/4
    one = {"a": {1: {"x": 1.0, "y": 0.0}, 2: {"x": 0.0, "y": 0.5}}}
    shares = choice_stability(one, {"g": ["x", "y"]}, resamples=4000)
    assert shares["g"] == pytest.approx({"x": 0.75, "y": 0.25}, abs=0.03)
    assert _exact_stability(one, ["x", "y"]) == {"x": 0.75, "y": 0.25}
    # ties go to the first listed, as the choice itself
    assert choice_stability({"a": {1: {"x": 0.5, "y": 0.5}}}, {"g": ["x", "y"]}, resamples=50)["g"] == {"x": 1, "y": 0}
    # three seeds, two splits scored on the same resample, three labels
    two = {"a": {1: {"x": 0.9, "y": 0.1, "z": 0.5}, 2: {"x": 0.1, "y": 0.7, "z": 0.4},
                 3: {"x": 0.3, "y": 0.2, "z": 0.45}},
           "b": {1: {"x": 0.2, "y": 0.9, "z": 0.5}, 2: {"x": 0.8, "y": 0.1, "z": 0.5},
                 3: {"x": 0.6, "y": 0.6, "z": 0.5}}}
    exact = _exact_stability(two, ["x", "y", "z"])
    assert sorted(exact.values())[-1] < 1  # a contested choice
    assert choice_stability(two, {"g": ["x", "y", "z"]}, resamples=4000)["g"] == pytest.approx(exact, abs=0.03)


def test_the_aggregate_is_finite_and_follows_the_seeds(tiny_study):
    result = json.loads((tiny_study / "study.json").read_text())
    families = result["test"]["splits"]["forget10"]
    proposed = {f"proposed_{PROPOSED[0].label}"} if result["validation"]["proposed"][0]["accepted"] else set()
    assert set(families) == {"tv", "perta_fisher", "perta_fisher_at_base", "grad_diff"} | proposed
    assert families["grad_diff"]["label"] == result["validation"]["baselines_chosen"]["grad_diff"]
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
    study(RUN, output=os.path.relpath(tiny_study), **OPTIONS)
    assert {p: p.stat().st_mtime_ns for p in tiny_study.rglob(f"{RECORD_DIR}/**/*.json")} == records
    assert "done in" not in capsys.readouterr().out


def test_a_damaged_artifact_reruns_its_stage_and_what_depends_on_it(tiny_study, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_study, copy)
    seed = copy / "test" / "seed_1"
    (seed / "forget10" / "models" / "reinforced" / "model.safetensors").unlink()
    evaluation = seed / "forget10" / "eval" / "target.json"
    evaluation.write_text(evaluation.read_text()[:100])  # truncated
    study(RUN, output=str(copy), **OPTIONS)
    out = capsys.readouterr().out
    assert "running again: forget10/models/reinforced/model.safetensors is missing" in out
    assert "forget10/eval/target.json has" in out
    rerun, clean = (json.loads((folder / "study.json").read_text()) for folder in (copy, tiny_study))
    for result in (rerun, clean):
        result.pop("invocation")  # this invocation's time and memory
        result.pop("parts")  # each seed's wall and stage seconds in this invocation
        for families in result["test"]["splits"].values():
            for data in families.values():
                data.pop("costs")  # wall seconds of the rebuilt stages
    assert rerun == clean
    for seed_name in ("seed_0", "seed_1"):
        path = Path("test") / seed_name / "forget10" / "report.json"
        assert _without_seconds(json.loads((copy / path).read_text())) == \
            _without_seconds(json.loads((tiny_study / path).read_text()))


def test_a_killed_run_resumes_to_the_uninterrupted_report(tiny_study, tmp_path):
    """Kill a pipeline of test seed 0 mid-way (SIGKILL at its importance stage), resume: the same report."""
    run = tmp_path / "killed"
    config = tmp_path / "pipeline.yaml"
    validation = json.loads((tiny_study / "study.json").read_text())["validation"]
    variant = next(c for c in CANDIDATES if c.label == validation["chosen"]["fisher"])
    # the test seeds' variants: the chosen one, its twin with importance at θ0, and the accepted proposals
    variants = [variant, variant.at("base")] + [v for v, decision in zip(PROPOSED, validation["proposed"])
                                                 if decision["accepted"]]
    config.write_text(json.dumps({
        "output": str(run), "preset": "tiny", "seed": 0,
        "variants": [{"statistic": v.statistic, "beta": v.beta, "importance_at": v.importance_at,
                      "transform": v.transform} for v in variants],
        "baselines": [next({k: v for k, v in b.items() if k != "label"} for b in validation["baseline_candidates"]
                           if b["label"] == validation["baselines_chosen"]["grad_diff"])],
        "search": {"rounds": SEARCH.rounds}}))
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
    assert "claim 1: not resolved" in outputs


def test_the_replication_table_follows_the_study(tiny_study):
    """REPLICATION.md and replication.json: the claims' per-seed values are the study's paired differences,
    the costs those of the stage records, and two test seeds resolve nothing."""
    from perta_lightning.stages import StageRecord

    result = json.loads((tiny_study / "study.json").read_text())
    table = json.loads((tiny_study / "replication.json").read_text())
    assert [c["claim"] for c in table["claims"]] == ["1", "2", "3", "4", "5"]
    assert all(c["verdict"] == "not resolved" for c in table["claims"])  # 2 seeds < min_seeds; 5: no attacks ran
    assert "ran no attacks" in table["claims"][4]["note"] and not table["recovery"]
    families = result["test"]["splits"]["forget10"]
    row = next(r for r in table["rows"] if r["claim"] == "1" and r["b"] == "tv")
    for seed in ("0", "1"):
        pairs = [a - b for a, b in zip(families["perta_fisher"]["per_seed"][seed], families["tv"]["per_seed"][seed])
                 if a is not None and b is not None]
        if pairs:
            assert row["per_seed"][seed] == pytest.approx(sum(pairs) / len(pairs))
    # claim 2 pairs the chosen variant with itself at θ0
    assert next(r for r in table["rows"] if r["claim"] == "2")["a"] == "perta_fisher_at_base"
    # claim 3: the cost is the sum of the stage records the method needed
    cost_row = next(r for r in table["rows"] if r["claim"] == "3" and not r["informative_only"])
    root = tiny_study / "test" / "seed_0"
    report = json.loads((root / "forget10" / "report.json").read_text())
    label = families["perta_fisher"]["label"]
    names = ["forget10/models/reinforced", *{str(Path(r["model_dir"]).parent) if "/alpha_" in r["model_dir"]
                                             else r["model_dir"] for r in report["rows"] if r["method"] == label},
             *[r["eval_file"].removesuffix(".json") for r in report["rows"] if r["method"] == label],
             str(Path(report["importance"][label]["forget"]).parent),
             *report["search_stages"][label]]  # its merges and screenings (a round may have no row)
    seconds = sum(StageRecord.load(root / RECORD_DIR / f"{name}.json").seconds for name in dict.fromkeys(names))
    # a baseline: its training run and the evaluation of every point of its curve
    baseline_label = families["grad_diff"]["label"]
    baseline = sum(StageRecord.load(root / RECORD_DIR / f"{name}.json").seconds for name in
                   [f"forget10/models/{baseline_label}", *(f"forget10/eval/{baseline_label}/epoch_{k}" for k in (1, 2))])
    assert cost_row["per_seed"]["0"] == pytest.approx(seconds / baseline)
    assert report["costs"][label]["backward"] > 0 and report["costs"][baseline_label]["backward"] > 0
    # what the numbers rest on: the machine, and the digest of every evaluated model
    assert result["machine"]["torch"] and result["machine"]["aten_cpu_capability"]
    from perta_lightning.provenance import model_digest

    digests = result["models"]["test"]["0"]["forget10"]
    assert len(digests) == len(report["rows"])
    assert digests[0]["model_digest"] == model_digest(root / report["rows"][0]["model_dir"])
    markdown = (tiny_study / "REPLICATION.md").read_text()
    assert "| **1. PerTA-grad and PerTA-fisher improve on TV" in markdown and "## The rules" in markdown
    diagnostic = json.loads((root / "forget10" / "diagnostic.json").read_text())
    assert set(diagnostic["variants"]) == set(report["importance"])
    assert 0 < diagnostic["variants"][label]["kept_share"] <= 1


def test_a_baseline_is_judged_on_its_curve(tiny_study):
    """Each baseline is trained once and evaluated after each epoch; the matched table takes the best of those
    points (and the target's) at each level, exactly as for an α search, and counts its evaluations."""
    result = json.loads((tiny_study / "study.json").read_text())
    levels = result["settings"]["levels"]
    label = result["validation"]["baselines_chosen"]["grad_diff"]
    for seed in ("0", "1"):
        report = json.loads((tiny_study / "test" / f"seed_{seed}" / "forget10" / "report.json").read_text())
        target = next(r for r in report["rows"] if r["method"] == "target")
        points = [r for r in report["rows"] if r["method"] == label]
        assert [r["alpha"] for r in sorted(points, key=lambda r: r["alpha"])] == [1.0, 2.0]  # epochs of tiny
        assert report["search_evaluations"][label] == 2
        assert {r["model_dir"] for r in points} == {f"forget10/models/{label}/epoch_{k}" for k in (1, 2)}
        for level, value in zip(levels, report["matched"][label]):
            reaching = [r["model_utility"] for r in [target, *points]
                        if r["forget_quality"] >= level and not r.get("collapsed")]
            assert value == (max(reaching) if reaching else None), (seed, level)
        assert result["test"]["splits"]["forget10"]["grad_diff"]["evaluations"][seed] == 2
        cost = report["costs"][label]
        assert cost["evaluations"] == 2 and cost["stages"] == 3  # one training run, two evaluations


def test_the_levels_rule_is_kept_and_an_unknown_rule_refused():
    """``validation_score: levels`` scores by the mean utility at the levels (a level not reached counting 0);
    any other name is refused before a stage runs."""
    from perta_lightning.study.split_report import SplitReport
    from perta_lightning.study.study import validation_scores

    rows = [{"method": "target", "family": "reference", "alpha": None, "forget_quality": 0.01, "model_utility": 0.6,
             "collapsed": False},
            {"method": "x", "family": "perta_fisher", "alpha": 1.0, "forget_quality": 0.2, "model_utility": 0.5,
             "collapsed": False}]
    report = SplitReport("forget10", rows, {"x": [0.5, None]}, {}, {}, {})
    assert validation_scores({0: report}, ["x"], "levels") == {"x": 0.25}
    from perta_lightning.benchmarks.registry import benchmark

    axes = benchmark("tofu").axes
    area = validation_scores({0: report}, ["x"], "area", [0.1, 0.3], axes)["x"]
    assert area == pytest.approx(0.5 * math.log(2) / math.log(3))  # U = 0.5 from 0.1 to 0.2, 0 above
    with pytest.raises(ValueError, match="validation_score must be one of"):
        study(RUN, output="/nonexistent/never", validation_score="best", **OPTIONS)
