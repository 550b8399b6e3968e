"""The GPU check as the GPU machine runs it: no network, no ../shared, the image's packages plus `.whl/`.

Static: every import on gpu.py's path is the standard library, the repository, the image's (tools/bench/gpu-image.txt)
or a requirement the wheelhouse carries; no step of that path reads ../shared. Run: `gpu.py --device cpu --tiny` from
a copy of the tree with nothing beside it; gpu.sh's one-line refusals; the JSON kept whole part by part; the text's
token lengths against msmarco-5k's where ../shared is present; pip's offline resolution where `.whl/` is built.
"""

from __future__ import annotations

import ast
import json
import os
import random
import subprocess
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "tools" / "bench"
sys.path.insert(0, str(BENCH))

import gpu  # noqa: E402
import step  # noqa: E402
import wheelhouse  # noqa: E402

SHARED_NAMES = {"DATA", "FLAG", "BEIR"}  # step.py's paths into ../shared


def _imports(nodes) -> set[str]:
    out = set()
    for node in nodes:
        for n in ast.walk(node):
            if isinstance(n, ast.Import):
                out |= {a.name.split(".")[0] for a in n.names}
            elif isinstance(n, ast.ImportFrom) and n.level == 0 and n.module:
                out.add(n.module.split(".")[0])
    return out


def _module_level(tree: ast.Module) -> list[ast.stmt]:
    return [n for n in tree.body if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]


def gpu_path() -> tuple[set[str], list[str]]:
    """(top-level modules imported on gpu.py's path, the step.py functions it runs).

    gpu.py, wheelhouse.py, beir_scale.py and pip_check.py whole; step.py's module level and the functions gpu.py
    reaches (called as `S.name`, the workers it names to `S.run_worker`, and what those call in turn); the package's
    module level."""
    gpu_tree = ast.parse((BENCH / "gpu.py").read_text())
    step_tree = ast.parse((BENCH / "step.py").read_text())
    funcs = {f.name: f for f in step_tree.body if isinstance(f, ast.FunctionDef)}
    todo = {n.attr for n in ast.walk(gpu_tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
            and n.value.id == "S"}
    for call in ast.walk(gpu_tree):
        if isinstance(call, ast.Call) and getattr(call.func, "attr", None) == "run_worker":
            todo.add(step.WORKERS[call.args[0].value].__name__)
    reached: set[str] = set()
    while todo:
        name = todo.pop()
        if name in funcs and name not in reached:
            reached.add(name)
            todo |= {n.id for n in ast.walk(funcs[name]) if isinstance(n, ast.Name)}
    mods = _imports([gpu_tree, ast.parse((BENCH / "wheelhouse.py").read_text()),
                     ast.parse((BENCH / "beir_scale.py").read_text()),
                     ast.parse((ROOT / "tools" / "pip_check.py").read_text())])
    mods |= _imports(_module_level(step_tree)) | _imports(funcs[f] for f in reached)
    for path in (ROOT / "colbertzero").rglob("*.py"):
        mods |= _imports(_module_level(ast.parse(path.read_text())))
    return mods, sorted(reached)


def test_gpu_path_imports_only_the_image_and_what_the_wheelhouse_carries():
    _, image = wheelhouse.read_image()
    carried = {canonicalize_name(r.name) for r in wheelhouse.top_requirements()}
    local = {"colbertzero", "step", "wheelhouse", "beir_scale", "pip_check", "__future__"}
    dists = packages_distributions()
    mods, _ = gpu_path()
    outside = []
    for mod in sorted(mods - local - set(sys.stdlib_module_names)):
        names = {canonicalize_name(d) for d in dists.get(mod, [])} or {canonicalize_name(mod)}
        if not names & (set(image) | carried):
            outside.append(f"{mod} ({'/'.join(sorted(names))})")
    assert not outside, f"gpu.py's path imports what neither the GPU image nor .whl/ has: {outside}"
    assert {"torch", "deepspeed", "pylate"} <= mods  # the walk sees the path it is meant to see


def test_gpu_path_reads_nothing_from_shared():
    _, reached = gpu_path()
    assert {"worker_gpu", "worker_pylate_gpu", "run_worker", "step_rows"} <= set(reached)
    tree = ast.parse((BENCH / "step.py").read_text())
    funcs = {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef)}
    used = {(name, n.id) for name in reached for n in ast.walk(funcs[name])
            if isinstance(n, ast.Name) and n.id in SHARED_NAMES}
    assert not used, f"functions on gpu.py's path read ../shared: {sorted(used)}"
    text = (BENCH / "gpu.py").read_text()
    assert "shared" not in {n.value for n in ast.walk(ast.parse(text)) if isinstance(n, ast.Constant)
                            and isinstance(n.value, str) and "shared" in n.value.split("/")}
    assert not {n.attr for n in ast.walk(ast.parse(text)) if isinstance(n, ast.Attribute)} & SHARED_NAMES


def test_the_walk_would_catch_a_read_of_shared(tmp_path):
    """The check above is not vacuous: step.py's own pair_rows reads ../shared and is found when reached."""
    tree = ast.parse((BENCH / "step.py").read_text())
    funcs = {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef)}
    assert {n.id for n in ast.walk(funcs["pair_rows"]) if isinstance(n, ast.Name)} & SHARED_NAMES


@pytest.fixture(scope="module")
def bare_tree(tmp_path_factory) -> Path:
    """The repository's files (tracked and untracked-not-ignored, as the device tool sends them) in a folder with
    nothing beside it: no ../shared."""
    root = tmp_path_factory.mktemp("bare") / "repo"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(src.read_bytes())
    assert not (root.parent / "shared").exists()
    return root


def test_gpu_py_tiny_runs_from_the_tree_alone(bare_tree, tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "COLBERTZERO_GPU_SITE")}
    res = subprocess.run([sys.executable, str(bare_tree / "tools" / "bench" / "gpu.py"), "--device", "cpu", "--tiny",
                          "--steps", "1", "--out", str(out)], cwd=bare_tree, env=env, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    first = res.stdout.splitlines()[0]
    assert first.startswith("[gpu] cpu · torch ") and "CUDA" in first and "NCCL" in first and "MaxSim" in first
    data = json.loads((out / "gpu.json").read_text())
    assert set(data["kinds"]) == {"unsupervised", "supervised", "distillation"}
    for part in (*data["kinds"].values(), data["pylate_unsupervised"], data["environment"]):
        assert "error" not in part, part
    assert data["kinds"]["unsupervised"]["pairs_per_s"] > 0 and data["pylate_unsupervised"]["pairs_per_s"] > 0
    assert data["environment"]["packages"]["pylate"].startswith("1.6.0")
    # the text stands in for msmarco-5k's rows: every 10th percentile of its token lengths within 10 % of theirs
    for kind, q in data["token_lengths_every_10th_percentile"].items():
        for ours, theirs in zip(q["ours"], q["msmarco_5k"]):
            assert abs(ours - theirs) <= max(2, 0.1 * theirs), (kind, q)


def test_lengths_are_msmarco_5ks(shared_data):
    """LENGTHS re-measured from the rows the check used before (../shared's msmarco-5k), by the same tokenizer."""
    from colbertzero.models import make_bpe_tokenizer

    tok = make_bpe_tokenizer()
    rows = step.pair_rows(12288)
    for kind in ("query", "document"):
        measured = gpu.length_quantiles([r[kind] for r in rows], tok)
        assert all(abs(a - b) <= 2 for a, b in zip(measured, gpu.LENGTHS[kind])), (kind, measured)


def test_draw_follows_the_quantiles():
    rng = random.Random(0)
    q = gpu.LENGTHS["document"]
    draws = sorted(gpu._draw(q, rng) for _ in range(20000))
    for i in (2, 10, 18):  # the 10th, 50th and 90th percentiles
        assert abs(draws[int(len(draws) * i / 20)] - q[i]) <= 3


def test_results_keep_every_part_whole_when_one_fails(tmp_path):
    res = gpu.Results(tmp_path, {"kinds": {}})
    res.part("environment", lambda: {"torch": "x"})
    assert json.loads((tmp_path / "gpu.json").read_text())["environment"] == {"torch": "x"}

    def broken():
        raise RuntimeError("CUDA out of memory at batch 4096")

    res.part("unsupervised", broken, "kinds")
    res.part("supervised", lambda: {"pairs_per_s": 1.0}, "kinds")
    data = json.loads((tmp_path / "gpu.json").read_text())
    assert data["kinds"]["unsupervised"] == {"error": "RuntimeError: CUDA out of memory at batch 4096"}
    assert data["kinds"]["supervised"] == {"pairs_per_s": 1.0} and data["environment"] == {"torch": "x"}
    assert [p.name for p in tmp_path.iterdir()] == ["gpu.json"]  # no temp file left


def _gpu_sh(tree: Path, *args: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(tree / "tools" / "bench" / "gpu.sh"), *args], cwd=tree, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OUT": str(tree / "out"), **env})


def test_gpu_sh_refuses_without_a_wheelhouse_or_the_packages(bare_tree, tmp_path):
    """A Python like the GPU image's before its wheels arrive: the project's packages absent."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "bare")], check=True)
    res = _gpu_sh(bare_tree, COLBERTZERO_WHEELHOUSE="no-such-wheelhouse", PYTHON=str(tmp_path / "bare/bin/python"))
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "no-such-wheelhouse/MANIFEST.json" in res.stderr and "tools/bench/wheelhouse.sh" in res.stderr


def test_gpu_sh_refuses_a_torch_without_cuda(bare_tree, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    whl = tmp_path / "whl"
    whl.mkdir()
    (whl / "MANIFEST.json").write_text(json.dumps({"wheels": []}))
    res = _gpu_sh(bare_tree, COLBERTZERO_WHEELHOUSE=str(whl))
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert f"torch {torch.__version__}" in res.stderr and "sees no CUDA device" in res.stderr
    assert "--device cpu --tiny" in res.stderr


def test_image_file_names_its_python_and_torch():
    python, image = wheelhouse.read_image()
    assert python.startswith("3.12") and image["torch"] == "2.11.0" and image["sentence-transformers"] == "6.0.1"
    assert wheelhouse.OVER_IMAGE <= set(image)  # carried over the image only where the image has one


def test_read_image_refuses_a_bad_line(tmp_path):
    bad = tmp_path / "image.txt"
    bad.write_text("python 3.12.3\ntorch==2.11.0\nnot a name!\n")
    with pytest.raises(wheelhouse.WheelhouseError, match=r"image.txt:3: not a package name"):
        wheelhouse.read_image(bad)
    bad.write_text("python 3.12.3\ntorch==2.11 cu130\n")
    with pytest.raises(wheelhouse.WheelhouseError, match=r"image.txt:2: '2.11 cu130' is not a version"):
        wheelhouse.read_image(bad)


@pytest.mark.skipif(not (ROOT / ".whl" / wheelhouse.MANIFEST).exists(),
                    reason="no .whl/ built here (bash tools/bench/wheelhouse.sh needs the package index)")
def test_the_wheelhouse_resolves_offline_for_the_image():
    res = wheelhouse.check(ROOT / ".whl")
    assert res["ok"] and res["python"].startswith("3.12")
    manifest = json.loads((ROOT / ".whl" / wheelhouse.MANIFEST).read_text())
    names = {w["name"] for w in manifest["wheels"]}
    assert not {n for n in names if wheelhouse.NEVER.match(n)}  # the image's CUDA stack is never carried
    assert {"deepspeed", "pylate", "sentence-transformers"} <= names
    assert manifest["bytes"] <= wheelhouse.GOAL_MIB * 2**20
