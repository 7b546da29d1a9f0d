#!/usr/bin/env bash
# Every maskx command on a GPU in one prepared run, then the stage-2, inference, classes and cache
# benchmarks: benchmarks/gpu_acceptance.py does the work, this script passes it the environment.
#
#   bash benchmarks/gpu_check.sh [OUT]        # OUT defaults to bench_gpu/
#
# Runs with the machine's own Python and torch (no uv needed): PYTHONPATH=. python3 benchmarks/...
# Environment: PYTHON (default python3), DEVICE (default cuda), BUDGET (seconds for the whole run,
# default 480), LIMIT (seconds per benchmark, default 240), CACHE_GB (size of the cold-read cache,
# default 4), CACHE_DIR (where it is written, default OUT; a real disk, not a RAM disk), SKIP
# ("commands" and/or "benchmarks": groups of steps to leave out), SMOKE=1 (tiny sizes: checks the
# script, no figures). Writes OUT/summary.json (every step's exit status, seconds, last line; the
# machine, the versions, the packages missing), OUT/versions.txt, OUT/logs/<step>.log and one JSON per
# benchmark; exit status 0 when every step that could run passed.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench_gpu}
PY=${PYTHON:-python3}
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"

args=(--out "$OUT" --device "${DEVICE:-cuda}" --budget "${BUDGET:-480}" --limit "${LIMIT:-240}" --cache-gb "${CACHE_GB:-4}")
[ -n "${CACHE_DIR:-}" ] && args+=(--cache-dir "$CACHE_DIR")
[ "${SMOKE:-0}" = 1 ] && args+=(--smoke)
for group in ${SKIP:-}; do args+=(--skip "$group"); done
exec "$PY" benchmarks/gpu_acceptance.py "${args[@]}"
