#!/usr/bin/env bash
# The GPU check for a short loan on a machine with NO network: the image's own Python and torch, plus the wheels
# carried in .whl/ (made here by tools/bench/wheelhouse.sh), installed --no-deps into a folder of their own beside the
# image's packages (never over them) — or, without .whl/, the environment tools/install.sh made — then
# tools/bench/gpu.py; its JSON lands in $OUT/gpu.json (OUT: the device tool's
# folder, else ./gpu-bench), rewritten after every part. Bounded: gpu.py stops GPU_BENCH_LIMIT_S seconds after the
# start (default 450 = 7.5 min). Arguments go to gpu.py (`--device cpu --tiny` rehearses the whole path on a CPU).
set -euo pipefail
cd "$(dirname "$0")/../.."
start=$(date +%s)
PY=${PYTHON:-python3}
OUT=${OUT:-$PWD/gpu-bench}
SITE=${COLBERTZERO_GPU_SITE:-/tmp/colbertzero-gpu-site}
WHL=${COLBERTZERO_WHEELHOUSE:-.whl}  # another folder: a rehearsal with wheels made for this machine's Python
mkdir -p "$OUT"
# Nothing below may reach for the network: pip, the hub, datasets.
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
if [ -f "$WHL/MANIFEST.json" ]; then
  carried=1
elif "$PY" -c 'import colbertzero, pylate, deepspeed' 2>/dev/null; then
  carried=0  # a cluster node with the environment tools/install.sh made: its packages as they are
else
  echo "gpu.sh: no $WHL/MANIFEST.json in this tree and $PY lacks the project's packages: run \`bash tools/bench/wheelhouse.sh\` where the package index is reachable and carry .whl (docs/performance.md), or tools/install.sh here" >&2
  exit 2
fi
device=cuda
for a in "$@"; do [ "$a" = cpu ] && device=cpu; done
if [ "$device" = cuda ] && ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu.sh: $("$PY" -c 'import torch; print(f"torch {torch.__version__} (CUDA build: {torch.version.cuda})")' 2>&1 | tail -1) sees no CUDA device: run this on the GPU machine, or pass --device cpu --tiny" >&2
  exit 2
fi
if [ "$carried" = 1 ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHL"/*.whl
  export COLBERTZERO_GPU_SITE=$SITE COLBERTZERO_WHEELHOUSE=$WHL PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  echo "[gpu.sh] $(ls "$WHL"/*.whl | wc -l) wheels installed into $SITE in $(( $(date +%s) - start )) s"
else
  echo "[gpu.sh] no $WHL/: this environment's packages as installed"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
left=$(( ${GPU_BENCH_LIMIT_S:-450} - ($(date +%s) - start) ))
rc=0
# The model (~600 MB) and shards stay outside $OUT: only gpu.json comes back.
timeout "$left" "$PY" tools/bench/gpu.py --out "$OUT" --work "${GPU_BENCH_WORK:-/tmp/colbertzero-gpu-work}" "$@" || rc=$?
[ "$rc" -eq 124 ] && echo "[gpu.sh] stopped at the ${GPU_BENCH_LIMIT_S:-450}-s limit: $OUT/gpu.json holds the parts measured"
echo "[gpu.sh] done in $(( $(date +%s) - start )) s (exit $rc): $OUT/gpu.json"
exit "$rc"
