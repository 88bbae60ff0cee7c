#!/usr/bin/env bash
# The fast tests on the declared minimum versions: create (or reuse) .venv-min, install every core dependency
# at exactly its `>=` floor in pyproject.toml, install perta-lightning without its dependencies, run pytest.
# CI runs this after the main suite. Extra arguments go to pytest. Left out beside the GPU, slow and multi-process
# tests: the multi-seed study and the README's commands as written (minutes each; the main suite runs them).
#
# torch is the exception: its floor (2.6) exists on PyPI only as CUDA builds (~3 GB with their libraries),
# so this job keeps the CPU build the main suite uses. MIN_TORCH=2.6.0 installs the floor instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export MIN_TORCH=${MIN_TORCH:-2.13.0}
if [ ! -x .venv-min/bin/python ]; then
  "$PYTHON" -m venv .venv-min
fi
. .venv-min/bin/activate
python -m pip install -q --upgrade pip

# "name>=X" -> "name==X" for each core dependency; any other form of requirement is an error.
pins=$(python - <<'EOF'
import os
import re
import sys
import tomllib

with open("pyproject.toml", "rb") as f:
    dependencies = tomllib.load(f)["project"]["dependencies"]
for requirement in dependencies:
    match = re.fullmatch(r"\s*([A-Za-z0-9_.-]+(?:\[[^\]]*\])?)\s*>=\s*([0-9][^,;\s]*)\s*", requirement)
    if match is None:
        sys.exit(f"pyproject.toml: dependency {requirement!r} is not of the form 'name>=floor'")
    name, floor = match.groups()
    print(f"{name}=={os.environ['MIN_TORCH'] if name == 'torch' else floor}")
EOF
)  # a failure here stops the script (set -e); a process substitution would not
mapfile -t pins <<< "$pins"
python -m pip install -q "${pins[@]}" "pytest>=8"
python -m pip install -q --no-deps -e .
python -m pip check
python -c "import datasets, matplotlib.pyplot, rouge_score.rouge_scorer, scipy.stats"  # the lazily imported ones
python -m pip list 2>/dev/null | grep -iE "^(torch|lightning|transformers|torchmetrics|datasets|safetensors|jsonargparse|tokenizers|scipy|rouge.score|matplotlib|tqdm|huggingface.hub|numpy) "
exec python -m pytest -q -p no:cacheprovider -m "not slow and not gpu and not distributed" \
  --ignore=tests/test_study.py --ignore=tests/test_readme_commands.py "$@"
