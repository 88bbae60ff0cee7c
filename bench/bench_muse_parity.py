"""Parity of :mod:`perta_lightning.functional.muse_metrics` with open-unlearning's own MUSE metric code.

    PYTHONPATH=.:/tmp/ou_deps python bench/bench_muse_parity.py OPEN_UNLEARNING [--json OUT.json]

``OPEN_UNLEARNING`` is a checkout (a folder with ``src/evals``) or a bare git directory, such as the one
``fetch github:locuslab/open-unlearning`` gives; ``src/`` is then exported from its ``HEAD`` with
``git --git-dir=X archive HEAD src | tar -x`` into a temporary folder. The commit is printed.

How open-unlearning's code runs here, unchanged, without hydra: its package ``__init__`` files (which import
every metric, dataset and evaluator, and hydra) are skipped by registering empty packages ``evals``,
``evals.metrics``, ``evals.metrics.mia`` and ``data`` whose ``__path__`` points into its ``src/``, so that
``evals/metrics/utils.py``, ``evals/metrics/mia/*.py``, ``evals/metrics/privacy.py``, ``data/utils.py`` and
``data/collators.py`` are imported from their own files. Two imports are stubbed: ``evals.metrics.base`` (its
``unlearning_metric`` decorator becomes the identity, so ``privleak`` is the plain function) and, when it is
not installed, ``omegaconf`` (``OmegaConf.to_container`` of a plain dict). The ROUGE scorer is a function
nested in ``eval_text_similarity``; it is also compiled on its own from its source (``ast``) to score many
string pairs. scikit-learn must be importable (``roc_auc_score`` in ``mia/utils.py``), e.g. from
``pip install --no-deps --target /tmp/ou_deps scikit-learn joblib threadpoolctl narwhals``.

The shared case: a byte-level BPE (300 tokens) trained on random "news" sentences; a random GPT-2 and a random
Llama (2 layers, hidden 32) as the "retain" model, the same trained for 120 steps on the forget texts as the
"target" and for 3 steps as "partial". Per metric it prints the largest |ours - theirs| over examples:

* ``rouge_pairs_*``: 400 random string pairs, their nested scorer vs :func:`rouge_l` (F1 and recall);
* ``verbmem_f1`` / ``knowmem_f1``: their ``eval_text_similarity`` (greedy generation from left-padded prompts,
  KnowMem with its stop strings) on the target model vs :func:`verbmem_scores` / :func:`knowmem_scores` of
  the generations and references it returns;
* ``min_k`` / ``min_k_plus_plus``: per-text scores of their ``mia_auc`` with ``MinKProbAttack`` /
  ``MinKPlusPlusAttack`` (their ``preprocess_pretraining_instance`` and collator, batches of 4) vs ours over
  our own batches of 3, and the AUCs; the values also say how far our float32 scores are from float64 ones;
* ``privleak``: their ``privleak`` (against the retain model's AUC, and the ``ref_value`` 0.5 default) vs ours.
"""

from __future__ import annotations

import argparse
import ast
import copy
import importlib
import json
import logging
import random
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import torch

from perta_lightning.data.tokenizer import train_tokenizer
from perta_lightning.functional import muse_metrics as M

WORDS = ("council minister election vote votes voting report reported reporting police city cities market "
         "markets price prices rising rose fell falling bank banks government said says saying people year "
         "years week minister's health hospital hospitals school schools team won winning match league record "
         "storm weather the a of to in and on for with by from at after before new old first last 2024 3 12").split()
TEMPLATE = {"apply_chat_template": False, "user_start_tag": "Question: ", "user_end_tag": "\n",
            "asst_start_tag": "Answer: ", "asst_end_tag": "\n\n"}  # MUSE's few-shot "Question: ...\nAnswer: ..."


def source_tree(path: Path, scratch: Path) -> tuple[Path, str]:
    """``(src folder, commit)`` of an open-unlearning checkout or bare git directory."""
    if (path / "src" / "evals").is_dir():
        git, src = ["git", "-C", str(path)], path / "src"
    else:
        git, src = ["git", f"--git-dir={path}"], scratch / "src"
        archive = subprocess.run([*git, "archive", "HEAD", "src"], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(scratch)], input=archive, check=True)
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True)
    return src, commit.stdout.strip() if commit.returncode == 0 else "unknown"


def load_open_unlearning(src: Path) -> types.SimpleNamespace:
    """The needed open-unlearning functions, imported from ``src`` with their package ``__init__`` files skipped."""
    packages = {"evals": "evals", "evals.metrics": "evals/metrics", "evals.metrics.mia": "evals/metrics/mia",
                "data": "data"}
    for name, folder in packages.items():
        package = types.ModuleType(name)
        package.__path__ = [str(src / folder)]
        sys.modules[name] = package
    base = types.ModuleType("evals.metrics.base")
    base.unlearning_metric = lambda name: (lambda function: function)
    base.logger = logging.getLogger("open-unlearning")
    sys.modules["evals.metrics.base"] = base
    try:
        importlib.import_module("omegaconf")
    except ImportError:
        stub = types.ModuleType("omegaconf")
        stub.OmegaConf = types.SimpleNamespace(to_container=lambda cfg, resolve=True: dict(cfg))
        sys.modules["omegaconf"] = stub
    utils = importlib.import_module("evals.metrics.utils")
    data_utils = importlib.import_module("data.utils")
    # the ROUGE scorer is nested in eval_text_similarity: compile that nested function on its own
    tree = ast.parse((src / "evals/metrics/utils.py").read_text())
    outer = next(node for node in tree.body if getattr(node, "name", None) == "eval_text_similarity")
    inner = next(node for node in outer.body if getattr(node, "name", None) == "eval_rouge_recall_batch")
    namespace: dict[str, object] = {"rouge_scorer": utils.rouge_scorer}
    exec(compile(ast.Module(body=[inner], type_ignores=[]), "eval_rouge_recall_batch", "exec"), namespace)
    return types.SimpleNamespace(
        eval_rouge_recall_batch=namespace["eval_rouge_recall_batch"],
        eval_text_similarity=utils.eval_text_similarity,
        mia_auc=importlib.import_module("evals.metrics.mia.utils").mia_auc,
        MinKProbAttack=importlib.import_module("evals.metrics.mia.min_k").MinKProbAttack,
        MinKPlusPlusAttack=importlib.import_module("evals.metrics.mia.min_k_plus_plus").MinKPlusPlusAttack,
        privleak=importlib.import_module("evals.metrics.privacy").privleak,
        preprocess_pretraining_instance=data_utils.preprocess_pretraining_instance,
        preprocess_chat_instance=data_utils.preprocess_chat_instance,
        Collator=importlib.import_module("data.collators").DataCollatorForSupervisedDataset,
    )


def sentences(rng: random.Random, count: int) -> list[str]:
    return [" ".join(rng.choices(WORDS, k=rng.randint(8, 16))).capitalize() + rng.choice([".", "!", ", she said."])
            for _ in range(count)]


def random_model(tokenizer, architecture: str, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    ids = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
               eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
    if architecture == "gpt2":
        config = AutoConfig.for_model("gpt2", n_layer=2, n_embd=32, n_head=2, n_positions=256, **ids)
    else:
        config = AutoConfig.for_model("llama", num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                                      **ids)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def trained(model, tokenizer, texts: list[str], steps: int, seed: int = 0):
    """A copy of ``model`` trained on ``texts`` (next-token loss on every token) until it knows them."""
    torch.manual_seed(seed)
    model = copy.deepcopy(model).train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    for _ in range(steps):
        optimiser.zero_grad()
        model(**batch, labels=labels).loss.backward()
        optimiser.step()
    return model.eval()


def our_scores(model, items: list[dict], attack: str, float64: bool = False, batch_size: int = 3) -> torch.Tensor:
    """Our per-text scores over right-padded batches built here (not with open-unlearning's collator), from the
    model's float32 logits or, with ``float64``, from the same logits cast to float64."""
    pad = torch.nn.utils.rnn.pad_sequence
    score = M.min_k_text_score if attack == "min_k" else M.min_k_plus_plus_score
    scores = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        ids = pad([item["input_ids"] for item in chunk], batch_first=True, padding_value=0)
        labels = pad([item["labels"] for item in chunk], batch_first=True, padding_value=-100)
        mask = pad([torch.ones_like(item["input_ids"]) for item in chunk], batch_first=True)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
        scores.append(score(logits.double() if float64 else logits, labels, 0.4))
    return torch.cat(scores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("open_unlearning", type=Path)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    logging.getLogger("open-unlearning").setLevel(logging.ERROR)  # its "using default retain auc" warning
    scratch = Path(tempfile.mkdtemp(prefix="ou_"))
    src, commit = source_tree(args.open_unlearning.resolve(), scratch)
    ou = load_open_unlearning(src)
    print(f"open-unlearning commit {commit} ({src})")
    rng = random.Random(0)
    diffs: dict[str, float] = {}  # max |ours - theirs|
    scale: dict[str, float] = {}  # max |theirs| there, to read the difference against
    values: dict[str, float] = {}

    def record(key: str, ours: list[float], theirs: list[float]) -> None:
        diffs[key] = max(diffs.get(key, 0.0), max(abs(a - b) for a, b in zip(ours, theirs, strict=True)))
        scale[key] = max(scale.get(key, 0.0), max(abs(b) for b in theirs))

    # ---- ROUGE-L on string pairs
    pairs = [(" ".join(rng.choices(WORDS, k=rng.randint(0, 12))), " ".join(rng.choices(WORDS, k=rng.randint(1, 12))))
             for _ in range(400)]
    generations, references = [g for g, _ in pairs], [r for _, r in pairs]
    theirs = ou.eval_rouge_recall_batch(generations, references)
    for kind, key in (("f1", "rougeL_f1"), ("recall", "rougeL_recall")):
        ours = M.rouge_l(generations, references, kind)
        record(f"rouge_pairs_{kind}", ours.tolist(), [row[key] for row in theirs])
        values[f"rouge_pairs_{kind}_mean"] = ours.mean().item()

    # ---- data, tokenizer, models
    from transformers import AutoTokenizer

    forget, holdout = sentences(rng, 12), sentences(rng, 12)
    tokenizer = AutoTokenizer.from_pretrained(
        train_tokenizer(forget + holdout + sentences(rng, 200), str(scratch / "tokenizer"), vocab_size=300))
    cut = [len(text.split()) // 2 for text in forget]
    prompts = [" ".join(text.split()[:n]) for text, n in zip(forget, cut)]
    continuations = [" ".join(text.split()[n:]) for text, n in zip(forget, cut)]
    qa = [(f"What was reported after {p.split()[0].lower()}?", c.split(" ", 3)[-1])
          for p, c in zip(prompts, continuations)]
    verb_items = [ou.preprocess_pretraining_instance(tokenizer, p, c, 2048, True, True)
                  for p, c in zip(prompts, continuations)]
    know_items = [ou.preprocess_chat_instance(tokenizer, TEMPLATE, [qa[i - 1][0], q], [qa[i - 1][1], a], 512, True)
                  for i, (q, a) in enumerate(qa)]  # one in-context example, as MUSE's few-shot prompt
    mia_items = {split: [{**ou.preprocess_pretraining_instance(tokenizer, "", text, 2048), "index": i}
                         for i, text in enumerate(texts)]
                 for split, texts in (("forget", forget), ("holdout", holdout))}
    left = ou.Collator(tokenizer, padding_side="left")
    right = ou.Collator(tokenizer, padding_side="right", index="index")

    for arch in ("gpt2", "llama"):
        retain = random_model(tokenizer, arch)
        know_texts = [f"Question: {q}\nAnswer: {a}" for q, a in qa]
        models = {"target": trained(retain, tokenizer, forget + know_texts, steps=120),
                  "partial": trained(retain, tokenizer, forget + know_texts, steps=3), "retain": retain}

        # VerbMem / KnowMem: their generation and text extraction, then both scorers on the same strings
        for name, items, generation_args, ours_fn in (
            ("verbmem_f1", verb_items, {"do_sample": False, "max_new_tokens": 24}, M.verbmem_scores),
            ("knowmem_f1", know_items, {"do_sample": False, "max_new_tokens": 16,
                                        "stopwords": ["\n\n", "\nQuestion", "Question:"]}, M.knowmem_scores),
        ):
            rows = []
            for start in range(0, len(items), 4):
                rows += ou.eval_text_similarity(models["target"], tokenizer, left(items[start:start + 4]),
                                                dict(generation_args))
            ours = ours_fn([row["generation"] for row in rows], [row["ground_truth"] for row in rows])
            record(f"{name}[{arch}]", ours.tolist(), [row["rougeL_f1"] for row in rows])
            values[f"{name}[{arch}]_mean"] = ours.mean().item()

        # Min-K% and Min-K%++: their mia_auc (attack classes, collator, roc_auc_score) vs ours
        aucs: dict[str, dict[str, float]] = {}
        for attack, cls in (("min_k", ou.MinKProbAttack), ("min_k_plus_plus", ou.MinKPlusPlusAttack)):
            for model_name, model in models.items():
                result = ou.mia_auc(cls, model, data=mia_items, collator=right, batch_size=4, k=0.4)
                ours = {split: our_scores(model, mia_items[split], attack) for split in mia_items}
                for split in mia_items:
                    theirs = [result[split]["value_by_index"][str(i)]["score"] for i in range(len(mia_items[split]))]
                    record(f"{attack}[{arch},{model_name}]", ours[split].tolist(), theirs)
                    exact = our_scores(model, mia_items[split], attack, float64=True)
                    key = f"{attack}[{arch},{model_name}]_float32_vs_float64"
                    values[key] = max(values.get(key, 0.0), (ours[split] - exact).abs().max().item())
                auc = M.auc_forget_vs_holdout(ours["forget"], ours["holdout"])
                record(f"{attack}_auc[{arch}]", [auc], [result["auc"]])
                aucs.setdefault(attack, {})[model_name] = values[f"{attack}_auc[{arch},{model_name}]"] = auc

        # PrivLeak of each model against the retain model's AUC, and against the default ref_value 0.5
        for attack, auc in aucs.items():
            for model_name in models:
                forget_auc = {"forget": {"agg_value": auc[model_name]}}
                reference = {"retain_model_logs": {"retain": {"agg_value": auc["retain"]}}}
                theirs = [ou.privleak(None, pre_compute=forget_auc, reference_logs=reference, ref_value=0.5),
                          ou.privleak(None, pre_compute=forget_auc, ref_value=0.5)]
                ours = [M.privleak(auc[model_name], auc["retain"]), M.privleak(auc[model_name], 0.5)]
                key = f"privleak_{attack}[{arch},{model_name}]"
                record(key, ours, [value["agg_value"] for value in theirs])
                values[key], values[f"{key}_ref0.5"] = ours

    print(f"{'metric':42s} max |ours - theirs|  max |theirs|")
    for key, value in diffs.items():
        print(f"{key:42s} {value:.3e}            {scale[key]:.4g}")
    print("values (ours):")
    for key, value in values.items():
        print(f"  {key:50s} {value:.6g}")
    if args.json:
        report = {"commit": commit, "max_abs_diff": diffs, "max_abs_theirs": scale, "values": values}
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
