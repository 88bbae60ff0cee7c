"""Whether two TOFU evaluation files of one model agree: identical generations, per-example values to float noise.

    python bench/compare_evaluations.py A.json B.json [--tolerance 1e-4]

Prints, per set and per-example column, the largest absolute difference (relative for truth ratios, which are
exponentials of NLL differences) and whether the generations are identical; exits 1 when a generation differs or
a difference exceeds the tolerance. Used for the before/after figures of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys


def _flat(values):
    for value in values:
        if isinstance(value, list):
            yield from _flat(value)
        else:
            yield value


def compare(a: dict, b: dict, tolerance: float) -> bool:
    same = True
    for name, columns in a["examples"].items():
        other = b["examples"][name]
        if columns["index"] != other["index"]:
            print(f"{name}: different examples")
            return False
        for key, values in columns.items():
            if key in ("index", "question", "answer"):
                continue
            if key == "generation":
                differ = sum(x != y for x, y in zip(values, other[key]))
                print(f"{name:>13} generation: {len(values) - differ}/{len(values)} identical")
                same &= differ == 0
                continue
            worst = 0.0
            for x, y in zip(_flat(values), _flat(other[key])):
                if x is None or y is None:
                    same &= x is None and y is None
                    continue
                scale = max(1.0, abs(x)) if key == "truth_ratio" else 1.0
                worst = max(worst, abs(x - y) / scale) if math.isfinite(x - y) else math.inf
            print(f"{name:>13} {key}: max difference {worst:.2e}")
            same &= worst <= tolerance
    return same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--tolerance", type=float, default=1e-4)
    args = parser.parse_args()
    with open(args.a) as fa, open(args.b) as fb:
        ok = compare(json.load(fa), json.load(fb), args.tolerance)
    print("equal" if ok else "DIFFERENT")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
