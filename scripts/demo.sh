#!/usr/bin/env bash
# The main job: set up .venv, then run the multi-seed PerTA study on the synthetic benchmark.
# Extra arguments go to `perta study` (e.g. --preset tiny, --output DIR, --jobs 1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec perta study --config configs/demo/study.yaml "$@"
