#!/usr/bin/env bash
# The one-shot GPU check (docs/benchmarks.md#gpu): on a machine with one CUDA GPU, unattended, at most 8 minutes.
# Equivalence of the packed forward on the GPU, then step_bench at Qwen2.5-VL-3B sizes in the three shapes for both
# trainers; the last line is one JSON object. Whoever has a GPU lent runs it and records the numbers in docs.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec timeout 500 "$PY" benchmarks/gpu_check.py "$@"
