import math
from functools import partial

import pytest
import torch

from perta_lightning.functional.unlearning_losses import grad_ascent_loss, grad_diff_loss, npo_loss


def test_losses_by_hand():
    nll_f, nll_r, nll_ref = torch.tensor([1.0, 3.0]), torch.tensor([0.5, 1.5]), torch.tensor([1.0, 1.0])
    assert grad_ascent_loss(nll_f).item() == -2.0
    assert grad_diff_loss(nll_f, nll_r).item() == -1.0
    beta = 0.1
    # example 1: nll_f == nll_ref -> -(2/β)·log σ(0) = 20·log 2; example 2: -(2/β)·log σ(0.2)
    expected = (20 * math.log(2) + 20 * math.log(1 + math.exp(-0.2))) / 2
    assert npo_loss(nll_f, nll_ref, None, beta).item() == pytest.approx(expected, rel=1e-6)
    assert npo_loss(nll_f, nll_ref, nll_r, beta).item() == pytest.approx(expected + 1.0, rel=1e-6)


def test_npo_falls_as_forget_nll_rises():
    reference = torch.tensor([2.0])
    losses = [npo_loss(torch.tensor([nll]), reference, None).item() for nll in (1.0, 2.0, 4.0, 20.0)]
    assert losses == sorted(losses, reverse=True) and losses[-1] > 0
    with pytest.raises(ValueError, match="beta"):
        npo_loss(reference, reference, None, beta=0.0)


@pytest.mark.parametrize("method", ["grad_ascent", "grad_diff", "npo"])
def test_one_unlearning_step_raises_forget_loss(method, tiny_model_dir, tiny_benchmark, tmp_path):
    import lightning as L

    from perta_lightning.benchmarks.tofu.source import TofuSource
    from perta_lightning.data.datamodule import TofuDataModule
    from perta_lightning.data.formatting import PromptFormat
    from perta_lightning.modules.baselines import UnlearningModule

    L.seed_everything(0)
    module = UnlearningModule(str(tiny_model_dir), method=method, output_dir=str(tmp_path / "out"),
                              optimizer=partial(torch.optim.SGD, lr=0.5))
    data = TofuDataModule(TofuSource(path=str(tiny_benchmark)), PromptFormat(tokenizer=str(tiny_model_dir)),
                          train_split="forget10", paired_split="retain90", batch_size=10, shuffle=False)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    before = module.answer_loss(batch).item()
    L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False).fit(module, data)
    assert module.answer_loss(batch).item() > before
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_simnpo_by_hand():
    from perta_lightning.functional.unlearning_losses import simnpo_loss

    nll_sum, tokens, nll_r = torch.tensor([2.0, 6.0]), torch.tensor([2.0, 3.0]), torch.tensor([0.5, 1.5])
    beta, gamma, alpha = 4.5, 0.125, 1.0
    # mean token NLLs 1 and 2: -(2/β)·log σ(β·1) and -(2/β)·log σ(β·2), i.e. (2/β)·log(1 + e^(−β·m))
    forget = ((2 / beta) * math.log(1 + math.exp(-4.5)) + (2 / beta) * math.log(1 + math.exp(-9.0))) / 2
    assert simnpo_loss(nll_sum, tokens, None, beta, 0.0, gamma).item() == pytest.approx(gamma * forget, rel=1e-6)
    assert simnpo_loss(nll_sum, tokens, nll_r, beta, 0.0, gamma, alpha).item() == pytest.approx(
        gamma * forget + 1.0, rel=1e-6)
    shifted = ((2 / beta) * math.log(1 + math.exp(4.5 * 0.5)) + (2 / beta) * math.log(1 + math.exp(-4.5 * 0.5))) / 2
    assert simnpo_loss(nll_sum, tokens, None, beta, delta=1.5).item() == pytest.approx(shifted, rel=1e-6)
    with pytest.raises(ValueError, match="beta"):
        simnpo_loss(nll_sum, tokens, None, beta=0.0)


def naive_activation_distance(hidden, target, mask):
    """RMU's distance by loops: per example the masked tokens' mean squared difference over units, averaged."""
    per_example = []
    for b in range(hidden.shape[0]):
        total, count = 0.0, 0
        for t in range(hidden.shape[1]):
            if mask[b, t]:
                goal = target[0, 0] if target.shape[0] == 1 else target[b, t]
                total += sum((float(h) - float(g)) ** 2 for h, g in zip(hidden[b, t], goal)) / hidden.shape[2]
                count += 1
        per_example.append(total / count)
    return sum(per_example) / len(per_example)


def test_rmu_terms_against_loops():
    from perta_lightning.functional.unlearning_losses import activation_distance, control_vector, rmu_loss

    generator = torch.Generator().manual_seed(0)
    hidden_f, hidden_r, reference = (torch.randn(3, 5, 4, generator=generator) for _ in range(3))
    mask_f = torch.tensor([[0, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]], dtype=torch.bool)
    mask_r = torch.tensor([[1, 1, 0, 0, 0], [0, 1, 1, 1, 0], [1, 0, 1, 0, 1]], dtype=torch.bool)
    control = control_vector(4, 2.0, torch.Generator().manual_seed(1))
    assert control.shape == (1, 1, 4) and control.norm().item() == pytest.approx(2.0, rel=1e-6)
    assert bool((control >= 0).all())  # a direction drawn uniformly in [0, 1)^d, as open-unlearning's
    assert control.equal(control_vector(4, 2.0, torch.Generator().manual_seed(1)))
    forget = naive_activation_distance(hidden_f, control, mask_f)
    retain = naive_activation_distance(hidden_r, reference, mask_r)
    assert activation_distance(hidden_f, control, mask_f).item() == pytest.approx(forget, rel=1e-6)
    assert rmu_loss(hidden_f, control, mask_f, hidden_r, reference, mask_r, 2.0, 0.5).item() == pytest.approx(
        2.0 * forget + 0.5 * retain, rel=1e-6)
    assert activation_distance(hidden_r, hidden_r, mask_r).item() == 0.0


def test_rmu_layer_follows_open_unlearnings_depth():
    from perta_lightning.modules.baselines import rmu_layer_for

    assert rmu_layer_for(16) == 7  # open-unlearning's layer 7 of Llama-3.2-1B
    assert [rmu_layer_for(n) for n in (2, 3, 30)] == [1, 1, 13]


def _unlearning_setup(method, tiny_model_dir, tiny_benchmark, tmp_path, **options):
    import lightning as L

    from perta_lightning.benchmarks.tofu.source import TofuSource
    from perta_lightning.data.datamodule import TofuDataModule
    from perta_lightning.data.formatting import PromptFormat
    from perta_lightning.modules.baselines import UnlearningModule

    L.seed_everything(0)
    module = UnlearningModule(str(tiny_model_dir), method=method, optimizer=partial(torch.optim.SGD, lr=0.5),
                              **options)
    data = TofuDataModule(TofuSource(path=str(tiny_benchmark)), PromptFormat(tokenizer=str(tiny_model_dir)),
                          train_split="forget10", paired_split="retain90", batch_size=10, shuffle=False)
    data.setup("fit")
    return module, data, next(iter(data.train_dataloader()))


def _fit(module, data, **trainer):
    import lightning as L

    L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, **trainer).fit(module, data)


def test_one_simnpo_step_raises_forget_loss(tiny_model_dir, tiny_benchmark, tmp_path):
    """A small β, and no retain term: at a random model's NLL (about 5.7) the forget term's gradient at β = 4.5
    is e^(−25), which the retain term would drown."""
    module, data, batch = _unlearning_setup("simnpo", tiny_model_dir, tiny_benchmark, tmp_path, simnpo_beta=0.1,
                                            forget_weight=1.0, retain_weight=0.0)
    before = module.answer_loss(batch).item()
    _fit(module, data, max_steps=1)
    assert module.answer_loss(batch).item() > before


def test_one_rmu_step_moves_forget_states_towards_the_control(tiny_model_dir, tiny_benchmark, tmp_path):
    from perta_lightning.functional.losses import IGNORE_INDEX
    from perta_lightning.functional.unlearning_losses import activation_distance
    from perta_lightning.modules.baselines import hidden_states

    module, data, batch = _unlearning_setup("rmu", tiny_model_dir, tiny_benchmark, tmp_path, rmu_steering_coeff=5.0)

    def distance() -> float:
        with torch.no_grad():
            hidden = hidden_states(module.model, module.layer, batch["input_ids"], batch["attention_mask"])
            return activation_distance(hidden, module.control, batch["labels"] != IGNORE_INDEX).item()

    before = distance()
    _fit(module, data, max_steps=1)
    assert distance() < before
    assert all(not p.requires_grad for p in module.reference[0].parameters())


def test_a_training_run_keeps_a_model_after_each_chosen_epoch(tiny_model_dir, tiny_benchmark, tmp_path):
    """One run, the models after epochs 1 and 2: the points of the method's curve."""
    from safetensors.torch import load_file

    module, data, _ = _unlearning_setup("grad_diff", tiny_model_dir, tiny_benchmark, tmp_path, save_epochs=[1, 2],
                                        epoch_dir=str(tmp_path / "curve"))
    _fit(module, data, max_epochs=2)
    first, second = (load_file(tmp_path / "curve" / f"epoch_{k}" / "model.safetensors") for k in (1, 2))
    start = load_file(tiny_model_dir / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.weight"
    assert not first[name].equal(start[name]) and not second[name].equal(first[name])
    assert second[name].equal(module.model.state_dict()[name])
