"""The evaluator on a tiny random Llama: batched equals a naive loop, 2 processes equal 1, clear errors."""

import json
import shutil
import sys
from pathlib import Path

import pytest

from perta_lightning.benchmarks.tofu.evaluator import evaluate_model
from perta_lightning.benchmarks.tofu.source import TofuSource
from perta_lightning.benchmarks.tofu.summary import summarize

sys.path.insert(0, str(Path(__file__).parent))
from naive_eval import naive_evaluate  # noqa: E402

from tests.tiny import make_tiny_setup  # noqa: E402

SPLITS = {"forget": "forget10_perturbed", "retain": "retain_perturbed", "real_authors": "real_authors_perturbed",
          "world_facts": "world_facts_perturbed", "holdout": "holdout10"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    data, model = make_tiny_setup(root)
    batched = root / "eval.json"
    evaluate_model(str(model), TofuSource(path=str(data)), output_json=str(batched), max_examples=5, batch_size=3,
                   max_new_tokens=8, accelerator="cpu")
    return root, data, model, json.loads(batched.read_text())


def test_batched_equals_naive_loop(tiny):
    root, data, model, batched = tiny
    naive = naive_evaluate(str(model), TofuSource(path=str(data)), SPLITS, max_new_tokens=8, max_examples=5)
    for name, columns in naive["examples"].items():
        ours = batched["examples"][name]
        assert ours["index"] == list(range(5))
        for key, values in columns.items():
            if not values or (key not in ours and name != "forget"):
                continue  # the naive loop computes extraction strength and Min-K% everywhere
            if key == "generation":
                assert ours[key] == values, name
            else:
                flat = [x for v in values for x in (v if isinstance(v, list) else [v])]
                flat_ours = [x for v in ours[key] for x in (v if isinstance(v, list) else [v])]
                assert flat_ours == pytest.approx(flat, abs=1e-5), (name, key)
    for key, value in naive["aggregates"].items():
        assert batched["aggregates"][key] == pytest.approx(value, abs=1e-5), key


def test_json_layout_and_self_reference(tiny, tmp_path):
    root, data, model, batched = tiny
    assert batched["format"] == "perta-tofu-eval/1"
    for key in ("forget_quality", "model_utility", "privleak", "mia_min_k_auc", "forget_extraction_strength"):
        assert key in batched["aggregates"]
    summary = summarize(root / "eval.json", root / "eval.json")
    assert summary["forget_quality"] == 1.0 and summary["privleak"] == pytest.approx(0.0)
    # evaluating against itself as the retain reference fills Forget Quality and PrivLeak in the file
    out = tmp_path / "with_ref.json"
    result = evaluate_model(str(model), TofuSource(path=str(data)), output_json=str(out), retain_result=str(root / "eval.json"),
                            max_examples=5, batch_size=5, max_new_tokens=8, accelerator="cpu",
                            retain_split=None, real_authors_split=None, world_facts_split=None)
    assert result["aggregates"]["forget_quality"] == 1.0
    assert result["aggregates"]["privleak"] == pytest.approx(0.0)
    assert result["aggregates"]["model_utility"] is None  # utility sets were skipped
    assert json.loads(out.read_text())["aggregates"] == result["aggregates"]


def test_retain_reference_from_another_forget_split_is_refused(tiny, tmp_path):
    root, data, model, _ = tiny
    common = dict(max_new_tokens=4, accelerator="cpu", retain_split=None, real_authors_split=None,
                  world_facts_split=None, holdout_split=None)
    with pytest.raises(ValueError, match="has 5 examples but"):
        evaluate_model(str(model), TofuSource(path=str(data)), retain_result=str(root / "eval.json"), max_examples=4, **common)
    other = json.loads((root / "eval.json").read_text())
    other["examples"]["forget"]["question"][2] = "Who wrote something else entirely?"
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="forget example 2"):
        evaluate_model(str(model), TofuSource(path=str(data)), retain_result=str(tmp_path / "other.json"), max_examples=5, **common)


def test_model_directory_without_tokenizer_is_refused(tiny, tmp_path):
    _, data, model, _ = tiny
    bare = tmp_path / "bare"
    bare.mkdir()
    for file in Path(model).iterdir():
        if not file.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(file, bare / file.name)
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        evaluate_model(str(bare), TofuSource(path=str(data)), accelerator="cpu")


def test_a_screening_gives_the_full_evaluations_forget_quality(tiny, tmp_path):
    """TOFU's screening (the forget set alone, scored, nothing generated) gives the same forget truth ratios, hence
    the same Forget Quality, as the full evaluation of the same model; MUSE has no screening."""
    from perta_lightning.benchmarks.registry import benchmark
    from perta_lightning.study.options import resolve_preset
    from tests.tiny import write_tiny_model

    root, data, model, _ = tiny
    other = write_tiny_model(tmp_path / "other", data / "tokenizer", seed=1, output_scale=20.0, hidden_size=32,
                             intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                             max_position_embeddings=512, bos_token_id=None)
    tofu, preset, source = benchmark("tofu"), resolve_preset("tiny", {"eval_max_new_tokens": 4}), TofuSource(path=str(data))
    plan = tofu.split_plan("forget10", preset)
    full, screening = tofu.evaluation(plan, preset, True), tofu.screening(plan, preset, True)
    assert screening.settings() != full.settings() and screening.work_key == "screens"
    reference = tmp_path / "retain.json"
    full.run(str(model), source, str(reference), None, "cpu", 1, "float32")
    full.run(str(other), source, str(tmp_path / "full.json"), str(reference), "cpu", 1, "float32")
    screening.run(str(other), source, str(tmp_path / "screen.json"), str(reference), "cpu", 1, "float32")
    evaluated, screened = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("full", "screen"))
    assert screened["splits"] == {"forget": "forget10_perturbed"} and set(screened["examples"]) == {"forget"}
    assert screened["settings"]["generate"] is False and evaluated["settings"]["generate"] is True
    assert "generation" not in screened["examples"]["forget"] and "forget_rouge" not in screened["aggregates"]
    assert screened["aggregates"]["model_utility"] is None
    assert screened["examples"]["forget"]["truth_ratio"] == pytest.approx(
        evaluated["examples"]["forget"]["truth_ratio"], rel=1e-9)
    quality = evaluated["aggregates"]["forget_quality"]
    assert quality is not None and quality < 1.0  # another model: a Forget Quality that says something
    assert screened["aggregates"]["forget_quality"] == pytest.approx(quality, rel=1e-9)
    assert summarize(tmp_path / "screen.json", reference)["forget_quality"] == pytest.approx(
        summarize(tmp_path / "full.json", reference)["forget_quality"], rel=1e-9)
    muse = benchmark("muse")
    assert muse.screening(muse.split_plan("forget", resolve_preset("muse_tiny")), resolve_preset("muse_tiny"), False) is None


def test_drafts_change_no_number(tiny, tmp_path):
    """Decoding one token per pass (the fixture), or from the gold answers, or from another evaluation's
    generations (the fixture's own, so every draft is right): the same generations and per-example values."""
    root, data, model, plain = tiny
    common = dict(max_examples=5, batch_size=3, max_new_tokens=8, accelerator="cpu", answer_drafts=True)
    answers = evaluate_model(str(model), TofuSource(path=str(data)), **common)
    drafted = evaluate_model(str(model), TofuSource(path=str(data)), draft_result=str(root / "eval.json"), **common)
    for name, columns in plain["examples"].items():
        for result in (answers, drafted):
            assert result["examples"][name]["generation" if "generation" in columns else "index"] == \
                columns["generation" if "generation" in columns else "index"], name
            for key in ("answer_nll", "rouge_l_recall", "truth_ratio"):
                if key in columns:
                    assert result["examples"][name][key] == pytest.approx(columns[key], abs=1e-6), (name, key)
    with pytest.raises(ValueError, match="draft_result .*missing.json"):
        evaluate_model(str(model), TofuSource(path=str(data)), draft_result=str(tmp_path / "missing.json"), **common)
