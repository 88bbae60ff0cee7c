"""MuseEvaluator and the MUSE summary: every figure of the evaluation file recomputed from its own per-example
values, batched scoring and generation against one example at a time, and PrivLeak against the retain model."""

import json
import math
from pathlib import Path

import pytest
import torch

from perta_lightning.benchmarks.muse.evaluation import MUSE_EVAL_SETS, knowmem_prompt
from perta_lightning.benchmarks.muse.evaluator import evaluate_muse_model
from perta_lightning.benchmarks.muse.source import MuseSource
from perta_lightning.benchmarks.muse.summary import forget_score, summarize_muse
from perta_lightning.benchmarks.muse.synthetic import MuseSyntheticSpec, write_muse_benchmark
from perta_lightning.errors import PertaValueError
from perta_lightning.functional import muse_metrics as M
from tests.tiny import write_tiny_model

#: transformers 4's clean-up of decoded text (``clean_up_tokenization``), written out for the naive twin.
TRANSFORMERS_4_CLEAN_UP = [(" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                           (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")]
SPEC = MuseSyntheticSpec(num_articles=5, num_retain_articles=5, num_holdout_articles=6, num_background_articles=2,
                         questions_per_article=2, icl_questions=2, seed=3)


@pytest.fixture(scope="module")
def muse_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("muse_eval")
    data = write_muse_benchmark(SPEC, str(root / "data"), tokenizer_vocab_size=300)
    model = write_tiny_model(root / "model", data / "tokenizer", seed=1, output_scale=20.0)
    other = write_tiny_model(root / "other", data / "tokenizer", seed=2, output_scale=20.0)
    source = MuseSource(path=str(data))
    options = dict(batch_size=3, verbmem_max_new_tokens=12, knowmem_max_new_tokens=6, accelerator="cpu")
    reference = evaluate_muse_model(str(other), source, str(root / "retain.json"), **options)
    result = evaluate_muse_model(str(model), source, str(root / "eval.json"), str(root / "retain.json"), **options)
    return dict(root=root, data=data, model=model, source=source, result=result, reference=reference)


def test_evaluator_aggregates_with_the_muse_metric_classes():
    from perta_lightning.benchmarks.muse.evaluator import MuseEvaluator
    from perta_lightning.benchmarks.muse.metrics import KnowMem, MiaAUC, VerbMem

    evaluator = MuseEvaluator("unused-until-setup")
    assert isinstance(evaluator.means["verbmem"], VerbMem) and isinstance(evaluator.means["knowmem_retain"], KnowMem)
    assert isinstance(evaluator.mia, MiaAUC)


def _naive_auc(forget, holdout):
    pairs = [(1.0 if h > f else 0.5 if h == f else 0.0) for f in forget for h in holdout]
    return sum(pairs) / len(pairs)


def test_file_is_what_the_evaluator_returned_and_sets_are_whole(muse_run):
    written = json.loads((muse_run["root"] / "eval.json").read_text())
    assert written == json.loads(json.dumps(muse_run["result"]))
    assert written["format"] == "perta-muse-eval/1"
    for name, (split, _) in MUSE_EVAL_SETS.items():
        assert written["examples"][name]["index"] == list(range(len(muse_run["source"].rows(split)))), name


def test_aggregates_are_the_means_and_the_auc_of_the_examples(muse_run):
    result = muse_run["result"]
    examples, aggregates = result["examples"], result["aggregates"]
    for key, name in (("verbmem_forget", "verbmem"), ("knowmem_forget", "knowmem_forget"),
                      ("knowmem_retain", "knowmem_retain")):
        scores = examples[name]["score"]
        assert aggregates[key] == pytest.approx(sum(scores) / len(scores), abs=1e-12)
    auc = _naive_auc(examples["privleak_forget"]["score"], examples["privleak_holdout"]["score"])
    assert aggregates["mia_auc"] == pytest.approx(auc, abs=1e-12)
    reference = muse_run["reference"]["aggregates"]["mia_auc"]
    expected = ((1 - auc) - (1 - reference)) / (1 - reference + 1e-10) * 100
    assert aggregates["privleak"] == pytest.approx(expected, abs=1e-9)


def test_scores_are_those_of_the_generations_against_the_truth(muse_run):
    examples = muse_run["result"]["examples"]
    verbmem = examples["verbmem"]
    assert verbmem["score"] == pytest.approx(M.verbmem_scores(verbmem["generation"], verbmem["gt"]).tolist(), abs=1e-12)
    for name in ("knowmem_forget", "knowmem_retain"):
        rows = examples[name]
        assert rows["score"] == pytest.approx(M.knowmem_scores(rows["generation"], rows["answer"]).tolist(), abs=1e-12)
        assert not any(stop in text for text in rows["generation"] for stop in ("\n\n", "\nQuestion", "Question:"))


def test_batched_work_equals_one_example_at_a_time(muse_run):
    """Left-padded generation and right-padded MIA scoring in batches of 3 give what one unpadded example gives."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(muse_run["model"])
    model = AutoModelForCausalLM.from_pretrained(muse_run["model"]).eval()
    examples, source = muse_run["result"]["examples"], muse_run["source"]
    icl = source.rows("knowmem/forget_qa_icl")
    for index, row in enumerate(source.rows("knowmem/forget_qa")[:4]):
        ids = torch.tensor([tokenizer(knowmem_prompt(row["question"], icl))["input_ids"]])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)[0, ids.shape[1]:]
        out = out.tolist()
        if tokenizer.eos_token_id in out:
            out = out[: out.index(tokenizer.eos_token_id)]
        # as MUSE's get_rouge_qa.py and open-unlearning's eval_text_similarity: decode with the clean-up of
        # spaces (transformers 4 applied it to BPE tokenizers too), cut at each stop string in turn, strip
        text = tokenizer.decode(out, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        for before, after in TRANSFORMERS_4_CLEAN_UP:
            text = text.replace(before, after)
        for stop in ("\n\n", "\nQuestion", "Question:"):
            text = text.split(stop)[0]
        assert examples["knowmem_forget"]["generation"][index] == text.strip(), index
    for index, row in enumerate(source.rows("privleak/holdout")):
        ids = torch.tensor([tokenizer(row["text"])["input_ids"][:256]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        single = M.min_k_text_score(logits, ids, 0.4).item()
        assert examples["privleak_holdout"]["score"][index] == pytest.approx(single, abs=1e-5), index


def test_summary_forget_score_and_privleak_of_the_retain_model(muse_run):
    root = muse_run["root"]
    summary = summarize_muse(root / "eval.json", root / "retain.json")
    a, r = muse_run["result"]["aggregates"], muse_run["reference"]["aggregates"]
    excess = max(a["verbmem_forget"] - r["verbmem_forget"], a["knowmem_forget"] - r["knowmem_forget"])
    assert summary["forget_score"] == pytest.approx(1 - max(0.0, excess))
    assert summary["privleak"] == pytest.approx(a["privleak"])
    itself = summarize_muse(root / "retain.json", root / "retain.json")
    assert itself["privleak"] == pytest.approx(0.0, abs=1e-6) and itself["forget_score"] == 1.0


def test_knowmem_answers_end_at_open_unlearnings_stop_strings():
    from functools import partial

    from perta_lightning.benchmarks.evaluator import cut_at_stop
    from perta_lightning.benchmarks.muse.evaluator import KNOWMEM_STOP

    cut_at_stop = partial(cut_at_stop, stops=KNOWMEM_STOP)

    assert cut_at_stop(" 62\n\nQuestion: How old") == "62"
    assert cut_at_stop("Ana Paper\nQuestion: x") == "Ana Paper"
    assert cut_at_stop("a new\nlibrary Question: y") == "a new\nlibrary"  # a single line break is kept, as there
    assert cut_at_stop("nothing to cut ") == "nothing to cut"
    # cut, then strip, as the references: an answer that opens with a blank line is empty (stripping first, as
    # this project did before, scored "62" here)
    assert cut_at_stop("\n\n62\n\nQuestion: How old") == ""


def test_generations_are_cleaned_up_as_transformers_4_decoded_them(muse_run):
    """MUSE and open-unlearning decode with ``clean_up_tokenization_spaces=True``, which transformers 5 ignores
    for BPE tokenizers; the scored text is the clean-up transformers 4 applied."""
    from transformers import AutoTokenizer

    from perta_lightning.benchmarks.evaluator import clean_up_tokenization_spaces, reference_generation_text

    tokenizer = AutoTokenizer.from_pretrained(muse_run["model"])
    ids = tokenizer("I do n't know , Ana 's book .\n\nQuestion: x", add_special_tokens=False)["input_ids"]
    assert reference_generation_text(tokenizer, ids + [-1, -1], ("\n\n",)) == "I don't know, Ana's book."
    assert reference_generation_text(tokenizer, ids) == "I don't know, Ana's book.\n\nQuestion: x"
    every = " . ? ! , ' x do n't I 'm it 's we 've you 're"
    assert clean_up_tokenization_spaces(every) == ".?!,'x don't I'm it's we've you're"
    if hasattr(tokenizer, "clean_up_tokenization"):  # transformers' own, where its release has it
        assert clean_up_tokenization_spaces(every) == tokenizer.clean_up_tokenization(every)


def test_knowledge_prompt_ends_with_muses_cue_unless_asked_otherwise(muse_run):
    from perta_lightning.benchmarks.muse.benchmark import MuseBenchmark
    from perta_lightning.benchmarks.muse.evaluation import MuseEvalDataModule
    from perta_lightning.study.options import PRESETS

    row = {"question": "Who?", "answer": "Ana"}
    assert knowmem_prompt("When?", [row]) == "Question: Who?\nAnswer: Ana\n\nQuestion: When?\nAnswer: "
    assert knowmem_prompt("When?", answer_cue="Answer:") == "Question: When?\nAnswer:"
    settings = muse_run["result"]["settings"]
    assert settings["answer_cue"] == "Answer: " and settings["text"].startswith("decode, clean up")
    with pytest.raises(PertaValueError, match="answer_cue"):
        MuseEvalDataModule(muse_run["source"], answer_cue=" ")
    # a pretrained model on MUSE's own data is asked as MUSE asks; a model trained from scratch on the synthetic
    # corpus, in the format its fact boxes taught it
    bench, preset = MuseBenchmark(), next(iter(PRESETS.values()))
    plan = bench.split_plan("forget", preset)
    assert bench.evaluation(plan, preset, pretrained=True).answer_cue == "Answer: "
    assert bench.evaluation(plan, preset, pretrained=False).answer_cue == "Answer:"


def test_forget_score_by_hand():
    retain = {"verbmem_forget": 0.2, "knowmem_forget": 0.1}
    assert forget_score({"verbmem_forget": 0.5, "knowmem_forget": 0.2}, retain) == pytest.approx(0.7)
    assert forget_score({"verbmem_forget": 0.25, "knowmem_forget": 0.4}, retain) == pytest.approx(0.7)
    assert forget_score({"verbmem_forget": 0.1, "knowmem_forget": 0.0}, retain) == 1.0  # below θ_retain: 1


def test_perta_summarize_reads_muse_files(muse_run, capsys):
    from perta_lightning.cli import main

    root = muse_run["root"]
    main(["summarize", "--ckpt_result", str(root / "eval.json"), "--retain_result", str(root / "retain.json")])
    printed = json.loads(capsys.readouterr().out)
    assert printed["benchmark"] == "muse" and math.isfinite(printed["forget_score"])


def test_a_reference_on_other_sets_is_refused(muse_run, tmp_path):
    data = json.loads((muse_run["root"] / "retain.json").read_text())
    data["examples"]["verbmem"]["index"] = data["examples"]["verbmem"]["index"][:-1]
    other = tmp_path / "short.json"
    other.write_text(json.dumps(data))
    with pytest.raises(PertaValueError, match=r"set 'verbmem' has 4 examples but .* has 5"):
        summarize_muse(muse_run["root"] / "eval.json", other)


def test_a_tofu_file_is_not_a_muse_reference(tmp_path):
    from perta_lightning.benchmarks.muse.summary import load_muse_evaluation

    path = tmp_path / "tofu.json"
    path.write_text(json.dumps({"format": "perta-tofu-eval/1", "aggregates": {}}))
    with pytest.raises(PertaValueError, match="not a MUSE evaluation file"):
        load_muse_evaluation(path)


def test_perta_test_runs_the_muse_evaluator_from_yaml(muse_run, tmp_path):
    """The LightningCLI path (``perta test --config``) with MuseEvaluator and MuseEvalDataModule."""
    import yaml

    from perta_lightning.cli import main

    out = tmp_path / "cli.json"
    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs/demo/muse_eval.yaml").read_text())
    config["model"]["init_args"].update(model=str(muse_run["model"]), output_json=str(out),
                                        retain_result=str(muse_run["root"] / "retain.json"),
                                        verbmem_max_new_tokens=12, knowmem_max_new_tokens=6)
    config["data"]["init_args"].update(source={"path": str(muse_run["data"])}, batch_size=3, text_max_length=256,
                                       use_icl=True)
    config["trainer"]["enable_progress_bar"] = False
    path = tmp_path / "muse_eval.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["test", "--config", str(path)])
    assert json.loads(out.read_text())["aggregates"] == pytest.approx(muse_run["result"]["aggregates"])
