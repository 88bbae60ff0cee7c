"""The unlearning cost of each method of one seed's forget split, read from the stage records.

A method is charged everything it needs beyond the target model, as if it ran alone (stages two methods
share are charged to each):

* TV: the reinforced model θ_r, every merge round of its α search and every evaluation and screening of the
  search (the report's ``search_stages`` name the merges and screenings, its rows the evaluations);
* a PerTA variant: the same, plus its importance stages (and the stage that transforms them, if any);
* a training-based baseline: its one training run and the evaluation of every point of its curve (the models it
  kept along the way), as the α search's evaluations count for TV and PerTA.

Each stage contributes its wall seconds (as its record measured them, on the threads it had) and its
machine-free counts (:meth:`perta_lightning.stages.Stage.work`): example passes forward and backward, bytes
read and written by merges, evaluations.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from perta_lightning.stages import RECORD_DIR

COUNTS = ("forward", "backward", "bytes_read", "bytes_written", "evaluations", "screens")


def _record(root: Path, name: str) -> dict[str, Any]:
    path = root / RECORD_DIR / f"{name}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        from perta_lightning.errors import PertaValueError

        raise PertaValueError(f"{path}: cannot read the stage record ({error})") from error


def _kind(name: str) -> str:
    if "/eval/" in name:
        return "evaluation"
    if "/screen/" in name:
        return "screening"
    if "/importance/" in name:
        return "importance"
    if name.endswith("/models/reinforced"):
        return "reinforce"
    if "/round_" in name:
        return "merge"
    return "training"


def _charge(root: Path, names: list[str]) -> dict[str, Any]:
    seconds: dict[str, float] = {}
    counts = dict.fromkeys(COUNTS, 0.0)
    for name in names:
        record = _record(root, name)
        kind = _kind(name)
        seconds[kind] = seconds.get(kind, 0.0) + record["seconds"]
        for key, value in record.get("work", {}).items():
            counts[key] = counts.get(key, 0.0) + value
    return {"seconds": sum(seconds.values()), "seconds_by_kind": seconds, **counts, "stages": len(names)}


def _importance_stages(root: Path, name: str) -> list[str]:
    """An importance stage and the importance stages it was made from (a transform reads a raw one)."""
    found = [name]
    for parent in _record(root, name)["inputs"]:
        if "/importance/" in parent:
            found += _importance_stages(root, parent)
    return found


def method_costs(root: str | Path, report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per method of a split's ``report`` (its ``report.json`` data), the cost as the module docstring says.

    ``root`` is the seed's run folder (where ``stages/`` is).
    """
    root = Path(root)
    split = report["settings"]["forget_split"]
    methods = list(dict.fromkeys(row["method"] for row in report["rows"] if row["family"] != "reference"))
    out = {}
    for method in methods:
        rows = [row for row in report["rows"] if row["method"] == method]
        evaluations = [str(Path(row["eval_file"]).with_suffix("").as_posix()) for row in rows]
        if rows[0]["family"] == "baseline":  # the points lie in <training stage>/epoch_<k>/
            names = [re.sub(r"/epoch_\d+$", "", rows[0]["model_dir"]), *evaluations]
        else:
            # a round's models lie in round_<k>/alpha_<α>/, or in round_<k>/ itself when it merged one α
            merges = sorted({re.sub(r"(/round_\d+)/.*$", r"\1", row["model_dir"]) for row in rows})
            searched = report.get("search_stages", {}).get(method, [])  # merges and screenings (none in old reports)
            names = list(dict.fromkeys([f"{split}/models/reinforced", *merges, *searched, *evaluations]))
            if method in report.get("importance", {}):
                importance = Path(report["importance"][method]["forget"]).parent.as_posix()
                names += _importance_stages(root, importance)
        out[method] = _charge(root, names)
    return out
