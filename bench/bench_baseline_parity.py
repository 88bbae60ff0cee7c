"""Parity of this project's SimNPO and RMU losses with open-unlearning's own, on one tiny batch.

    PYTHONPATH=. python bench/bench_baseline_parity.py OPEN_UNLEARNING [--json bench/results/baseline_parity.json]

``OPEN_UNLEARNING`` is a checkout (a folder with ``src/trainer``) or a bare git directory, such as the one
``fetch github:locuslab/open-unlearning`` gives; ``src/`` is then exported from its ``HEAD`` into a temporary
folder. The commit is printed and recorded.

How their code runs here, unchanged: the packages ``trainer`` and ``trainer.unlearn`` are registered empty, their
``__path__`` in its ``src/``, so that ``trainer/utils.py``, ``trainer/unlearn/grad_diff.py``, ``simnpo.py`` and
``rmu.py`` import from their own files; ``trainer.unlearn.base`` (the Hugging Face ``Trainer`` subclass) is
stubbed by a plain class, since only ``compute_loss`` is called. An instance is made without ``__init__`` and
given the attributes ``__init__`` would set (their config's values: SimNPO β 4.5, δ 0, γ 0.125, α 1; RMU γ 1,
α 1, ``EMBED_DIFF``), and RMU our control vector, so that both draw the same random direction.

The case: a random Llama (3 layers, hidden 32) with a byte-level BPE, a batch of 3 forget and 3 retain
question/answer pairs of other lengths; then the same after a few steps of SGD on the forget answers, so that
the forget NLL differs from the reference's. Per loss: their value, ours (the functional through
:class:`~perta_lightning.modules.baselines.UnlearningModule`), and |ours − theirs|. For RMU also their formula
rebuilt from our per-example terms (:func:`_their_broadcast`): its ``compute_activation_loss`` averages a
``(B, B)`` broadcast, mean(s)·mean(1/n), where the mean of s/n over examples is meant; this project computes the
latter (the two agree when every example has as many answer tokens).
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import types
from pathlib import Path


def _their_src(path: Path) -> tuple[Path, str]:
    if (path / "src" / "trainer").is_dir():
        commit = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
        return path / "src", commit.strip()
    folder = Path(tempfile.mkdtemp(prefix="open_unlearning_"))
    archive = subprocess.run(["git", "--git-dir", str(path), "archive", "HEAD", "src"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    commit = subprocess.run(["git", "--git-dir", str(path), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    return folder / "src", commit.strip()


def _load_theirs(src: Path) -> tuple[type, type]:
    for name, sub in (("trainer", "trainer"), ("trainer.unlearn", "trainer/unlearn")):
        package = types.ModuleType(name)
        package.__path__ = [str(src / sub)]
        sys.modules[name] = package
    base = types.ModuleType("trainer.unlearn.base")
    base.UnlearnTrainer = type("UnlearnTrainer", (), {})
    sys.modules["trainer.unlearn.base"] = base
    sys.path.insert(0, str(src))
    from trainer.unlearn.rmu import RMU
    from trainer.unlearn.simnpo import SimNPO

    return SimNPO, RMU


def _case(root: Path):
    import torch

    from perta_lightning.data.formatting import PromptFormat, collate_examples
    from tests.tiny import write_tiny_model, write_tokenizer

    model_dir = write_tokenizer(root / "model")
    write_tiny_model(model_dir, model_dir, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    formatter = PromptFormat().formatter(str(model_dir))
    forget = [("What about the river?", "The river is a garden book."), ("What about the poem?", "A poem."),
              ("What about the city?", "The city was born in a dream at night by the river.")]
    retain = [("What about the mother?", "She wrote a novel."), ("What about the prize?", "The golden prize."),
              ("What about the father?", "A father and a mother wrote a long story of a garden.")]
    pad = formatter.tokenizer.pad_token_id
    batch_f = collate_examples([formatter.encode(q, a) for q, a in forget], pad)
    batch_r = collate_examples([formatter.encode(q, a) for q, a in retain], pad)
    batch = {**batch_f, **{f"paired_{k}": v for k, v in batch_r.items()}}
    inputs = {"forget": {k: batch_f[k] for k in ("input_ids", "attention_mask", "labels")},
              "retain": {k: batch_r[k] for k in ("input_ids", "attention_mask", "labels")}}
    torch.manual_seed(0)
    return model_dir, batch, inputs


def compare(src: Path) -> dict:
    import torch

    from perta_lightning.modules.baselines import UnlearningModule, decoder_layers

    SimNPO, RMU = _load_theirs(src)
    out: dict = {}
    with tempfile.TemporaryDirectory() as folder:
        model_dir, batch, inputs = _case(Path(folder))
        for stage in ("at the target", "after 5 SGD steps on forget"):
            simnpo = UnlearningModule(str(model_dir), method="simnpo", simnpo_beta=4.5, forget_weight=0.125)
            rmu = UnlearningModule(str(model_dir), method="rmu", rmu_steering_coeff=2.0)
            if stage != "at the target":  # move both away from the reference the same way
                for module in (simnpo, rmu):
                    optimizer = torch.optim.SGD(module.model.parameters(), lr=0.5)
                    for _ in range(5):
                        optimizer.zero_grad()
                        module.answer_loss(batch).backward()
                        optimizer.step()
            for module in (simnpo, rmu):
                module.model.eval()
            theirs = SimNPO.__new__(SimNPO)
            theirs.beta, theirs.delta, theirs.gamma, theirs.alpha, theirs.retain_loss_type = 4.5, 0.0, 0.125, 1.0, "NLL"
            with torch.no_grad():
                their_simnpo = float(theirs.compute_loss(simnpo.model, inputs))
                ours_simnpo = float(_our_loss(simnpo, batch))
            them = RMU.__new__(RMU)
            them.gamma, them.alpha, them.retain_loss_type, them.steering_coeff = 1.0, 1.0, "EMBED_DIFF", 2.0
            them.ref_model = rmu.reference[0]
            them.model_module = decoder_layers(rmu.model)[rmu.layer]
            them.ref_module = decoder_layers(them.ref_model)[rmu.layer]
            them.control_vec = rmu.control.clone()
            with torch.no_grad():
                their_rmu = float(them.compute_loss(rmu.model, copy.deepcopy(inputs)))
                ours_rmu = float(_our_loss(rmu, batch))
                broadcast = _their_broadcast(rmu, batch)
            out[stage] = {"simnpo": {"theirs": their_simnpo, "ours": ours_simnpo,
                                     "abs_diff": abs(their_simnpo - ours_simnpo)},
                          "rmu": {"theirs": their_rmu, "ours": ours_rmu, "abs_diff": abs(their_rmu - ours_rmu),
                                  "their_formula_from_our_terms": broadcast,
                                  "abs_diff_their_formula": abs(their_rmu - broadcast), "layer": rmu.layer}}
    return out


def _their_broadcast(rmu, batch) -> float:
    """open-unlearning's RMU from our per-example terms: its ``compute_activation_loss`` divides the per-example sums
    ``s`` ``(B,)`` by the token counts ``n`` kept as ``(B, 1)``, which broadcasts to ``(B, B)``: its mean is
    mean(s) · mean(1/n), where the per-example mean of s / n is meant (and is what this project computes)."""
    from perta_lightning.functional.losses import IGNORE_INDEX
    from perta_lightning.modules.baselines import hidden_states

    def term(hidden, target, mask) -> float:
        squared = (hidden - target.expand_as(hidden)).pow(2).mean(dim=2)
        mask = mask.to(squared.dtype)
        return float((squared * mask).sum(dim=1).mean() * (1.0 / mask.sum(dim=1)).mean())

    h_f = hidden_states(rmu.model, rmu.layer, batch["input_ids"], batch["attention_mask"])
    h_r = hidden_states(rmu.model, rmu.layer, batch["paired_input_ids"], batch["paired_attention_mask"])
    ref = hidden_states(rmu.reference[0], rmu.layer, batch["paired_input_ids"], batch["paired_attention_mask"])
    return (term(h_f, rmu.control, batch["labels"] != IGNORE_INDEX)
            + term(h_r, ref, batch["paired_labels"] != IGNORE_INDEX))


def _our_loss(module, batch) -> float:
    """The loss ``training_step`` computes, without logging (no trainer is attached)."""
    module.log = lambda *args, **kwargs: None
    return module.training_step(batch, 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("open_unlearning", type=Path)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    src, commit = _their_src(args.open_unlearning)
    result = {"open_unlearning_commit": commit, "cases": compare(src)}
    print(json.dumps(result, indent=2))
    if args.json is not None:
        from perta_lightning.io import atomic_write_text

        atomic_write_text(args.json, json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
