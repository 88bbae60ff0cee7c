"""Run one of tests/helpers/ as its own program (Lightning's ddp launcher re-executes it for rank 1) and read the
JSON file it writes."""

import json
import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def run_helper(name: str, *args, out: Path) -> dict:
    """Run ``tests/helpers/<name>`` with ``args`` (the repository on its path), fail the test with its stderr on a
    non-zero exit, and return the JSON it wrote to ``out``."""
    env = {**os.environ, "PYTHONPATH": str(TESTS.parent)}
    run = subprocess.run([sys.executable, str(TESTS / "helpers" / name), *map(str, args)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(Path(out).read_text())
