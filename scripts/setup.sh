#!/usr/bin/env bash
# Create (or reuse) the virtual environment .venv and install perta-lightning into it.
# torch is installed only when the environment has none: the CPU build pinned here for laptops and CI;
# GPU users install the torch build matching their CUDA first and keep it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q "torch==2.13.0"
fi
python -m pip install -q -e ".[test,deepspeed,attacks]"
