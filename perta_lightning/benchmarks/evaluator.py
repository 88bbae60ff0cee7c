"""What every benchmark's evaluator shares: a LightningModule that loads the evaluated model in ``setup``,
generates greedily, refuses a file that missed examples, and writes it on rank zero; and the call that runs
one in this process.

A benchmark's evaluator (:class:`~perta_lightning.benchmarks.tofu.evaluator.TofuEvaluator`,
:class:`~perta_lightning.benchmarks.muse.evaluator.MuseEvaluator`) subclasses :class:`Evaluator` and says what
it scores in ``test_step`` and what it writes in :meth:`Evaluator.build`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from transformers import DynamicCache

from perta_lightning.checkpoints import load_causal_lm
from perta_lightning.data.formatting import pad_batch
from perta_lightning.distributed import check_modules_visible, sharded_parameters
from perta_lightning.io import atomic_write_text
from perta_lightning.prompt_cache import GreedyPool, accept_drafts, encode_prefix, gather_cache, greedy_decode


def generation_text(tokenizer: Any, ids: list[int]) -> str:
    """The text of generated token ids (``-1`` marks padding), special tokens skipped and surrounding white
    space stripped, as open-unlearning stores and scores generations."""
    return tokenizer.decode([t for t in ids if t >= 0], skip_special_tokens=True).strip()


def cut_at_stop(text: str, stops: tuple[str, ...]) -> str:
    """``text`` up to the first occurrence of any of ``stops`` (all of it when none occurs), then stripped: in that
    order, as the references do."""
    return text[:min((i for i in (text.find(stop) for stop in stops) if i >= 0), default=len(text))].strip()


#: The clean-up transformers 4 applied on ``decode(..., clean_up_tokenization_spaces=True)``: a space before
#: punctuation and English contractions removed (``PreTrainedTokenizerBase.clean_up_tokenization``).
CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
            (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def clean_up_tokenization_spaces(text: str) -> str:
    """``text`` with the replacements of :data:`CLEAN_UP` applied in order."""
    for before, after in CLEAN_UP:
        text = text.replace(before, after)
    return text


def reference_generation_text(tokenizer: Any, ids: list[int], stops: tuple[str, ...] = ()) -> str:
    """The text of generated token ids (``-1`` marks padding) as MUSE's code and open-unlearning's
    ``eval_text_similarity`` score it: decoded with special tokens skipped and spaces cleaned up
    (``clean_up_tokenization_spaces=True``: `` .`` → ``.``, `` n't`` → ``n't``, ...), cut at the first stop
    string, then stripped.

    Both references ran on transformers 4, which applied the clean-up for every tokenizer; transformers 5 skips it
    for BPE tokenizers (GPT-2's, Llama's, SmolLM2's) with a warning, and its first releases have no
    ``clean_up_tokenization`` to call, so it is applied here (:func:`clean_up_tokenization_spaces`). Cutting
    before stripping matters for a generation that opens with a blank line: it is cut to nothing, as the
    references score it."""
    text = tokenizer.decode([t for t in ids if t >= 0], skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return cut_at_stop(clean_up_tokenization_spaces(text), stops)


def _before_eos(tokens: list[int], eos: int | None) -> list[int]:
    return tokens[: tokens.index(eos)] if eos is not None and eos in tokens else tokens


def _padded(rows: list[list[int]], width: int, device: torch.device) -> torch.Tensor:
    """Token lists as ``(len(rows), width)`` ids, padded with -1."""
    ids = torch.full((len(rows), width), -1, dtype=torch.long, device=device)
    for row, tokens in enumerate(rows):
        ids[row, : len(tokens)] = torch.as_tensor(tokens, dtype=torch.long)
    return ids


def _ones(rows: list[list[int]]) -> list[list[int]]:
    """The attention mask of each token list, unpadded (for :func:`~perta_lightning.data.formatting.pad_batch`)."""
    return [[1] * len(tokens) for tokens in rows]


def check_every_example_seen(examples: dict[str, dict[str, torch.Tensor]], sets: dict[str, Any]) -> None:
    """Refuse to write an evaluation that missed examples: a ``StopIteration`` escaping a step ends Lightning's
    loop as if the data had run out, and the file would silently hold part of each set."""
    for name, values in examples.items():
        seen, expected = values["index"].numel(), len(sets[name].rows)
        if seen != expected:
            raise RuntimeError(f"evaluation set {name!r}: {seen} of its {expected} examples were evaluated")


class Evaluator(LightningModule):
    """The shared half of an evaluator: ``self.model`` and ``self.tokenizer`` once ``setup`` has run, greedy
    generation, the result written by rank zero. Subclasses keep ``model``, ``output_json`` and ``torch_dtype``
    among their hyper-parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.tokenizer: Any = None
        self.model: torch.nn.Module | None = None
        self.result: dict[str, Any] | None = None
        self.pool: GreedyPool | None = None  # the running batch of :meth:`generate_pooled` (one set at a time)

    def load_model(self) -> None:
        """Load the evaluated model once (in ``setup``, so that a bad path is one error line), refusing a strategy
        under which its own modules would hold no parameters."""
        check_modules_visible(self.trainer.strategy, type(self).__name__)
        if self.model is None:
            self.model = load_causal_lm(self.hparams.model, None, self.hparams.torch_dtype)
            self.model.eval()

    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, width: int,
                 prefix: DynamicCache | None = None, drafts: list[list[int]] | None = None) -> torch.Tensor:
        """Greedy continuations ``(B, width)``, cut before EOS and padded with -1.

        ``prefix``: the prompts' cache without their last token (:func:`~perta_lightning.prompt_cache.encode_prefix`,
        which encodes a prefix that every prompt shares once); computed here when not given, and left unchanged.
        ``drafts``: a guessed continuation per prompt; the tokens of it that greedy decoding would produce are
        settled in one pass (:func:`~perta_lightning.prompt_cache.accept_drafts`), and only the rows they do not
        finish are decoded on. The result is greedy decoding's either way (up to float rounding of a block pass
        against token-by-token passes, as between batch sizes)."""
        if prefix is None:
            prefix = encode_prefix(self.model, prompt_ids, prompt_mask)
        eos = self.tokenizer.eos_token_id
        settled = [[] for _ in range(prompt_ids.shape[0])]
        if drafts is not None:  # at least the first greedy token of every row
            draft_ids = pad_batch(drafts, self.tokenizer.pad_token_id).to(prompt_ids.device)
            draft_mask = pad_batch(_ones(drafts), 0).to(prompt_ids.device)
            settled = accept_drafts(self.model, prefix, prompt_ids, prompt_mask, draft_ids, draft_mask, width)
        known = [_before_eos(tokens, eos) for tokens in settled]
        open_rows = [row for row, tokens in enumerate(settled) if len(tokens) < width and eos not in tokens]
        limits = [width - len(known[row]) for row in open_rows]
        keep_going = self.keep_going()
        if not open_rows:
            if keep_going is None:
                return _padded(known, width, prompt_ids.device)
            open_rows, limits = [0], [0]  # nothing to decode here, but the other ranks' decoding needs our passes
        rows = torch.as_tensor(open_rows, device=prompt_ids.device)
        # [prompt][padding][known tokens]: each open row continues after its known tokens
        tails = [known[row] for row in open_rows]
        tail_ids = pad_batch(tails, self.tokenizer.pad_token_id, side="left")
        tail_mask = pad_batch(_ones(tails), 0, side="left")
        input_ids = torch.cat([prompt_ids[rows], tail_ids.to(prompt_ids.device)], dim=1)
        mask = torch.cat([prompt_mask[rows], tail_mask.to(prompt_mask.device)], dim=1)
        tokens = greedy_decode(self.model, gather_cache(prefix, rows), input_ids, mask, limits, eos, keep_going)
        for row, continuation in zip(open_rows, tokens):
            known[row] = known[row] + continuation
        return _padded(known, width, prompt_ids.device)

    @torch.no_grad()
    def generate_pooled(self, key: Any, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, width: int, last: bool,
                        prefix: DynamicCache | None = None) -> list[tuple[Any, torch.Tensor]]:
        """What :meth:`generate` gives, for the rows of one set's batches decoded in one running batch
        (:class:`~perta_lightning.prompt_cache.GreedyPool`): this batch (``key``) joins it, and it decodes until
        fewer rows than this batch's are open, or, after the set's ``last`` batch, none. Returns ``(key, ids)``
        for each batch whose rows have all ended, in the order they ended (none, one or several). Under a strategy
        that shards parameters each batch is decoded apart, in step with the other ranks."""
        if self.keep_going() is not None:
            return [(key, self.generate(prompt_ids, prompt_mask, width, prefix))]
        if prefix is None:
            prefix = encode_prefix(self.model, prompt_ids, prompt_mask)
        if self.pool is None:
            self.pool = GreedyPool(self.model, self.tokenizer.eos_token_id)
        rows = prompt_ids.shape[0]
        self.pool.add(key, gather_cache(prefix, torch.arange(rows, device=prompt_ids.device)), prompt_ids,
                      prompt_mask, [width] * rows)
        self.pool.run(0 if last else rows - 1)
        return [(done, _padded(self.pool.take(done), width, prompt_ids.device)) for done in self.pool.finished()]

    def last_batch(self, batch_idx: int, dataloader_idx: int) -> bool:
        """Whether this is the last batch of its set (its dataloader)."""
        return batch_idx == self.trainer.num_test_batches[dataloader_idx] - 1

    def keep_going(self) -> Callable[[bool], bool] | None:
        """For :func:`~perta_lightning.prompt_cache.greedy_decode`: under a strategy that shards parameters over
        several ranks (FSDP, ZeRO-3), each forward pass gathers them collectively, so the ranks decode until every
        rank's rows have ended (one flag reduced a step); ``None`` otherwise."""
        trainer = self._trainer
        if trainer is None or trainer.world_size == 1 or sharded_parameters(trainer.strategy) is None:
            return None

        def any_rank_open(open_here: bool) -> bool:
            flag = torch.tensor([int(open_here)], device=self.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            return bool(flag.item())

        return any_rank_open

    def write_result(self, barrier: str) -> None:
        """Rank zero writes ``self.result`` to ``output_json`` (atomically); every rank waits for it."""
        if self.hparams.output_json is not None and self.trainer.is_global_zero:
            atomic_write_text(self.hparams.output_json, json.dumps(self.result, indent=1, allow_nan=False))
        self.trainer.strategy.barrier(barrier)


def run_evaluation(module: Evaluator, datamodule: LightningDataModule, accelerator: str = "auto",
                   devices: int | str = 1, strategy: str = "auto") -> dict[str, Any]:
    """Evaluate in this process with a Lightning ``Trainer``; return ``module.result`` (written when the module
    has an ``output_json``)."""
    from perta_lightning.callbacks.progress import progress_bar

    trainer = Trainer(accelerator=accelerator, devices=devices, strategy=strategy, logger=False,
                      enable_checkpointing=False, callbacks=[progress_bar()], enable_model_summary=False)
    trainer.test(module, datamodule=datamodule, verbose=False)
    return module.result
