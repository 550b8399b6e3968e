"""Shared fixtures: real small models (no hub), the shared real data, offline settings for every test."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")
# DeepSpeed JIT-builds its CPU shm comm op once, into torch's default TORCH_EXTENSIONS_DIR: the same build the
# demo and `colbertzero train` use on this machine.

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (ROOT / ".." / "shared" / "data").resolve()
# The local Slurm cluster helper lives in tools/, not in the package: production code never calls it.
sys.path.insert(0, str(ROOT / "tools"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA} (the project's tests expect ../shared/data)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def flag_examples(shared_data) -> list[dict]:
    """FlagEmbedding's example rows with hard negatives and teacher scores (MS MARCO, NQ, LLaRA): 31 queries."""
    rows = []
    for name in ("msmarco.jsonl", "nq.jsonl", "llara_toy_finetune_data.jsonl"):
        with open(shared_data / "train" / "flagembedding-examples" / name) as f:
            rows += [json.loads(line) for line in f if line.strip()]
    return rows


@pytest.fixture(scope="session")
def minilm() -> str:
    from colbertzero.models import minilm_path

    return minilm_path()


@pytest.fixture(scope="session")
def tiny_modernbert(tmp_path_factory) -> str:
    from colbertzero.models import make_tiny_modernbert

    return make_tiny_modernbert(tmp_path_factory.mktemp("models") / "tiny-modernbert")


@pytest.fixture(scope="session")
def modernbert_base(tmp_path_factory) -> str:
    """ModernBERT-base's architecture (random weights) and a byte-level BPE tokenizer of ModernBERT's kind."""
    from colbertzero.models import make_modernbert_base

    return make_modernbert_base(tmp_path_factory.mktemp("models") / "modernbert-base")


@pytest.fixture(scope="session")
def local_slurm() -> dict[str, str]:
    """The real two-node Slurm cluster of tools/local-slurm, SLURM_CONF exported for the whole session.

    Starts it (installing Slurm on a fresh machine, ~15 s) and stops it at the end, unless it was already up with
    no test session holding it, or another session still holds it. Skips only where it cannot run (not root, no apt).
    """
    import local_slurm as cluster  # tools/local_slurm.py (on sys.path above)

    if os.geteuid() != 0:
        pytest.skip("local-slurm needs root (it installs Slurm and runs slurmd as root); run the tests as root")
    with contextlib.ExitStack() as stack:
        try:
            env = stack.enter_context(cluster.shared_cluster())
        except cluster.LocalSlurmUnavailable as e:
            pytest.skip(f"local-slurm cannot run on this machine: {e}")
        mp = stack.enter_context(pytest.MonkeyPatch.context())
        for key, value in env.items():
            mp.setenv(key, value)
        yield env
