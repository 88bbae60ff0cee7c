"""Why PerTA helps or not on one seed: ``diagnostic.json`` beside a forget split's report.

For every PerTA variant of the report, streamed tensor by tensor from the run's files:

* the distribution of its weights ``w`` (a 10-bin histogram over [0, 1], and the mean);
* the share of the task vector's squared norm that ``w`` keeps, ‖w ⊙ τ‖² / ‖τ‖², overall and by layer type;
* Spearman's ρ between the forget and the retain importance, overall and by layer type (on a seeded
  sample of at most ``per_tensor`` entries of each tensor);

and, from the report's rows, how Model Utility and Forget Quality move along α for TV and each variant.
The maths is :mod:`perta_lightning.functional.diagnostics`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from perta_lightning.benchmarks.base import Axes, Benchmark
from perta_lightning.checkpoints import TensorSource
from perta_lightning.functional.diagnostics import kept_energy, rank_correlation, weight_histogram
from perta_lightning.io import atomic_write_text
from perta_lightning.study.weights import WeightFiles, layer_type, streamed_weights

BINS = 10


def _curve(rows: list[dict[str, Any]], method: str, axes: Axes) -> list[dict[str, Any]]:
    points = [r for r in rows if r["method"] == method and r["alpha"] is not None]
    return [{"alpha": r["alpha"], axes.forget_key: r[axes.forget_key], axes.utility_key: r[axes.utility_key],
             "collapsed": r["collapsed"]} for r in sorted(points, key=lambda r: r["alpha"])]


def diagnose_variant(target: Path, reinforced: Path, files: WeightFiles, per_tensor: int = 4096,
                     seed: int = 0) -> dict[str, Any]:
    """The weight, kept-energy and rank-correlation figures of one PerTA variant (see the module docstring)."""
    histogram = [0] * BINS
    kept: dict[str, list[float]] = {}
    samples: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    weight_sum, count = 0.0, 0
    generator = torch.Generator().manual_seed(seed)
    with TensorSource.from_model_dir(target) as t, TensorSource.from_model_dir(reinforced) as r:
        for name, s_f, s_r, w in streamed_weights(files):
            if name not in t.infos or name not in r.infos:
                continue
            sf, sr, w = s_f.flatten(), s_r.flatten(), w.flatten()
            tau = (r.read(name).float() - t.read(name).float()).flatten()
            kind = layer_type(name)
            for bin_index, n in enumerate(weight_histogram(w, BINS)):
                histogram[bin_index] += n
            weight_sum += float(w.double().sum())
            count += w.numel()
            numerator, denominator = kept_energy(w, tau)
            totals = kept.setdefault(kind, [0.0, 0.0])
            totals[0] += numerator
            totals[1] += denominator
            pick = torch.randperm(sf.numel(), generator=generator)[:per_tensor]
            samples.setdefault(kind, []).append((sf[pick], sr[pick]))

    def rho(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> float | None:
        value = rank_correlation(torch.cat([a for a, _ in parts]), torch.cat([b for _, b in parts]))
        return None if value != value else value  # NaN (a constant sample) -> null

    all_num, all_den = sum(v[0] for v in kept.values()), sum(v[1] for v in kept.values())
    return {
        "weight_histogram": histogram, "weight_mean": weight_sum / max(count, 1), "parameters": count,
        "kept_share": all_num / all_den if all_den else None,
        "kept_share_by_layer_type": {k: (v[0] / v[1] if v[1] else None) for k, v in sorted(kept.items())},
        "rank_correlation": rho([p for parts in samples.values() for p in parts]),
        "rank_correlation_by_layer_type": {k: rho(parts) for k, parts in sorted(samples.items())},
    }


def diagnose_split(split_dir: str | Path, seed: int, rows: list[dict[str, Any]], benchmark: Benchmark,
                   weights: dict[str, WeightFiles], reinforced: Path) -> dict[str, Any]:
    """The diagnostic of one forget split of one seed, from its report's rows and each variant's weight files as
    the stages that made them hand them on; written (atomically) to ``<split_dir>/diagnostic.json`` and
    returned."""
    split_dir = Path(split_dir)
    root = split_dir.parent
    ax = benchmark.axes
    target_row = next(r for r in rows if r["method"] == "target")
    out: dict[str, Any] = {"seed": seed, "forget_split": split_dir.name,
                           "target": {k: target_row[k] for k in benchmark.diagnostic_columns},
                           "curves": {"tv": _curve(rows, "tv", ax)}, "variants": {}}
    for label, files in weights.items():
        out["variants"][label] = diagnose_variant(root / target_row["model_dir"], reinforced, files)
        out["curves"][label] = _curve(rows, label, ax)
    atomic_write_text(split_dir / "diagnostic.json", json.dumps(out, indent=2))
    return out
