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
