"""Reading MUSE evaluation files (``"format": "perta-muse-eval/1"``) and summarising one against the retain model.

The summary holds MUSE's four numbers — VerbMem on D_f, KnowMem on D_f, KnowMem on D_r and PrivLeak — and the
two axes along which this project compares unlearning methods at matched forgetting (as Forget Quality and
Model Utility are on TOFU):

* **forget score** ``F = 1 − max(0, VerbMem_f(θ) − VerbMem_f(θ_ret), KnowMem_f(θ) − KnowMem_f(θ_ret))``: 1 when
  the model reproduces and knows the forget corpus no better than the retain model (which never saw it) does,
  lower by the larger of the two excesses. MUSE's own reading — an unlearned model should come down to the
  retain model on both memorisation metrics — made into one number in [0, 1] so that levels can be matched;
* **utility**: KnowMem on D_r, MUSE's utility-preservation metric.

PrivLeak (:func:`perta_lightning.functional.tofu_metrics.privleak`) is reported beside them, in MUSE's sign
convention: about −100 for a model whose forget set is far more familiar than its holdout set (not unlearned),
0 for the retain model, positive for over-unlearning.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from perta_lightning.errors import PertaFileNotFoundError, PertaValueError
from perta_lightning.functional.tofu_metrics import privleak

MUSE_FORMAT = "perta-muse-eval/1"
#: The aggregates every MUSE evaluation file has.
MUSE_AGGREGATES = ("verbmem_forget", "knowmem_forget", "knowmem_retain", "mia_auc")


def is_muse_evaluation(path: str | Path) -> bool:
    """Whether ``path`` is a MUSE evaluation file (read cheaply: the format key comes first)."""
    try:
        with open(path, encoding="utf-8") as handle:
            head = handle.read(200)
    except OSError:
        return False
    return f'"format": "{MUSE_FORMAT}"' in head


def load_muse_evaluation(path: str | Path) -> dict[str, Any]:
    """The content of a MUSE evaluation file, checked: its format and every aggregate, finite."""
    path = str(path)
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PertaFileNotFoundError(f"evaluation file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PertaValueError(f"{path}: not valid JSON, truncated or damaged? ({error})") from None
    if not isinstance(data, dict) or data.get("format") != MUSE_FORMAT:
        raise PertaValueError(f"{path}: not a MUSE evaluation file (expected 'format': {MUSE_FORMAT!r})")
    aggregates = data.get("aggregates")
    if not isinstance(aggregates, dict):
        raise PertaValueError(f"{path}: missing key 'aggregates'")
    for key in MUSE_AGGREGATES:
        value = aggregates.get(key)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise PertaValueError(f"{path}: aggregates[{key!r}] is {value!r}, not a finite number")
    data["path"] = path
    return data


def privleak_or_none(auc: float, retain: dict[str, Any]) -> tuple[float | None, str | None]:
    """PrivLeak against the retain evaluation, or ``(None, why)`` when its AUC makes it undefined."""
    reference = retain["aggregates"]["mia_auc"]
    if reference >= 1.0:
        return None, f"privleak is null: the retain model's MIA AUC in {retain['path']} is 1 (1 − AUC = 0)"
    return privleak(auc, reference), None


def forget_score(model: dict[str, float], retain: dict[str, float]) -> float:
    """``1 − max(0, VerbMem_f − VerbMem_f(ret), KnowMem_f − KnowMem_f(ret))`` of aggregates dicts."""
    excess = max(model["verbmem_forget"] - retain["verbmem_forget"], model["knowmem_forget"] - retain["knowmem_forget"])
    return 1.0 - max(0.0, excess)


def summarize_muse(ckpt_result: str | Path, retain_result: str | Path) -> dict[str, Any]:
    """MUSE's metrics of a model and the forget score against the retain model's evaluation."""
    ckpt, retain = load_muse_evaluation(ckpt_result), load_muse_evaluation(retain_result)
    for name in ("verbmem", "knowmem_forget", "privleak_forget", "privleak_holdout"):
        ours = len(ckpt.get("examples", {}).get(name, {}).get("index", []))
        theirs = len(retain.get("examples", {}).get(name, {}).get("index", []))
        if ours != theirs:
            raise PertaValueError(f"retain reference {retain['path']}: set {name!r} has {theirs} examples but "
                                  f"{ckpt['path']} has {ours}; evaluate both on the same MUSE sets")
    a = ckpt["aggregates"]
    leak, note = privleak_or_none(a["mia_auc"], retain)
    return {"benchmark": "muse", **{key: a[key] for key in MUSE_AGGREGATES}, "privleak": leak,
            "forget_score": forget_score(a, retain["aggregates"]), "notes": [note] if note else []}


#: MUSE's metrics as the study reports them.
MUSE_METRICS = ("verbmem_forget", "knowmem_forget", "knowmem_retain", "privleak")


def muse_table(rows_by_seed: dict[int, list[dict[str, Any]]], families: dict[str, str], levels: list[float],
               axes: Any) -> dict[str, Any]:
    """MUSE's four metrics of the models a study compares, per test seed and as means over the seeds.

    ``rows_by_seed``: each seed's report rows; ``families``: family name → method label in the reports; ``axes``:
    the benchmark's :class:`~perta_lightning.benchmarks.base.Axes` (the keys of the report rows' curve values).
    The reference models (``retain``, ``target``) and the baselines give their one model; TV and PerTA give, at
    each forget-score level, the model the matched comparison chose there
    (:func:`perta_lightning.functional.tradeoff.utility_at_level`), ``None`` where the level is not reached.
    """
    from perta_lightning.functional.tradeoff import method_curves, utility_at_level

    out: dict[str, Any] = {}
    for family, label in {"retain": "retain", "target": "target", **families}.items():
        per_seed: dict[str, list[dict[str, float] | None]] = {}
        for seed, report_rows in sorted(rows_by_seed.items()):
            rows = [row for row in report_rows if row["method"] == label]
            target = next(row for row in report_rows if row["method"] == "target")
            if label in ("retain", "target"):
                chosen = [rows[0]] * len(levels)
            else:
                points = method_curves(report_rows, axes.forget_key, axes.utility_key)[label]
                picks = [utility_at_level(points, level) for level in levels]
                by_alpha = {row["alpha"]: row for row in rows}
                chosen = [None if p is None else by_alpha.get(p.alpha, target) if p.alpha != 0.0 else target
                          for p in picks]
            per_seed[str(seed)] = [None if row is None else {k: row[k] for k in MUSE_METRICS} for row in chosen]
        means = []
        for index in range(len(levels)):
            values = [seed_values[index] for seed_values in per_seed.values() if seed_values[index] is not None]
            means.append({"seeds": len(values), **{k: (sum(v[k] for v in values) / len(values)
                                                       if values and all(v[k] is not None for v in values) else None)
                                                    for k in MUSE_METRICS}})
        out[family] = {"label": label, "per_seed": per_seed, "mean": means}
    return out


def muse_table_markdown(table: dict[str, Any], levels: list[float], seeds: int) -> list[str]:
    """The study's MUSE table: reference models and baselines once, TV and PerTA at each forget-score level."""
    lines = ["| model | VerbMem_f | KnowMem_f | KnowMem_r | PrivLeak | seeds |", "|---|---|---|---|---|---|"]

    def cells(entry: dict[str, Any]) -> str:
        numbers = ["–" if entry[k] is None else f"{entry[k]:.1f}" if k == "privleak" else f"{entry[k]:.3f}"
                   for k in MUSE_METRICS]
        return " | ".join(numbers) + f" | {entry['seeds']}/{seeds} |"

    for family, data in table.items():
        fixed = family in ("retain", "target") or len({str(m) for m in data["mean"]}) == 1
        if fixed:
            lines.append(f"| {family} | " + cells(data["mean"][0]))
        else:
            lines += [f"| {family} at F ≥ {level:g} | " + cells(entry) for level, entry in zip(levels, data["mean"])]
    return lines
