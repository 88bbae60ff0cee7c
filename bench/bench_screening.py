"""Screening the α search (issue 25): full evaluations, screenings and search seconds per method, with and without.

    PYTHONPATH=. python bench/bench_screening.py [--preset tiny] [--repeats 3] [--prefix runs/bench_screening]

Builds one seed's stages up to the α searches once (``--prefix``: reused when it already holds them), then, for
each repetition and each mode (``search.screen`` false, then true), copies that folder, removes every search
stage (merges, screenings, evaluations) so that each reruns, and runs ``perta pipeline`` on the copy in a
subprocess. Per method it prints the full evaluations and screenings the search made and its search seconds (the
stage records' seconds of its merges, screenings and evaluations), and the median over the repetitions; the
matched tables of the two modes are compared and a difference is printed.

The script runs ``python -m perta_lightning`` with the ``PYTHONPATH`` it is given, so it measures that checkout.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SPLIT = "forget10"
METHODS = ("tv", "perta_grad", "perta_fisher")


def run_pipeline(output: Path, preset: str, screen: bool) -> float:
    """One ``perta pipeline`` of seed 0 (TV, PerTA grad and Fisher, no baselines) into ``output``; its wall seconds."""
    config = output.parent / f"{output.name}.yaml"
    config.write_text(json.dumps({"output": str(output), "preset": preset, "seed": 0, "baselines": [],
                                  "search": {"rounds": 2, "screen": screen}}))
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "perta_lightning", "pipeline", "--config", str(config)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"perta pipeline failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def strip_searches(root: Path) -> None:
    """Remove every search stage (record and artifact) of the methods, so that a run remakes its searches."""
    for base in (root, root / "stages"):
        for kind in ("models", "eval", "screen"):
            for method in METHODS:
                for path in (base / SPLIT / kind / method, base / SPLIT / kind / f"{method}.json"):
                    if path.is_dir():
                        shutil.rmtree(path)
                    elif path.exists():
                        path.unlink()


def search_seconds(root: Path, report: dict, method: str) -> float:
    """The stage records' seconds of one method's merges, screenings and full evaluations."""
    names = list(report.get("search_stages", {}).get(method, []))
    names += [row["eval_file"].removesuffix(".json") for row in report["rows"] if row["method"] == method]
    return sum(json.loads((root / "stages" / f"{name}.json").read_text())["seconds"] for name in dict.fromkeys(names))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prefix", default=None, help="folder of the shared stages (built when missing)")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="bench_screening_"))
    prefix = Path(args.prefix) if args.prefix else scratch / "prefix"
    if not (prefix / SPLIT / "report.json").exists():
        print(f"building the shared stages in {prefix} ...", flush=True)
        run_pipeline(prefix, args.preset, screen=False)
    results: dict[bool, list[dict]] = {False: [], True: []}
    for repeat in range(args.repeats):
        for screen in (False, True):
            root = scratch / f"run_{repeat}_{'screened' if screen else 'full'}"
            shutil.copytree(prefix, root)
            strip_searches(root)
            wall = run_pipeline(root, args.preset, screen)
            report = json.loads((root / SPLIT / "report.json").read_text())
            results[screen].append({
                "wall": wall, "matched": report["matched"],
                "methods": {m: {"evaluations": report["search_evaluations"][m],
                                "screens": report.get("search_screens", {}).get(m, 0),
                                "seconds": search_seconds(root, report, m)} for m in METHODS}})
            shutil.rmtree(root)
            print(f"repeat {repeat} screen={screen}: {wall:.1f} s", flush=True)
    for screen in (False, True):
        if any(r["matched"] != results[False][0]["matched"] for r in results[screen]):
            print(f"screen={screen}: a matched table differs from the first unscreened run's")
    print(f"\npreset {args.preset}, seed 0, {args.repeats} runs per mode (median; search seconds from stage records)")
    print("| method | full evaluations (off → on) | screenings (on) | search seconds (off → on) |")
    print("|---|---|---|---|")
    for method in METHODS:
        def median(screen: bool, key: str) -> float:
            return statistics.median(r["methods"][method][key] for r in results[screen])

        print(f"| {method} | {median(False, 'evaluations'):g} → {median(True, 'evaluations'):g} | "
              f"{median(True, 'screens'):g} | {median(False, 'seconds'):.1f} → {median(True, 'seconds'):.1f} |")
    walls = {screen: statistics.median(r["wall"] for r in results[screen]) for screen in (False, True)}
    print(f"| whole `perta pipeline` (searches rerun, the rest up to date) | | | {walls[False]:.1f} → {walls[True]:.1f} |")
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
