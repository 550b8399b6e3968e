#!/usr/bin/env bash
# The GPU check for a short loan (one H200, a few minutes): install from a bare machine (pip's cache is used when
# present), then tools/bench/gpu.py at the paper's shapes; its JSON lands in $OUT/gpu.json (OUT: the device tool's
# folder, else ./gpu-bench). Bounded: the whole run stops after GPU_BENCH_LIMIT_S seconds (default 450 = 7.5 min).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/gpu-bench}
mkdir -p "$OUT"
start=$(date +%s)
bash tools/install.sh 2>&1 | tail -3
echo "[gpu.sh] installed in $(( $(date +%s) - start )) s"
left=$(( ${GPU_BENCH_LIMIT_S:-450} - ($(date +%s) - start) ))
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
timeout "$left" python3 tools/bench/gpu.py --out "$OUT" "$@"
echo "[gpu.sh] done in $(( $(date +%s) - start )) s: $OUT/gpu.json"
