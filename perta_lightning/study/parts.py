"""A study in parts: each finished seed as one small JSON file, so that seeds can run in several invocations, on
several machines, and ``perta study`` aggregates them without the seeds' run folders.

A part file ``<parts>/<phase>_seed_<s>.json`` (phase ``validation`` or ``test``) holds:

* ``format`` (:data:`PART_FORMAT`), ``phase``, ``seed``;
* ``settings`` and ``settings_digest``: what determines the seed's results (:func:`study_settings`, and for a
  test seed the validation choice, :func:`test_phase_settings`) and the SHA-256 of their canonical JSON
  (:func:`settings_digest`); a part whose digest is not this invocation's is refused, naming the keys that differ;
* ``splits``: per forget split its :class:`~perta_lightning.study.split_report.SplitReport` (rows, matched,
  search evaluations, costs, the weight files relative to the seed's run folder) and what the aggregate reads
  besides: the forget examples of the θ_retain evaluation and the split's ``diagnostic.json``;
* ``wall_seconds`` (this seed's run in its invocation) and ``stage_seconds`` (every stage record of the seed,
  however often resumed);
* ``machine`` (:func:`perta_lightning.provenance.machine_info` of the process that ran the seed), ``versions``
  (python, torch, transformers, lightning, perta-lightning) and ``commit`` (the package's git commit, ``None``
  outside a checkout).

Reading a part back gives the :class:`SeedPart` that running the seed gives, so the aggregate is the same.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from perta_lightning.errors import PertaValueError
from perta_lightning.io import atomic_write_text
from perta_lightning.stages import RECORD_DIR, plain
from perta_lightning.study.split_report import SplitReport
from perta_lightning.study.weights import WeightFiles

PART_FORMAT = "perta-study-part/1"
PHASES = ("validation", "test")
PART_KEYS = ("format", "phase", "seed", "settings", "settings_digest", "splits", "wall_seconds", "stage_seconds",
             "machine", "versions", "commit")
SPLIT_KEYS = ("forget_split", "rows", "matched", "search_evaluations", "costs", "weights", "forget_examples",
              "diagnostic")


@dataclass
class SeedPart:
    """One finished seed of a study: its reports, what the aggregate reads beside them, where it ran, and the
    settings it ran under."""

    phase: str
    seed: int
    reports: list[SplitReport]
    forget_examples: dict[str, int | None]
    diagnostics: dict[str, Any]
    wall_seconds: float
    stage_seconds: float
    machine: dict[str, Any]
    versions: dict[str, str | None]
    commit: str | None
    settings: dict[str, Any]
    settings_digest: str

    def provenance(self) -> dict[str, Any]:
        """What ``study.json``'s ``parts`` says of this seed: where and on what it ran, and how long."""
        return {"machine": self.machine, "versions": self.versions, "commit": self.commit,
                "wall_seconds": self.wall_seconds, "stage_seconds": self.stage_seconds,
                "settings_digest": self.settings_digest}


def part_path(folder: str | Path, phase: str, seed: int) -> Path:
    return Path(folder) / f"{phase}_seed_{seed}.json"


def _file_sha256(path: str) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None  # the stage that reads it says so


def run_settings(options: Any, run: Any) -> dict[str, Any]:
    """The result-determining part of a run's options, resolved (the preset with its overrides, the default
    baselines, search and splits filled in). Locations are kept as given, not resolved, so that a checkout
    elsewhere agrees; ``eval_files`` count by their contents. The accelerator and device count are left out
    (float-kernel differences only, recorded in ``machine``); a precision other than float32 is in."""
    return {
        "benchmark": run.benchmark.name,
        "preset": options.preset,
        "preset_fields": run.preset,
        "forget_splits": list(run.forget_splits),
        "baselines": [asdict(b) | {"label": b.label} for b in run.baselines],
        "baseline_points": run.baseline_points,
        "search": run.search,
        "source": options.source,
        "muse_source": options.muse_source,
        "eval_files": None if run.eval_files is None else {
            split: {"sha256": _file_sha256(path)} for split, path in sorted(run.eval_files.items())},
        "base_model": options.base_model,
        "runtime": run.runtime.settings(),
        **({} if run.attacks is None else {"attacks": run.attacks}),  # left out without: older parts still agree
    }


def study_settings(plan: Any, attacks: bool = False) -> dict[str, Any]:
    """What determines a validation seed's results (and, with the choice, a test seed's): the resolved run
    options, the candidates, the proposed variants, the baselines' settings compared, ``importance_at_base``
    and the replication rules; with ``attacks`` (a test seed's), the attacks too (validation seeds run none)."""
    from dataclasses import replace

    return plain({
        "run": run_settings(plan.options, plan.run if attacks else replace(plan.run, attacks=None)),
        "candidates": [asdict(c) | {"label": c.label} for c in plan.candidates],
        "proposed": [asdict(v) | {"label": v.label} for v in plan.proposed],
        "baseline_candidates": [asdict(b) | {"label": b.label} for b in plan.baseline_candidates],
        "importance_at_base": plan.importance_at_base,
        "rules": plan.rules,
    })


def test_phase_settings(study: dict[str, Any], families: dict[str, str], variants: list[Any],
                        baselines: list[Any]) -> dict[str, Any]:
    """A test seed's settings: the study's, and the validation choice (the families reported, the PerTA
    variants run and each baseline's chosen setting)."""
    return plain(study | {"choice": {"families": dict(families),
                                     "variants": [asdict(v) | {"label": v.label} for v in variants],
                                     "baselines": [asdict(b) | {"label": b.label} for b in baselines]}})


def settings_digest(settings: dict[str, Any]) -> str:
    """SHA-256 of the settings' canonical JSON (sorted keys, no spaces)."""
    canonical = json.dumps(settings, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def differing_keys(first: Any, second: Any, prefix: str = "") -> list[str]:
    """The dotted keys at which two JSON values differ (a list that differs is named as a whole)."""
    if isinstance(first, dict) and isinstance(second, dict):
        out = []
        for key in sorted(set(first) | set(second)):
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in first or key not in second:
                out.append(name)
            else:
                out += differing_keys(first[key], second[key], name)
        return out
    return [] if first == second else [prefix or "(all)"]


def package_versions() -> dict[str, str | None]:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("torch", "transformers", "lightning", "perta-lightning"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def package_commit() -> str | None:
    """The git commit of the checkout this package is imported from (``+dirty`` when tracked files changed),
    ``None`` when it is not a checkout or git is missing."""
    folder = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=30)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _forget_examples(seed_folder: Path, report: SplitReport) -> int | None:
    """How many forget examples the forgetting axis compares (from this seed's θ_retain evaluation)."""
    row = next(r for r in report.rows if r["method"] == "retain")
    try:
        return len(json.loads((seed_folder / row["eval_file"]).read_text())["examples"]["forget"]["index"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _diagnostic(seed_folder: Path, split: str) -> Any:
    try:
        return json.loads((seed_folder / split / "diagnostic.json").read_text())
    except (OSError, ValueError):
        return None  # a seed without PerTA variants writes none


def _stage_seconds(seed_folder: Path) -> float:
    """Seconds of every stage record of the seed (what its work cost, however often resumed)."""
    total = 0.0
    for path in seed_folder.glob(f"{RECORD_DIR}/**/*.json"):
        try:
            total += json.loads(path.read_text())["seconds"]
        except (OSError, ValueError, KeyError):
            continue
    return total


def seed_part(phase: str, seed: int, reports: list[SplitReport], seed_folder: Path, wall_seconds: float,
              machine: dict[str, Any], settings: dict[str, Any]) -> SeedPart:
    """The part of a seed that has just run in ``seed_folder``: everything the aggregate reads from that folder
    is read here, once."""
    return SeedPart(phase, seed, reports, {r.forget_split: _forget_examples(seed_folder, r) for r in reports},
                    {r.forget_split: _diagnostic(seed_folder, r.forget_split) for r in reports}, wall_seconds,
                    _stage_seconds(seed_folder), machine, package_versions(), package_commit(), settings,
                    settings_digest(settings))


def _relative(path: Path, folder: Path) -> str:
    try:
        return Path(path).resolve().relative_to(folder.resolve()).as_posix()
    except ValueError:
        return str(path)


def part_json(part: SeedPart, seed_folder: Path) -> dict[str, Any]:
    """The part file's content; weight files are named relative to the seed's run folder."""
    splits = [{"forget_split": r.forget_split, "rows": r.rows, "matched": r.matched,
               "search_evaluations": r.search_evaluations, "search_screens": r.search_screens, "costs": r.costs,
               "weights": {label: {"forget": _relative(w.forget, seed_folder),
                                   "retain": _relative(w.retain, seed_folder), "beta": w.beta, "power": w.power}
                           for label, w in r.weights.items()},
               "forget_examples": part.forget_examples[r.forget_split],
               "diagnostic": part.diagnostics[r.forget_split],
               **({"robustness": r.robustness} if r.robustness else {})} for r in part.reports]
    return {"format": PART_FORMAT, "phase": part.phase, "seed": part.seed, "settings": part.settings,
            "settings_digest": part.settings_digest, "splits": splits, "wall_seconds": part.wall_seconds,
            "stage_seconds": part.stage_seconds, "machine": part.machine, "versions": part.versions,
            "commit": part.commit}


def write_part(folder: str | Path, part: SeedPart, seed_folder: Path) -> Path:
    """Write ``<folder>/<phase>_seed_<s>.json`` atomically; return its path."""
    path = part_path(folder, part.phase, part.seed)
    atomic_write_text(path, json.dumps(part_json(part, seed_folder), indent=1))
    return path


def read_part(path: Path, phase: str, seed: int, settings: dict[str, Any], seed_folder: Path) -> SeedPart:
    """The part file at ``path`` for ``phase`` seed ``seed``, refused in one line naming the file when it cannot
    be read, is not such a part, or was made under other settings (naming the keys that differ)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise PertaValueError(f"{path}: cannot read the study part ({error}); delete it to run the seed again") \
            from error
    if not isinstance(data, dict) or data.get("format") != PART_FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise PertaValueError(f"{path}: not a study part (format {found!r}, expected {PART_FORMAT!r})")
    missing = [key for key in PART_KEYS if key not in data]
    if missing:
        raise PertaValueError(f"{path}: the study part has no key(s) {missing}")
    if data["phase"] != phase or data["seed"] != seed:
        raise PertaValueError(f"{path}: holds {data['phase']} seed {data['seed']}, not {phase} seed {seed}")
    if data["settings_digest"] != settings_digest(settings):
        keys = differing_keys(data["settings"], settings)
        raise PertaValueError(f"{path}: made under other settings than this study's (settings_digest "
                              f"{str(data['settings_digest'])[:12]}… != {settings_digest(settings)[:12]}…); they "
                              f"differ in {', '.join(keys) or 'nothing stored: the digest does not match its settings'}")
    reports, forget_examples, diagnostics = [], {}, {}
    for index, split in enumerate(data["splits"]):
        absent = [key for key in SPLIT_KEYS if not isinstance(split, dict) or key not in split]
        if absent:
            raise PertaValueError(f"{path}: splits[{index}] has no key(s) {absent}")
        name = split["forget_split"]
        weights = {label: WeightFiles(seed_folder / w["forget"], seed_folder / w["retain"], w["beta"], w["power"])
                   for label, w in split["weights"].items()}
        reports.append(SplitReport(name, split["rows"], split["matched"], split["search_evaluations"],
                                   split["costs"], weights, split.get("search_screens", {}),
                                   split.get("robustness", {})))
        forget_examples[name] = split["forget_examples"]
        diagnostics[name] = split["diagnostic"]
    return SeedPart(phase, seed, reports, forget_examples, diagnostics, data["wall_seconds"], data["stage_seconds"],
                    data["machine"], data["versions"], data["commit"], data["settings"], data["settings_digest"])
