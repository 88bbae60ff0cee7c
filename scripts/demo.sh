#!/usr/bin/env bash
# The main job: set up .venv, then run the end-to-end PerTA demo on the synthetic benchmark.
# Extra arguments go to `perta pipeline` (e.g. --preset tiny, --output DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec perta pipeline --config configs/demo/pipeline.yaml "$@"
