"""The ``perta`` commands launched the way users launch them, on several processes, each compared with one process.

Every launch is a subprocess typing a ``perta`` command: the console script or ``python -m perta_lightning``,
from another working directory than the repository, with the demo configs given by a relative path and the
tiny model and data passed as command-line overrides. The strategy is chosen as a user chooses one: a name
(``--trainer.strategy ddp``), a class on the command line (``--trainer.strategy.class_path ...``; on CPU the
stand-ins of :mod:`perta_lightning.distributed`), or a second YAML file with a ``trainer.strategy`` block.

* Lightning's own launcher (``--trainer.devices 2``): ``perta fit`` (one step on a one-example split, so
  every rank sees the same example: the loss of the first step and the stepped weights equal one process's),
  ``perta importance`` under six strategies and ``perta test`` (TOFU and MUSE).
* ``torchrun --nproc_per_node 2 -m perta_lightning ...``.
* Two "nodes" on localhost (``NODE_RANK``, ``MASTER_ADDR``, ``--trainer.num_nodes 2``) and a simulated SLURM
  allocation (the variables ``srun`` sets for two tasks).
* A rank that dies fails the command fast, naming the rank.

The one-process references run in this process on one thread (each of the two launched processes gets one).
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.test_importance import assert_close_stats

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[1]
PERTA = Path(sys.executable).with_name("perta")  # the console script the package installs beside python
TIMEOUT = 300

STRATEGIES = {
    "ddp": ["--trainer.strategy", "ddp"],
    "fsdp": ["--trainer.strategy.class_path", "perta_lightning.distributed.CPUFSDPStrategy"],
    "fsdp_orig": ["--trainer.strategy.class_path", "perta_lightning.distributed.CPUFSDPStrategy",
                  "--trainer.strategy.use_orig_params", "true"],
    "fsdp2": ["--trainer.strategy.class_path", "lightning.pytorch.strategies.ModelParallelStrategy",
              "--trainer.strategy.data_parallel_size", "2", "--trainer.strategy.tensor_parallel_size", "1",
              "--trainer.strategy.process_group_backend", "gloo"],
    "zero2": ["--trainer.strategy.class_path", "perta_lightning.distributed.CPUDeepSpeedStrategy",
              "--trainer.strategy.stage", "2"],
    # ZeRO-3 from a YAML file beside the config, as a cluster user keeps a strategy block
    "zero3": ["--config", "zero3.yaml"],
}
ZERO3_YAML = {"trainer": {"strategy": {"class_path": "perta_lightning.distributed.CPUDeepSpeedStrategy",
                                       "init_args": {"stage": 3}}}}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def work(tiny_benchmark, tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """A working directory outside the repository, with the tiny data, model, a one-example split and the
    ZeRO-3 strategy file; configs are reached from it by a relative path."""
    cwd = tmp_path_factory.mktemp("user")
    first = cwd / "first.json"
    first.write_text((tiny_benchmark / "forget10.json").read_text().splitlines()[0] + "\n")
    (cwd / "zero3.yaml").write_text(yaml.safe_dump(ZERO3_YAML))
    return {"cwd": cwd, "data": tiny_benchmark, "model": tiny_model_dir, "first": first}


def config(work: dict[str, Path], name: str) -> str:
    """``configs/demo/<name>`` as a path relative to the user's working directory."""
    return os.path.relpath(ROOT / "configs" / "demo" / name, work["cwd"])


def launch(command: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = TIMEOUT
           ) -> subprocess.CompletedProcess:
    """Run ``command`` as a user would (tests/ importable for the fault-injecting callback)."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([str(part) for part in command], cwd=cwd, env=environment, capture_output=True,
                          text=True, timeout=timeout)


def check(run: subprocess.CompletedProcess) -> None:
    assert run.returncode == 0, run.stderr[-4000:]


def in_process(args: list[str], cwd: Path) -> None:
    """The one-process reference: ``perta <args>`` in this process, on one thread, from ``cwd``."""
    from perta_lightning.cli import main

    threads, here = torch.get_num_threads(), os.getcwd()
    torch.set_num_threads(1)
    os.chdir(cwd)
    try:
        main([str(arg) for arg in args])
    finally:
        os.chdir(here)
        torch.set_num_threads(threads)


# ---- perta fit: one step on one example


def fit_args(work: dict[str, Path], out: str) -> list[str]:
    return ["fit", "--config", config(work, "full.yaml"), "--model.model", work["model"],
            "--model.output_dir", out, "--data.source.path", work["data"],
            "--data.source.files", json.dumps({"first": str(work["first"])}), "--data.train_split", "[first]",
            "--trainer.max_steps", "1", "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
            "--trainer.logger.save_dir", f"{out}_logs", "--trainer.log_every_n_steps", "1"]


def first_loss(folder: Path) -> float:
    (metrics,) = folder.glob("**/metrics.csv")
    rows = [row for row in csv.DictReader(metrics.open()) if row.get("train_loss")]
    assert rows and rows[0]["step"] == "0", rows
    return float(rows[0]["train_loss"])


@pytest.fixture(scope="module")
def fit_reference(work) -> dict[str, object]:
    in_process(fit_args(work, "fit_one"), work["cwd"])
    return {"loss": first_loss(work["cwd"] / "fit_one_logs"),
            "weights": load_file(work["cwd"] / "fit_one" / "model.safetensors")}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "fsdp2", "zero3"])
def test_fit_on_two_devices(strategy, work, fit_reference):
    """``perta fit --trainer.devices 2`` finishes (it used to hang: rank 1 re-executed a blanked command line),
    writes a loadable model, and its first step's loss and weights are one process's."""
    if strategy.startswith("zero"):
        pytest.importorskip("deepspeed")
    out = f"fit_{strategy}"
    check(launch([PERTA, *fit_args(work, out), "--trainer.devices", "2", *STRATEGIES[strategy]], work["cwd"]))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(work["cwd"] / out)
    assert json.loads((work["cwd"] / out / "perta_hparams.json").read_text())["trainer"]["world_size"] == 2
    assert first_loss(work["cwd"] / f"{out}_logs") == pytest.approx(fit_reference["loss"], rel=1e-6)
    stepped = {name: tensor.detach() for name, tensor in model.state_dict().items()}
    reference = fit_reference["weights"]
    assert reference.keys() <= stepped.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(stepped[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


# ---- perta importance: six strategies, torchrun, two nodes, SLURM


def importance_args(work: dict[str, Path], out: str, statistic: str = "fisher") -> list[str]:
    return ["importance", "--config", config(work, "importance.yaml"), "--model.model", work["model"],
            "--model.output_dir", out, "--model.statistic", statistic, "--data.source.path", work["data"],
            "--data.num_examples", "6", "--data.batch_size", "3", "--trainer.enable_progress_bar", "false"]


@pytest.fixture(scope="module")
def importance_reference(work) -> dict[str, Path]:
    """Fisher by example and grad, one process."""
    for statistic in ("fisher", "grad"):
        in_process(importance_args(work, f"importance_one_{statistic}", statistic), work["cwd"])
    return {statistic: work["cwd"] / f"importance_one_{statistic}" for statistic in ("fisher", "grad")}


def assert_importance_equal(folder: Path, reference: Path) -> None:
    for split in ("forget", "retain"):
        assert_close_stats(load_file(folder / f"{split}.safetensors"), load_file(reference / f"{split}.safetensors"))


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_importance_on_two_devices(strategy, work, importance_reference):
    """Fisher by example on two processes equals one process's, under every supported strategy (by hooks where
    ranks hold whole parameters, by the per-example loop where they hold shards)."""
    if strategy.startswith("zero"):
        pytest.importorskip("deepspeed")
    out = f"importance_{strategy}"
    check(launch([PERTA, *importance_args(work, out), "--trainer.devices", "2", *STRATEGIES[strategy]],
                 work["cwd"]))
    assert_importance_equal(work["cwd"] / out, importance_reference["fisher"])
    metadata = json.loads((work["cwd"] / out / "forget.json").read_text())
    assert metadata["world_size"] == "2"
    assert metadata["loss_convention"] == ("example_losses" if strategy in ("ddp", "zero2") else "one_example")


def test_importance_under_torchrun(work, importance_reference):
    out = "importance_torchrun"
    check(launch([Path(sys.executable).with_name("torchrun"), "--standalone", "--nproc_per_node", "2", "-m",
                  "perta_lightning", *importance_args(work, out, "grad"), "--trainer.devices", "2",
                  "--trainer.strategy", "ddp"], work["cwd"]))
    assert_importance_equal(work["cwd"] / out, importance_reference["grad"])


def test_importance_on_two_nodes_of_localhost(work, importance_reference):
    """The README's multi-node line with two nodes of one device on this machine: the result is one process's."""
    out, port = "importance_nodes", free_port()
    command = [PERTA, *importance_args(work, out), "--trainer.num_nodes", "2", "--trainer.devices", "1",
               "--trainer.strategy", "ddp"]
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    node1 = subprocess.Popen([str(c) for c in command], cwd=work["cwd"], env={**environment, "NODE_RANK": "1"},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    node0 = launch(command, work["cwd"], env={"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NODE_RANK": "0"})
    log1, _ = node1.communicate(timeout=TIMEOUT)
    check(node0)
    assert node1.returncode == 0, log1[-4000:]
    assert json.loads((work["cwd"] / out / "forget.json").read_text())["world_size"] == "2"
    assert_importance_equal(work["cwd"] / out, importance_reference["fisher"])


def slurm_environment(task: int, tasks: int = 2) -> dict[str, str]:
    """What ``srun --ntasks-per-node 2`` sets for task ``task`` of a one-node job."""
    return {"SLURM_NTASKS": str(tasks), "SLURM_NTASKS_PER_NODE": str(tasks), "SLURM_NNODES": "1",
            "SLURM_NODEID": "0", "SLURM_PROCID": str(task), "SLURM_LOCALID": str(task), "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NAME": "perta", "SLURM_NODELIST": "127.0.0.1"}


# ---- perta test: TOFU under three strategies and torchrun, MUSE, SLURM


def eval_args(work: dict[str, Path], out: str) -> list[str]:
    return ["test", "--config", config(work, "eval.yaml"), "--model.model", work["model"],
            "--model.output_json", out, "--model.max_new_tokens", "8", "--data.source.path", work["data"],
            "--data.batch_size", "4", "--trainer.enable_progress_bar", "false"]


@pytest.fixture(scope="module")
def evaluation_reference(work) -> dict:
    in_process(eval_args(work, "eval_one.json"), work["cwd"])
    return json.loads((work["cwd"] / "eval_one.json").read_text())


def assert_evaluation_equal(result: dict, reference: dict) -> None:
    """Per-example values equal to float noise (other batches pad to other lengths), generations identical."""
    assert result["settings"]["world_size"] == 2
    assert result["examples"].keys() == reference["examples"].keys()
    for name, columns in reference["examples"].items():
        for column, values in columns.items():
            got = result["examples"][name][column]
            if column in ("generated_ids", "index") or any(isinstance(v, str) for v in values):
                assert got == values, (name, column)
            else:
                assert flat(got) == pytest.approx(flat(values), rel=1e-5, abs=1e-7, nan_ok=True), (name, column)
    for key, value in reference["aggregates"].items():
        assert result["aggregates"][key] == (value if value is None else pytest.approx(value, rel=1e-5)), key


def flat(values: list) -> list:
    """A nested list of numbers, flattened (``None`` read as NaN)."""
    out = []
    for value in values:
        out.extend(flat(value) if isinstance(value, list) else [float("nan") if value is None else value])
    return out


@pytest.mark.parametrize("strategy", ["ddp", "fsdp_orig", "zero3"])
def test_evaluation_on_two_devices(strategy, work, evaluation_reference):
    """``perta test`` on two processes writes one process's file; FSDP with the original parameters (with flat
    ones the evaluator refuses in one line: generation calls the model's own modules)."""
    if strategy.startswith("zero"):
        pytest.importorskip("deepspeed")
    out = f"eval_{strategy}.json"
    check(launch([PERTA, *eval_args(work, out), "--trainer.devices", "2", *STRATEGIES[strategy]], work["cwd"]))
    assert_evaluation_equal(json.loads((work["cwd"] / out).read_text()), evaluation_reference)


def test_evaluation_refuses_fsdp_with_flat_parameters(work):
    run = launch([PERTA, *eval_args(work, "eval_fsdp.json"), "--trainer.devices", "2", *STRATEGIES["fsdp"]],
                 work["cwd"])
    assert run.returncode != 0
    assert "set --trainer.strategy.use_orig_params true" in run.stderr
    assert not (work["cwd"] / "eval_fsdp.json").exists()


def test_evaluation_under_slurm(work, evaluation_reference):
    """Two tasks of a simulated one-node SLURM allocation, each a ``perta test`` as ``srun`` would start it."""
    out, port = "eval_slurm.json", free_port()
    command = [PERTA, *eval_args(work, out), "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "MASTER_PORT": str(port)}
    task1 = subprocess.Popen([str(c) for c in command], cwd=work["cwd"], env={**environment, **slurm_environment(1)},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    task0 = launch(command, work["cwd"], env={"MASTER_PORT": str(port), **slurm_environment(0)})
    log1, _ = task1.communicate(timeout=TIMEOUT)
    check(task0)
    assert task1.returncode == 0, log1[-4000:]
    assert_evaluation_equal(json.loads((work["cwd"] / out).read_text()), evaluation_reference)


def test_fit_and_evaluation_under_torchrun_as_a_module(work, fit_reference, evaluation_reference):
    """``torchrun -m perta_lightning``: the fit's first step and the evaluation are one process's."""
    torchrun = [Path(sys.executable).with_name("torchrun"), "--standalone", "--nproc_per_node", "2", "-m",
                "perta_lightning"]
    check(launch([*torchrun, *fit_args(work, "fit_torchrun"), "--trainer.devices", "2", "--trainer.strategy", "ddp"],
                 work["cwd"]))
    assert first_loss(work["cwd"] / "fit_torchrun_logs") == pytest.approx(fit_reference["loss"], rel=1e-6)
    check(launch([*torchrun, *eval_args(work, "eval_torchrun.json"), "--trainer.devices", "2",
                  "--trainer.strategy", "ddp"], work["cwd"]))
    assert_evaluation_equal(json.loads((work["cwd"] / "eval_torchrun.json").read_text()), evaluation_reference)


def test_muse_evaluation_on_two_devices(muse_launch, tmp_path):
    """``perta test --config configs/demo/muse_eval.yaml`` under ``python -m perta_lightning`` on two processes:
    the file one process writes (index-keyed states drop DistributedSampler's padding)."""
    single, args = muse_launch
    out = tmp_path / "ddp.json"
    check(launch([sys.executable, "-m", "perta_lightning", *args, "--model.output_json", out,
                  "--trainer.devices", "2", "--trainer.strategy", "ddp"], tmp_path))
    ddp = json.loads(out.read_text())
    assert ddp["settings"]["world_size"] == 2
    assert ddp["examples"] == single["examples"]
    assert ddp["aggregates"] == single["aggregates"]


@pytest.fixture(scope="module")
def muse_launch(tmp_path_factory) -> tuple[dict, list[str]]:
    """A tiny MUSE corpus and model, the ``perta test`` arguments for it, and its one-process evaluation."""
    from perta_lightning.benchmarks.muse.synthetic import write_muse_benchmark
    from tests.test_muse_evaluate import SPEC
    from tests.tiny import write_tiny_model

    root = tmp_path_factory.mktemp("muse_launch")
    data = write_muse_benchmark(SPEC, str(root / "data"), tokenizer_vocab_size=300)
    model = write_tiny_model(root / "model", data / "tokenizer", seed=1, output_scale=20.0)
    args = ["test", "--config", str(ROOT / "configs/demo/muse_eval.yaml"), "--model.model", str(model),
            "--model.retain_result", "null", "--model.verbmem_max_new_tokens", "8",
            "--model.knowmem_max_new_tokens", "4", "--data.source.path", str(data), "--data.max_examples", "5",
            "--data.batch_size", "1", "--trainer.enable_progress_bar", "false"]
    in_process([*args, "--model.output_json", str(root / "one.json")], root)
    return json.loads((root / "one.json").read_text()), args


# ---- a rank that dies


def test_a_dying_rank_fails_the_command_fast_and_is_named(work):
    """Rank 1 raises in ``setup`` (a callback given on the command line); rank 0 must not wait for it."""
    started = time.monotonic()
    run = launch([PERTA, *importance_args(work, "importance_dies"), "--trainer.devices", "2",
                  "--trainer.strategy", "ddp", "--trainer.callbacks+=tests.helpers.faults.FailOnRank",
                  "--trainer.callbacks.rank", "1"], work["cwd"], timeout=120)
    elapsed = time.monotonic() - started
    assert run.returncode != 0
    assert elapsed < 60, f"the command took {elapsed:.0f} s to fail"
    assert "perta importance: error: rank 1 of 2: RuntimeError: injected failure on global rank 1" in run.stderr
    assert not (work["cwd"] / "importance_dies" / "forget.safetensors").exists()


# ---- the stages perta pipeline and perta study run, on two devices


def test_pipeline_stages_on_two_devices(work, importance_reference, evaluation_reference, tmp_path):
    """With ``devices: 2`` a study's training, importance and evaluation stages each run as their own ``perta``
    command on two processes (``stages/commands/`` keeps each config and log): importance is one process's,
    the evaluation file one process's, the fine-tuned model a model of two processes."""
    from perta_lightning.benchmarks.tofu.benchmark import TofuEvaluation
    from perta_lightning.benchmarks.tofu.source import TofuSource
    from perta_lightning.stages import Product, StageRunner
    from perta_lightning.study.options import Runtime
    from perta_lightning.study.stages import Data, Evaluate, FineTune, Importance, Pretrained

    two = Runtime("cpu", 2)
    data = Data(given=TofuSource(path=str(work["data"])))
    base = Pretrained(str(work["model"]))
    tuned = FineTune("models/tuned", base, data, ["forget10"], 1, 1e-3, 4, runtime=two)
    importance = Importance("importance", base, data, "fisher", "example", "forget10", "retain90", 6, runtime=two)
    evaluation = Evaluate("eval/base", Product(base), data, TofuEvaluation("forget10", 8, batch_size=4), runtime=two)
    runner = StageRunner(tmp_path, seed=0)
    runner.run_all([base, tuned, importance, evaluation])
    commands = sorted(p.name for p in (tmp_path / "stages" / "commands").iterdir())
    assert commands == ["eval__base.json", "eval__base.log", "importance.json", "importance.log",
                        "models__tuned.json", "models__tuned.log"]
    assert json.loads((tmp_path / "models/tuned/perta_hparams.json").read_text())["trainer"]["world_size"] == 2
    # the stage subsamples with its own seed: compare with one process on the same examples
    one = tmp_path / "importance_one"
    in_process(importance_args(work, str(one)) + ["--data.subsample_seed", str(json.loads(
        (tmp_path / "stages/commands/importance.json").read_text())["data"]["init_args"]["subsample_seed"])],
        work["cwd"])
    assert_importance_equal(tmp_path / "importance", one)
    result = json.loads((tmp_path / "eval/base.json").read_text())
    assert result["settings"]["world_size"] == 2
    single = StageRunner(tmp_path / "one", seed=0)
    one_process = Evaluate("eval/base", Product(base), data, TofuEvaluation("forget10", 8, batch_size=4))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single.run_all([base, one_process])
    finally:
        torch.set_num_threads(threads)
    assert_evaluation_equal(result, json.loads((tmp_path / "one/eval/base.json").read_text()))
