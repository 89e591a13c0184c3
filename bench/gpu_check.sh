#!/usr/bin/env bash
# GPU check (issue 19, section 5): parity of both real-shape models in float32 and bfloat16, the forward, decode,
# siglip-train and paligemma-train benchmarks, and ours against transformers on cuda, in one JSON
# ($OUT/gpu_check.json, plus every step's output in $OUT/gpu_check.log), within 10 minutes. bench/gpu_check.py
# says what each step measures.
#
# On a lent GPU machine (the `device` tool; it has jax 0.11 with CUDA, torch and transformers, no package registry):
#   1. here, once:  bash bench/gpu_wheels.sh        # the 5 packages that machine lacks, ~5 MB, into bench/wheels/
#   2. device tool: run(command="bash bench/gpu_check.sh", carry=["bench/wheels"], timeout_s=600)
#   3. if the JSON's "rerun" names steps that did not fit, run that command at once the same way (same carry).
# The project is put on PYTHONPATH (no `pip install -e .` there: building it needs setuptools from an index); the
# carried wheels go to /tmp/bvl_site, also on PYTHONPATH.
#
# Here, on the CPU, the same steps at tiny sizes (about a minute):
#   GPU_CHECK_DRY_RUN=1 bash bench/gpu_check.sh      # or: bash bench/gpu_check.sh --dry-run [--out DIR]
# Other options: --only STEP,STEP  --budget-s S  --work DIR  --list  (bench/gpu_check.py --help)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi

dry_run="${GPU_CHECK_DRY_RUN:-0}"
for arg in "$@"; do [ "$arg" = "--dry-run" ] && dry_run=1; done

shopt -s nullglob
wheels=(bench/wheels/*.whl)
if [ "${#wheels[@]}" -gt 0 ] && [ "$dry_run" != 1 ]; then
  site=/tmp/bvl_site
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
      "${wheels[@]}"; then
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    echo "[gpu_check] installed ${#wheels[@]} carried wheels into $site"
  else
    echo "[gpu_check] installing the carried wheels failed; the env step reports what is missing" >&2
  fi
elif [ "$dry_run" != 1 ]; then
  echo "[gpu_check] no bench/wheels/*.whl: run bench/gpu_wheels.sh here and carry bench/wheels" >&2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
[ "$dry_run" = 1 ] && export GPU_CHECK_DRY_RUN=1
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
exec "$PY" bench/gpu_check.py "$@"
