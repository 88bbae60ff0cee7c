"""The README's and bench/RESULTS.md's figures, generated from finished runs, never typed.

    python scripts/results.py collect [--demo runs/study] [--replication runs/replication] [--muse runs/muse_study]
    python scripts/results.py render      # rewrite the generated blocks of README.md and bench/RESULTS.md
    python scripts/results.py check       # exit 1 when a generated block is not what the results give

``collect`` copies each finished study's ``study.json`` and ``replication.json`` into ``bench/results/<name>/``
(committed: they are the runs the documents quote, with the machine and every model's digest, so another
machine's run can be compared with ``perta compare``). ``render`` replaces every block between
``<!-- generated: NAME -->`` and ``<!-- /generated: NAME -->`` with what ``BLOCKS[NAME]`` makes of those
files; ``check`` (run by the tests) fails when a block was edited by hand or the results changed without
a render.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
DOCUMENTS = [REPO / "README.md", REPO / "bench" / "RESULTS.md"]
BLOCK = re.compile(r"(<!-- generated: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /generated: (?P=name) -->)", re.S)

sys.path.insert(0, str(REPO))


def _load(name: str, file: str) -> dict[str, Any]:
    return json.loads((RESULTS / name / file).read_text())


def _duration(seconds: float) -> str:
    from perta_lightning.study.replication import _duration as duration

    return duration(seconds)


def _evaluations(result: dict[str, Any]) -> int:
    return sum(len(rows) for phase in result["models"].values() for splits in phase.values()
               for rows in splits.values())


def main_command() -> str:
    """The README's main command: its time, memory and size, from the demo study's own record."""
    result = _load("demo", "study.json")
    run, machine = result["invocation"], result["machine"]
    seeds = len(result["validation"]["seeds"]) + len(result["test"]["seeds"])
    return (f"Measured on a {machine['cpu_count']}-core {machine['cpu_model']} (torch {machine['torch']}, "
            f"{machine['aten_cpu_capability']} kernels), `.venv` already installed: `bash scripts/demo.sh` ran the "
            f"whole study in **{_duration(run['wall_seconds'])}** (peak memory {run['peak_rss_gib']:.1f} GiB, the "
            f"largest process) — {seeds} seeds ({len(result['validation']['seeds'])} validation, "
            f"{len(result['test']['seeds'])} test), {_evaluations(result)} evaluations, "
            f"{run['torch_threads_per_seed']} torch thread(s) per seed, {result['settings']['jobs']} seed(s) at once.\n")


def _demote(markdown: str, levels: int = 2) -> str:
    return re.sub(r"^(#+) ", lambda m: "#" * (len(m.group(1)) + levels) + " ", markdown, flags=re.M)


def demo_results() -> str:
    """The demo study's test-seed tables (``study.md``), from its ``study.json``."""
    from perta_lightning.study.study_report import study_markdown

    body = study_markdown(_load("demo", "study.json")).split("\n", 2)[2]  # without the title
    return _demote(body, 1).strip() + "\n"


def replication_summary() -> str:
    """The replication's claims table, this project's variants and where it ran, from ``replication.json``."""
    from perta_lightning.study.replication import claims_table, machine_line

    table = _load("replication", "replication.json")
    lines = [f"Preset `{table['preset']}`, test seeds {table['test_seeds']}, validation seeds "
             f"{table['validation_seeds']}, forget splits {table['splits']}, Forget Quality levels "
             f"{table['levels']}. {machine_line(table)}", ""]
    lines += [line for line in claims_table(table) if "Δ recovery" not in line]  # claim 5's parts: its own block
    lines += [""]
    for own in table["own_variants"]:
        if own["validation_score"] is not None and not own["accepted_on_validation"]:
            lines.append(f"- This project's `{own['label']}`: rejected on the validation seeds (score "
                         f"{own['validation_score']:.3f} against {own['against_score']:.3f} for `{own['against']}`).")
        else:
            lines.append(f"- This project's `{own['label']}`: on the test seeds, against TV {own.get('vs_tv')}, "
                         f"against `{own['against']}` {own.get('vs_paper')}; {'kept' if own['kept'] else 'not kept'}.")
    return "\n".join(lines).strip() + "\n"


def replication_reading() -> str:
    """What each claim's verdict rests on, listed from ``replication.json`` (so the prose cannot drift)."""
    table = _load("replication", "replication.json")
    lines = []
    for claim in table["claims"]:
        rows = [r for r in table["rows"] if r["claim"] == claim["claim"]]
        grouped: dict[str, dict[str, list[str]]] = {}
        for row in rows:
            where = "" if row["split"] == "pooled" else f" ({row['split']})"
            grouped.setdefault(row["quantity"], {}).setdefault(row["verdict"], []).append(
                f"{row['comparison']}{where}")
        parts = " ".join(f"{quantity}: " + "; ".join(f"*{verdict}* for {', '.join(names)}"
                                                     for verdict, names in verdicts.items()) + "."
                         for quantity, verdicts in grouped.items())
        lines.append(f"- **Claim {claim['claim']}, {claim['verdict']}.** {parts}")
    steps = table["forget_quality_steps"]
    ladder = ", ".join(f"{split} ({entry['forget_examples']} questions) steps up to "
                       f"{max(level['reached_at'] - level['below'] for level in entry['levels']):.3f}"
                       for split, entry in steps.items())
    lines.append(f"- **How fine Forget Quality is** at the levels used: {ladder}.")
    return "\n".join(lines) + "\n"


def replication_full() -> str:
    """All of ``REPLICATION.md`` (for bench/RESULTS.md), from ``replication.json``."""
    from perta_lightning.study.replication import replication_markdown

    body = replication_markdown(_load("replication", "replication.json")).split("\n", 2)[2]
    return _demote(body).strip() + "\n"


def robustness() -> str:
    """Claim 5's parts as one table (comparison × attack), θ_retain's own recovery and the attacks' cost, from the
    replication's ``replication.json`` and ``study.json``."""
    from perta_lightning.study.replication import recovery_table

    table, result = _load("replication", "replication.json"), _load("replication", "study.json")
    rows = [r for r in table["rows"] if r["claim"] == "5"]
    if not rows:
        return "The replication ran no attacks.\n"
    attacks = list(dict.fromkeys(r["attack"] for r in rows))
    comparisons = list(dict.fromkeys(r["comparison"] for r in rows))
    lines = ["| PerTA's recovery − the other's | " + " | ".join(attacks) + " |", "|---|" + "---|" * len(attacks)]
    for comparison in comparisons:
        cells = []
        for attack in attacks:
            row = next(r for r in rows if r["comparison"] == comparison and r["attack"] == attack)
            cells.append(_estimate(row))
        lines.append(f"| {comparison} | " + " | ".join(cells) + " |")
    claim = next(c for c in table["claims"] if c["claim"] == "5")
    lines += ["", f"Claim 5 as a whole: **{claim['verdict']}**. Each cell: the mean over test seeds of PerTA's recovery "
              "minus the other method's (per seed, over the levels and splits where both are defined; lower is "
              "better for PerTA), its 95 % interval, the test seeds where PerTA recovered more – less, and the verdict.", ""]
    lines += recovery_table(table) + [""]
    attacked = result["test"].get("attacks", {})
    lines += ["| split | attack | θ_retain's own recovery (the attack alone) | attack stages per seed |",
              "|---|---|---|---|"]
    for split, per_attack in attacked.items():
        for attack, summary in per_attack.items():
            retain, seconds = summary["retain"], summary["seconds"]
            own = "–" if retain["mean"] is None else f"{retain['mean']:+.3f} ± {retain['std'] or 0:.3f}"
            lines.append(f"| {split} | {attack} | {own} | {seconds['mean']:.0f} s |")
    return "\n".join(lines) + "\n"


def diagnostic() -> str:
    """The diagnostic's per-split medians (bench/bench_diagnostic.py's JSON)."""
    data = json.loads((RESULTS / "diagnostic.json").read_text())
    lines = ["| study | split | variant | median ρ(s_f, s_r) | median kept share of ‖τ‖² | uniform importance "
             "would keep | mean edge over TV (seeds) |", "|---|---|---|---|---|---|---|"]
    for name, summary in data.items():
        for split, families in summary["splits"].items():
            for family, entry in families.items():
                edges = [s["edge_over_tv"] for s in entry["seeds"] if s["edge_over_tv"] is not None]
                mean = f"{sum(edges) / len(edges):+.3f} ({len(edges)})" if edges else "–"
                lines.append(f"| {name} (`{summary['preset']}`) | {split} | `{entry['label']}` | "
                             f"{entry['median_rank_correlation']:.3f} | {entry['median_kept_share']:.3f} | "
                             f"{entry['seeds'][0]['uniform_kept_share']:.3f} | {mean} |")
    return "\n".join(lines) + "\n"


def muse_command() -> str:
    """The MUSE study's time, memory and size, from its own record."""
    result = _load("muse", "study.json")
    run, machine = result["invocation"], result["machine"]
    return (f"Measured on a {machine['cpu_count']}-core {machine['cpu_model']} (torch {machine['torch']}, "
            f"{machine['aten_cpu_capability']} kernels): `perta study --config configs/demo/muse_study.yaml` took "
            f"**{_duration(run['wall_seconds'])}** (peak memory {run['peak_rss_gib']:.1f} GiB, the largest process) "
            f"for {len(result['validation']['seeds'])} validation and {len(result['test']['seeds'])} test seeds, "
            f"{_evaluations(result)} evaluations, {result['settings']['jobs']} seed(s) at once.\n")


def muse_results() -> str:
    """The MUSE study's test-seed tables (``study.md``), from its ``study.json``."""
    from perta_lightning.study.study_report import study_markdown

    body = study_markdown(_load("muse", "study.json")).split("\n", 2)[2]
    return _demote(body, 1).strip() + "\n"


def muse_replication() -> str:
    """The paper's claims measured on MUSE (``REPLICATION.md`` of the MUSE study), from its ``replication.json``."""
    from perta_lightning.study.replication import claims_table, machine_line

    table = _load("muse", "replication.json")
    return "\n".join([machine_line(table), "", *claims_table(table)]).strip() + "\n"


def muse_parity() -> str:
    """The largest differences from open-unlearning's MUSE metric code (``bench/bench_muse_parity.py``'s JSON)."""
    data = json.loads((RESULTS / "muse_parity.json").read_text())
    groups: dict[str, list[tuple[float, float]]] = {}
    for key, difference in data["max_abs_diff"].items():
        groups.setdefault(key.split("[")[0], []).append((difference, data["max_abs_theirs"][key]))
    lines = [f"open-unlearning at `{data['commit']}`; largest |ours − theirs| over both architectures and the "
             "three models.", "", "| metric | max abs difference | max abs value (theirs) |", "|---|---|---|"]
    for name, pairs in groups.items():
        lines.append(f"| `{name}` | {max(d for d, _ in pairs):.2g} | {max(v for _, v in pairs):.3g} |")
    return "\n".join(lines) + "\n"


def baseline_parity() -> str:
    """SimNPO's and RMU's losses against open-unlearning's own (``bench/bench_baseline_parity.py``'s JSON)."""
    data = json.loads((RESULTS / "baseline_parity.json").read_text())
    lines = [f"open-unlearning at `{data['open_unlearning_commit'][:7]}`; one batch of 3 forget and 3 retain pairs, a "
             "random 3-layer Llama (RMU on layer 1), at the target and after 5 SGD steps on the forget answers.", "",
             "| loss | model | theirs | ours | abs difference | their formula from our per-example terms |",
             "|---|---|---|---|---|---|"]
    for case, losses in data["cases"].items():
        for name, entry in losses.items():
            rebuilt = entry.get("their_formula_from_our_terms")
            lines.append(f"| {'SimNPO' if name == 'simnpo' else 'RMU'} | {case} | {entry['theirs']:.6g} | "
                         f"{entry['ours']:.6g} | {entry['abs_diff']:.2g} | "
                         + ("–" if rebuilt is None else f"{rebuilt:.6g} (differs by {entry['abs_diff_their_formula']:.2g})")
                         + " |")
    return "\n".join(lines) + "\n"


def _claim1_baseline_rows(table: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Claim 1's rows against a training-based method, by comparison."""
    return {r["comparison"]: r for r in table["rows"] if r["claim"] == "1" and "TV" not in r["comparison"].split(" vs ")[1]}


def _signed(value: float) -> str:
    """``value`` to three decimals with its sign, a rounded zero as ``+0.000`` whatever its float sign."""
    text = f"{value:+.3f}"
    return "+0.000" if text == "-0.000" else text


def _estimate(row: dict[str, Any] | None) -> str:
    if row is None:
        return "– (not run)"
    interval = "" if row["interval"] is None else f" [{_signed(row['interval'][0])}, {_signed(row['interval'][1])}]"
    return f"{_signed(row['estimate'])}{interval}, {row['wins']}–{row['losses']}: {row['verdict']}"


def _yardstick(old: dict[str, Any], new: dict[str, Any]) -> str:
    """How far the comparisons that did not change moved between the two runs (PerTA against TV): what the
    baselines' rows would move by with no change to the baselines at all."""
    def against_tv(table: dict[str, Any]) -> dict[str, dict[str, Any]]:
        return {r["comparison"]: r for r in table["rows"] if r["claim"] == "1" and r["comparison"].endswith(" vs TV")}

    before, after = against_tv(old), against_tv(new)
    moves = [f"{c} from {_signed(before[c]['estimate'])} to {_signed(after[c]['estimate'])}" for c in before if c in after]
    cpus = (old["machine"].get("cpu_model"), new["machine"].get("cpu_model"))
    where = (f"The one-point run was made on {cpus[0]}, this one on {cpus[1]}, whose float kernels train other "
             "models from the same seeds" if cpus[0] != cpus[1] else "Both runs were made on the same kind of CPU")
    return (f" {where}. For scale, PerTA's comparisons with TV (methods this work did not touch): "
            f"{'; '.join(moves)}." if moves else "")


def baseline_curves_against_one_point() -> str:
    """Claim 1 against the training-based methods, judged on one point each (the previous runs, kept in
    ``bench/results/one_point_baselines/``) and on their curves (the runs now in ``bench/results/``)."""
    lines = []
    for name, title, old_file in (("replication", "TOFU, the replication preset", "replication.json"),
                                  ("muse", "MUSE, the synthetic news study", "muse_replication.json")):
        old_table, new_table = json.loads((RESULTS / "one_point_baselines" / old_file).read_text()), _load(
            name, "replication.json")
        old, new = _claim1_baseline_rows(old_table), _claim1_baseline_rows(new_table)
        lines += [f"**{title}**: PerTA's edge in the utility kept at matched forgetting, pooled over splits, mean "
                  "over test seeds [95 % interval], wins–losses: verdict.", "",
                  "| comparison | one point per baseline | a curve per baseline | edge moved by | verdict changed |",
                  "|---|---|---|---|---|"]
        changes, fresh = [], []
        for comparison in list(dict.fromkeys([*old, *new])):
            before, after = old.get(comparison), new.get(comparison)
            changed = "new method" if before is None else ("–" if after is None else
                                                           ("no" if before["verdict"] == after["verdict"] else
                                                            f"**{before['verdict']} → {after['verdict']}**"))
            moved = "–" if before is None or after is None else _signed(after["estimate"] - before["estimate"])
            lines.append(f"| {comparison} | {_estimate(before)} | {_estimate(after)} | {moved} | {changed} |")
            if changed.startswith("**"):
                changes.append(f"{comparison} ({changed.strip('*')}, the edge moved by {moved})")
            elif before is None and after is not None:
                fresh.append(f"{comparison} *{after['verdict']}*")
        compared = sum(1 for c in old if c in new)
        lines += ["", f"Verdicts changed by the curves: {len(changes)} of the {compared} comparisons judged before"
                  + (": " + "; ".join(changes) if changes else "") + "."
                  + (" Against the new methods: " + ", ".join(fresh) + "." if fresh else "")
                  + _yardstick(old_table, new_table), ""]
    return "\n".join(lines).strip() + "\n"


BLOCKS = {"main-command": main_command, "demo-results": demo_results, "replication": replication_summary,
          "replication-reading": replication_reading,
          "replication-full": replication_full, "diagnostic": diagnostic, "muse-command": muse_command,
          "muse-results": muse_results, "muse-replication": muse_replication, "muse-parity": muse_parity,
          "baseline-parity": baseline_parity, "baseline-curves": baseline_curves_against_one_point,
          "robustness": robustness}


def render_text(text: str) -> str:
    """``text`` with every generated block made anew."""
    def replace(match: re.Match) -> str:
        name = match.group("name")
        if name not in BLOCKS:
            raise SystemExit(f"unknown generated block {name!r}; known: {sorted(BLOCKS)}")
        return match.group(1) + BLOCKS[name]() + match.group(4)

    return BLOCK.sub(replace, text)


def collect(demo: str | None, replication: str | None, muse: str | None = None) -> None:
    for name, folder in (("demo", demo), ("replication", replication), ("muse", muse)):
        if folder is None:
            continue
        target = RESULTS / name
        target.mkdir(parents=True, exist_ok=True)
        for file in ("study.json", "replication.json", "REPLICATION.md", "study.md"):
            shutil.copyfile(Path(folder) / file, target / file)
        print(f"[results] {folder} -> {target.relative_to(REPO)}")


def main(argv: list[str]) -> int:
    import argparse

    from perta_lightning.io import atomic_write_text

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("verb", choices=["collect", "render", "check"])
    parser.add_argument("--demo", default=None)
    parser.add_argument("--replication", default=None)
    parser.add_argument("--muse", default=None)
    args = parser.parse_args(argv)
    if args.verb == "collect":
        collect(args.demo, args.replication, args.muse)
        return 0
    stale = []
    for document in DOCUMENTS:
        text = document.read_text()
        fresh = render_text(text)
        if fresh != text:
            stale.append(document.relative_to(REPO).as_posix())
            if args.verb == "render":
                atomic_write_text(document, fresh)
    if args.verb == "check" and stale:
        print(f"[results] generated blocks out of date in {stale}: run python scripts/results.py render")
        return 1
    print(f"[results] {'rewrote ' + ', '.join(stale) if stale and args.verb == 'render' else 'up to date'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
