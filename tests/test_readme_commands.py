"""The README's commands, run as the README writes them.

Every fenced ``bash`` block of ``README.md`` is read, its lines run in order from a working directory that
looks like a checkout (``configs`` and ``.venv`` linked in, everything written under ``runs/``), each as
``bash -c '<the line as written> <overrides>'``. A command that would take too long here gets the tiny
overrides listed beside it in :data:`RUN`, passed the way the README documents (command-line flags); commands
that need a GPU or the hub are parsed instead (:data:`PARSE`, ``--print_config``), so a renamed option still
fails. A README command this file does not know fails the test: an edit to the README's commands is an edit
here too.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TIMEOUT = 600

#: A study or pipeline of one test seed on the tiny preset, one epoch a stage, one α per method.
TINY_RUN = ("--preset tiny --preset_overrides '{pretrain_epochs: 1, finetune_epochs: 1, reinforce_epochs: 1, "
            "unlearn_epochs: 1}' --search.initial '[1.0]' --search.rounds 0")
TINY_STUDY = (f"{TINY_RUN} --validation_seeds '[]' --test_seeds '[0]' --forget_splits '[forget10]' "
              "--candidates '[{statistic: fisher}]' --proposed '[]' --baselines '[grad_diff]' "
              "--baseline_candidates '[]' --jobs 1")
TINY_MUSE = TINY_RUN.replace("--preset tiny", "--preset muse_tiny")

#: Lines run with overrides: (the start of the line as written, the overrides added at its end).
RUN: list[tuple[str, str]] = [
    ("perta study --config configs/replication/study.yaml", TINY_STUDY),
    ("perta study --config configs/demo/study.yaml", TINY_STUDY),  # the main job's command (scripts/demo.sh)
    ("perta study --config configs/demo/muse_study.yaml",
     f"{TINY_MUSE} --validation_seeds '[]' --test_seeds '[0]' --candidates '[{{statistic: fisher}}]' "
     "--baselines '[]' --baseline_candidates '[]' --jobs 1"),
    ("perta pipeline --config configs/demo/muse_pipeline.yaml",
     f"{TINY_MUSE} --variants '[{{statistic: fisher}}]' --baselines '[]'"),
    ("perta data muse-synthetic", ""),
    ("perta data synthetic", ""),
    ("perta fit --config configs/demo/", "--trainer.max_epochs 1"),
    ("perta importance --config configs/demo/importance.yaml", "--data.num_examples 4"),
    ("perta merge", ""),
    ("perta test --config configs/demo/eval.yaml", "--data.max_examples 4 --model.max_new_tokens 8"),
    ("perta test --config configs/demo/muse_eval.yaml", ""),  # the tiny pipeline above made its model
    ("perta summarize", ""),
    (". .venv/bin/activate", ""),
]

#: Lines that need a GPU, several nodes or the hub: parsed, not run.
PARSE = ("perta fit --config configs/tofu/",)

#: Lines that install (scripts/setup.sh does the same on CPU: a GPU user's torch build is theirs to choose).
INSTALL = ("pip install",)

#: The two commands of the README's first block: CI's own (``.ci/run`` runs ``bash scripts/test.sh``; running
#: it from inside the suite would recurse) and the main job, whose study command is in :data:`RUN`.
FIRST_BLOCK = {"bash scripts/test.sh", "bash scripts/demo.sh"}


def readme_blocks(text: str) -> list[list[str]]:
    """The lines of each fenced ``bash`` block, continuation lines joined, comments and blank lines dropped."""
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    out = []
    for block in blocks:
        joined = re.sub(r"\\\n\s*", " ", block)
        lines = [re.sub(r"\s+#.*$", "", line).strip() for line in joined.splitlines()]
        out.append([line for line in lines if line and not line.startswith("#")])
    return out


def without_variables(line: str) -> str:
    """``line`` without the environment assignments that lead it (``MASTER_ADDR=node0 ... perta fit``)."""
    return re.sub(r"^(\w+=\S+\s+)+", "", line)


def overrides(line: str) -> str:
    for start, extra in RUN:
        if line.startswith(start):
            return extra
    raise AssertionError(f"README command not known to tests/test_readme_commands.py: {line!r}")


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """A working directory with the repository's configs and this interpreter's environment as ``.venv``."""
    cwd = tmp_path_factory.mktemp("readme")
    (cwd / "configs").symlink_to(ROOT / "configs")
    (cwd / ".venv").symlink_to(Path(sys.prefix))
    return cwd


def bash(line: str, cwd: Path) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(["bash", "-c", f"set -euo pipefail; {line}"], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=TIMEOUT)


def run_as_written(line: str, cwd: Path) -> None:
    if without_variables(line).startswith(PARSE):  # the cluster's variables go: this is a parse, not a launch
        done = bash(f"{without_variables(line)} --print_config", cwd)
    elif line.startswith(INSTALL):
        return
    else:
        done = bash(f"{line} {overrides(line)}", cwd)
    assert done.returncode == 0, f"{line}\n{done.stderr[-4000:]}"


BLOCKS = readme_blocks(README.read_text())


def test_every_block_is_known():
    """The first block is the two commands; every other line is run, parsed or an install."""
    assert set(BLOCKS[0]) == FIRST_BLOCK
    assert "bash scripts/test.sh" in (ROOT / ".ci/run").read_text()
    demo = (ROOT / "scripts/demo.sh").read_text()
    assert 'exec perta study --config configs/demo/study.yaml "$@"' in demo
    for block in BLOCKS[1:]:
        for line in block:
            if not without_variables(line).startswith(PARSE + INSTALL):
                overrides(line)


@pytest.mark.parametrize("index", range(1, len(BLOCKS)))
def test_block_runs_as_written(index, checkout):
    for line in BLOCKS[index]:
        run_as_written(line, checkout)


def test_the_main_jobs_study_command_runs(checkout):
    """``scripts/demo.sh`` sets up ``.venv`` and runs this line; the study it writes has its report."""
    run_as_written("perta study --config configs/demo/study.yaml --output runs/readme_demo", checkout)
    study = json.loads((checkout / "runs/readme_demo/study.json").read_text())
    assert study["test"]["seeds"] == [0]
    assert (checkout / "runs/readme_demo/REPLICATION.md").is_file()
