#!/usr/bin/env bash
# GPU figures in one command: the stage-2, inference, classes and cache benchmarks, one JSON each.
#
#   bash benchmarks/gpu_check.sh [OUT]        # OUT defaults to bench_gpu/
#
# Runs with the machine's own Python and torch (no uv needed): PYTHONPATH=. python3 benchmarks/...
# Environment: PYTHON (default python3), DEVICE (default cuda), CACHE_GB (size of the cold-read
# cache, default 4), CACHE_DIR (where it is written, default OUT; a real disk, not a RAM disk),
# LIMIT (seconds per benchmark, default 240), SMOKE=1 (tiny sizes: checks the script, no figures).
# About 3-5 minutes on one GPU; every benchmark is stopped at LIMIT, so the whole run stays under
# 4 x LIMIT. The versions it ran with go to OUT/versions.txt and into every JSON ("machine").
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench_gpu}
PY=${PYTHON:-python3}
DEV=${DEVICE:-cuda}
LIMIT=${LIMIT:-240}
mkdir -p "$OUT"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"

"$PY" -c "import torch, torchvision; print('torch', torch.__version__, '| torchvision', torchvision.__version__, \
'| cuda', torch.version.cuda, '|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')" | tee "$OUT/versions.txt"

if [ "${SMOKE:-0}" = 1 ]; then
  STAGE2=(--settings quick --steps 1 --cache-rois 64 --images 1 --rois 8)
  INFER=(--size 64 --rounds 1 --proposals 20 --detections 4)
  CLASSES=(--rois 4 --rounds 1 --skip-model --mlp-hidden 16)
  CACHE=(--gb 0.01 --batch 8 --drop fadvise --build-images 2 --build-batch 2 --build-rounds 1 --size 64 --backbone resnet18
         --workers 1 --dir "${CACHE_DIR:-$OUT}")
else
  STAGE2=(--settings quick,coco --size 800 --steps 20 --cache-rois 8192)
  INFER=(--size 800 --rounds 7)
  CLASSES=(--size 800 --rounds 7)
  CACHE=(--gb "${CACHE_GB:-4}" --build-images 32 --size 800 --dir "${CACHE_DIR:-$OUT}")
fi

status=0
run() {
  local name=$1 script=$2
  shift 2
  local t0=$SECONDS
  echo "== $name: $script $*"
  if timeout "$LIMIT" "$PY" "benchmarks/$script" "$@" --device "$DEV" --out "$OUT/$name.json"; then
    echo "== $name: $((SECONDS - t0)) s -> $OUT/$name.json"
  else
    echo "== $name: FAILED or over ${LIMIT} s (exit $?)" >&2
    status=1
  fi
}

run stage2 bench_stage2.py "${STAGE2[@]}"
run inference bench_inference.py "${INFER[@]}"
run classes bench_classes.py "${CLASSES[@]}"
run cache bench_cache.py "${CACHE[@]}"
exit $status
