"""``perta study`` and ``perta pipeline`` with ``benchmark: muse`` on the tiny preset: one validation and one test
seed, every reported figure read back from the evaluation files, the stages trained on MUSE's corpora."""

import json
from pathlib import Path

import pytest

from perta_lightning.benchmarks.muse.summary import summarize_muse
from perta_lightning.errors import PertaValueError
from perta_lightning.functional.tradeoff import CurvePoint, is_collapsed, utility_at_level
from perta_lightning.study.options import AlphaSearch, PertaVariant, RunOptions
from perta_lightning.study.pipeline import pipeline
from perta_lightning.study.study import study

SEARCH = AlphaSearch(levels=[0.9, 0.98, 1.0], initial=[1.0, 4.0], rounds=1)
RUN = RunOptions(benchmark="muse", preset="muse_tiny", baselines=["grad_diff"], search=SEARCH)
OPTIONS = dict(validation_seeds=[11], test_seeds=[12],
               candidates=[PertaVariant("grad"), PertaVariant("fisher", beta=16.0)], jobs=1)


@pytest.fixture(scope="module")
def muse_study(tmp_path_factory) -> Path:
    return study(RUN, output=str(tmp_path_factory.mktemp("muse_study") / "run"), **OPTIONS)


def _report(folder: Path, seed: int) -> dict:
    return json.loads((folder / "test" / f"seed_{seed}" / "forget" / "report.json").read_text())


def test_rows_are_the_muse_summaries_of_their_evaluations(muse_study):
    seed_dir = muse_study / "test" / "seed_12"
    report = _report(muse_study, 12)
    reference = seed_dir / "forget" / "eval" / "retain.json"
    methods = {row["method"] for row in report["rows"]}
    assert {"retain", "target", "grad_diff", "tv"} <= methods and len(methods) == 6  # and the two chosen variants
    for row in report["rows"]:
        summary = summarize_muse(seed_dir / row["eval_file"], reference)
        assert row["forget_score"] == summary["forget_score"]  # the benchmark's own axis names
        assert row["knowmem_retain"] == summary["knowmem_retain"]
        assert "forget_quality" not in row and "model_utility" not in row
        assert (row["verbmem_forget"], row["privleak"]) == (summary["verbmem_forget"], summary["privleak"])
    target = next(row for row in report["rows"] if row["method"] == "target")
    for method, values in report["matched"].items():
        points = [CurvePoint(0.0, target["forget_score"], target["knowmem_retain"])] + [
            CurvePoint(r["alpha"], r["forget_score"], r["knowmem_retain"],
                       is_collapsed(r["knowmem_retain"], target["knowmem_retain"]))
            for r in report["rows"] if r["method"] == method]
        expected = [utility_at_level(points, level) for level in SEARCH.levels]
        assert values == [None if p is None else p.model_utility for p in expected], method


def test_models_are_trained_on_muses_corpora(muse_study):
    records = [json.loads(f.read_text()) for f in (muse_study / "test" / "seed_12" / "stages").rglob("*.json")]
    by_name = {record["name"]: record["settings"] for record in records}
    assert by_name["models/base"]["splits"] == ["pretrain/background"]
    assert by_name["models/full"]["splits"] == ["raw/forget", "raw/retain1", "raw/retain2"]
    assert by_name["forget/models/retain"]["splits"] == ["raw/retain1", "raw/retain2"]
    assert by_name["forget/models/reinforced"]["splits"] == ["raw/forget"]
    unlearn = by_name["forget/models/grad_diff"]
    assert (unlearn["forget"], unlearn["retain"]) == ("raw/forget", "raw/retain1")
    importance = [v for k, v in by_name.items() if k.startswith("forget/importance/")]
    assert importance and all((v["forget"], v["retain"]) == ("raw/forget", "raw/retain1") for v in importance)
    trained = ["models/base", "models/full", "forget/models/retain", "forget/models/reinforced", "forget/models/grad_diff"]
    assert all(by_name[name]["max_length"] == 128 for name in trained)  # the preset's context: raw text is chunked to it
    assert all(v["max_length"] == 128 for v in importance)


def test_study_and_replication_speak_of_muses_axes(muse_study):
    result = json.loads((muse_study / "study.json").read_text())
    assert result["settings"]["benchmark"] == "muse" and result["settings"]["forget_splits"] == ["forget"]
    markdown = (muse_study / "study.md").read_text()
    assert "KnowMem on D_r at matched forget score" in markdown and "FQ ≥" not in markdown
    table = json.loads((muse_study / "replication.json").read_text())
    assert table["benchmark"] == "muse"
    assert {row["quantity"] for row in table["rows"] if row["rule"] != "cost"} == {"ΔKnowMem_r at matched F"}
    assert "MUSE has one forget corpus" in next(c for c in table["claims"] if c["claim"] == "4")["note"]
    assert "on the synthetic MUSE news corpus" in (muse_study / "REPLICATION.md").read_text()


def test_a_second_run_of_the_seed_builds_nothing(muse_study, capsys):
    """The test seed is an ordinary pipeline run: calling ``perta pipeline`` on its folder with the study's chosen
    settings finds every stage's record still holding."""
    result = json.loads((muse_study / "study.json").read_text())
    chosen = [c for c in result["validation"]["candidates"] if c["label"] in result["validation"]["chosen"].values()]
    variants = [PertaVariant(**{k: v for k, v in c.items() if k != "label"}) for c in chosen]
    before = _report(muse_study, 12)
    capsys.readouterr()
    pipeline(RUN, output=str(muse_study / "test" / "seed_12"), seed=12, variants=variants)
    out = capsys.readouterr().out
    assert "up to date, skipped" in out and "done in" not in out
    def key(row):
        return row["method"], -1.0 if row["alpha"] is None else row["alpha"]

    assert sorted(_report(muse_study, 12)["rows"], key=key) == sorted(before["rows"], key=key)


@pytest.mark.parametrize("options, message", [
    (dict(benchmark="muse", forget_splits=["forget10"]), "no forget_splits="),
    (dict(benchmark="tofu", muse_source={"path": "x"}), "set benchmark: muse"),
    (dict(benchmark="muse", muse_source={"hub": "muse-bench/MUSE-News"}), "needs base_model="),
])
def test_mixed_up_benchmark_options_are_refused(tmp_path, options, message):
    from perta_lightning.benchmarks.muse.source import MuseSource

    if "muse_source" in options:
        options["muse_source"] = MuseSource(**options["muse_source"])
    with pytest.raises(PertaValueError, match=message):
        pipeline(RunOptions(preset="muse_tiny", **options), output=str(tmp_path / "run"))
