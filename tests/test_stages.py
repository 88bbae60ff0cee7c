"""The stage machinery on toy stages: skip, rerun on damage or change, per-stage seeds, relative paths."""

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from perta_lightning.stages import Product, Progress, Stage, StageRunner, stage_seed


@dataclass(eq=False)
class Write(Stage):
    """Writes ``text`` plus a random draw (to see the stage's seed) to ``<name>.txt``."""

    name: str
    text: str
    upstream: Stage | None = None
    runs: int = 0
    description = "write a file"

    @property
    def inputs(self):
        return [self.upstream] if self.upstream is not None else []

    def settings(self):
        return {"text": self.text}

    def outputs(self):
        return [Path(f"{self.name}.txt")]

    def run(self, runner):
        self.runs += 1
        before = runner.path(Product(self.upstream, "file")).read_text() if self.upstream else ""
        out = runner.root / f"{self.name}.txt"
        out.write_text(f"{before}{self.text}:{torch.rand(1).item():.6f}\n")
        return {"file": out}


def run(root, stages, seed=0):
    runner = StageRunner(root, seed, Progress(stream=open("/dev/null", "w")))
    runner.run_all(stages)
    return runner


def test_stage_seeds_depend_on_run_seed_and_name_only():
    assert stage_seed(0, "models/full") == stage_seed(0, "models/full")
    assert len({stage_seed(0, "a"), stage_seed(0, "b"), stage_seed(1, "a")}) == 3


def test_skipping_a_stage_does_not_shift_the_next_stages_random_numbers(tmp_path):
    a, b = Write("a", "x"), Write("b", "y")
    run(tmp_path / "full", [a, b])
    run(tmp_path / "only_b", [Write("b", "y")])
    assert (tmp_path / "full" / "b.txt").read_text() == (tmp_path / "only_b" / "b.txt").read_text()


def test_up_to_date_stages_are_skipped_and_changes_rerun_downstream(tmp_path):
    a = Write("a", "x")
    b = Write("b", "y", upstream=a)
    run(tmp_path, [a, b])
    a2, b2 = Write("a", "x"), Write("b", "y", upstream=None)
    b2.upstream = a2
    run(tmp_path, [a2, b2])
    assert (a2.runs, b2.runs) == (0, 0)
    a3 = Write("a", "changed")
    b3 = Write("b", "y", upstream=a3)
    run(tmp_path, [a3, b3])
    assert (a3.runs, b3.runs) == (1, 1)  # b's input changed bytes, so b reruns with the same settings


@pytest.mark.parametrize("damage", ["delete", "truncate", "rewrite"])
def test_a_damaged_output_reruns_its_stage(tmp_path, damage):
    run(tmp_path, [Write("a", "x")])
    out = tmp_path / "a.txt"
    if damage == "delete":
        out.unlink()
    elif damage == "truncate":
        out.write_text(out.read_text()[:3])
    else:
        out.write_text(out.read_text().replace("x", "z"))
    again = Write("a", "x")
    run(tmp_path, [again])
    assert again.runs == 1 and out.read_text().startswith("x:")


def test_records_hold_relative_paths(tmp_path, monkeypatch):
    run(tmp_path / "r", [Write("a", "x")])
    record = json.loads((tmp_path / "r" / "stages" / "a.json").read_text())
    assert record["files"][0]["path"] == "a.txt" and record["products"] == {"file": "a.txt"}
    monkeypatch.chdir(tmp_path)
    again = Write("a", "x")
    run(Path("r"), [again])
    assert again.runs == 0


def test_a_fresh_run_in_a_relative_folder_records_paths_inside_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = Write("a", "x")
    b = Write("b", "y", upstream=a)
    runner = run(Path("runs") / "r", [a, b])
    record = json.loads((tmp_path / "runs" / "r" / "stages" / "b.json").read_text())
    assert record["products"] == {"file": "b.txt"} and record["files"][0]["path"] == "b.txt"
    assert runner.path(Product(a, "file")) == tmp_path / "runs" / "r" / "a.txt"
    assert (tmp_path / "runs" / "r" / "b.txt").read_text().startswith("x:")


def test_estimate_uses_each_kind_of_stage_own_pace():
    """What is left is priced per kind of stage once that kind has run, else at the pace of all so far."""

    @dataclass(eq=False)
    class Evaluate(Write):
        cost: float = 0.3

    progress = Progress(stream=open("/dev/null", "w"))
    train = [Write(f"t{i}", "x") for i in range(2)]  # cost 1.0 each
    evals = [Evaluate(f"e{i}", "x") for i in range(3)]
    progress.plan([*train, *evals])
    assert progress.seconds_left() is None  # nothing measured yet
    progress.finish(train[0], 10.0, None)
    # 10 s per unit of cost so far: one training (1.0) and three evaluations (0.9) left
    assert progress.seconds_left() == pytest.approx(10.0 * 1.9)
    progress.finish(train[1], 10.0, None)
    progress.finish(evals[0], 30.0, None)  # an evaluation is 100 s per unit here, not 10
    assert progress.seconds_left() == pytest.approx(2 * 30.0)
    progress.expect(4, 1.2)  # a search's rounds: priced as evaluations
    assert progress.seconds_left() == pytest.approx(2 * 30.0 + 4 * 30.0)
    progress.plan([Evaluate("e3", "x")])  # one foreseen stage declared
    assert progress.seconds_left() == pytest.approx(2 * 30.0 + 4 * 30.0)
    progress.settle()  # three foreseen stages did not happen
    assert progress.seconds_left() == pytest.approx(3 * 30.0) and progress.total == 6
    progress.finish(evals[1], 0.0, "skipped: up to date")  # a skipped stage leaves the pace alone
    assert progress.seconds_left() == pytest.approx(2 * 30.0)


def test_a_finished_stage_leaves_no_cycle_of_its_objects_alive(tmp_path):
    """What a stage built in reference cycles (as a Trainer and its module are) is freed when the stage ends."""
    import gc
    import weakref

    class Big:
        pass

    kept: list = []

    @dataclass(eq=False)
    class Cyclic(Write):
        def run(self, runner):
            big = Big()
            big.me = big  # a cycle: plain reference counting never frees it
            kept.append(weakref.ref(big))
            return super().run(runner)

    gc.disable()  # no automatic collection may hide a missing one
    try:
        StageRunner(tmp_path, 0, Progress(stream=open("/dev/null", "w"))).run(Cyclic("c", "x"))
        assert kept[0]() is None
    finally:
        gc.enable()
