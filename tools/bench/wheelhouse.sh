#!/usr/bin/env bash
# The wheels the GPU machine (no network) lacks, into .whl/ (ignored; carried with the tree), then pip's offline
# resolution of the whole set for the image's Python. Run where the package index is reachable, in the environment
# tools/install.sh made (DeepSpeed's sdist is built against its torch). docs/performance.md: "The GPU run".
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${PYTHON:-python3}" tools/bench/wheelhouse.py build "$@"
