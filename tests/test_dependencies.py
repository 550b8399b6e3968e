"""Every third-party module that colbertzero/, tools/ and tests/ import is declared, so a fresh machine has it.

The imports are read from the source (AST, any depth: imports inside functions count), each top-level module mapped to
its distribution by `importlib.metadata.packages_distributions`, and looked up in what `tools/install.sh` installs:
setup.cfg's `install_requires`, the extras it installs (`demo`, `test`) and `requirements-nodeps.txt`. The package
itself may use an optional extra only lazily (inside a function) and must name that extra in its message. A module
that is not installed here at all (the fused kernel without CUDA) must be such an optional import.
"""

from __future__ import annotations

import ast
import configparser
import re
import shutil
import subprocess
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
TREES = ("colbertzero", "tools", "tests")
INSTALLED_EXTRAS = ("demo", "test")  # `pip install -e '.[demo,test]'` in tools/install.sh


def _names(lines: str) -> set[str]:
    return {canonicalize_name(Requirement(x).name) for x in lines.splitlines() if x.strip()}


def declared(setup_cfg: Path, nodeps: Path) -> tuple[set[str], dict[str, set[str]]]:
    """(what install.sh installs for everyone, {extra: its distributions})."""
    cfg = configparser.ConfigParser()
    cfg.read(setup_cfg)
    extras = {k: _names(v) for k, v in cfg["options.extras_require"].items()}
    core = _names(cfg["options"]["install_requires"])
    core |= {canonicalize_name(Requirement(line.split("#")[0]).name)
             for line in nodeps.read_text().splitlines() if line.split("#")[0].strip()}
    return core, extras


def _is_function_level(tree: ast.AST) -> set[int]:
    """Line numbers of imports inside a function body (imported only when that code runs)."""
    lines = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines |= {n.lineno for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))}
    return lines


def third_party_imports(root: Path = ROOT) -> list[tuple[str, str, int, bool]]:
    """(top-level module, file relative to root, line, inside a function) for every non-stdlib, non-local import."""
    files = [p for t in TREES for p in (root / t).rglob("*.py")]
    local = {"colbertzero"} | {p.stem for p in files}  # tools/ and tests/ import their sibling scripts
    out = []
    for path in files:
        tree = ast.parse(path.read_text(), str(path))
        lazy = _is_function_level(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods = [node.module]
            else:
                continue
            for mod in mods:
                top = mod.split(".")[0]
                if top not in sys.stdlib_module_names and top not in local and top != "__future__":
                    out.append((top, str(path.relative_to(root)), node.lineno, node.lineno in lazy))
    return out


def undeclared(root: Path, setup_cfg: Path, nodeps: Path) -> list[str]:
    """One line per import that a fresh install would not satisfy."""
    core, extras = declared(setup_cfg, nodeps)
    installed = core | {d for e in INSTALLED_EXTRAS for d in extras.get(e, set())}
    dists = packages_distributions()
    problems = []
    for top, rel, line, lazy in third_party_imports(root):
        names = {canonicalize_name(d) for d in dists.get(top, [])} or {canonicalize_name(top)}
        where = f"{rel}:{line}: import {top}"
        in_package = rel.startswith("colbertzero/")
        if names & (core if in_package else installed):
            continue
        optional = [e for e, ds in extras.items() if names & ds]
        text = (root / rel).read_text()
        named = [e for e in optional if re.search(rf"\[{re.escape(e)}\]", text)]
        if optional and lazy and named:
            continue  # an optional extra, imported only when used, its message naming the extra
        if not optional:
            problems.append(f"{where}: distribution {'/'.join(sorted(names))} is in no requirement of setup.cfg or "
                            "requirements-nodeps.txt")
        elif not lazy:
            problems.append(f"{where}: only in extra(s) {optional}, but imported when the module loads")
        else:
            problems.append(f"{where}: only in extra(s) {optional}; its failure message does not name the extra "
                            f"(write e.g. pip install '.[{optional[0]}]')")
    return sorted(problems)


def test_every_import_is_declared():
    assert undeclared(ROOT, ROOT / "setup.cfg", ROOT / "requirements-nodeps.txt") == []


def test_the_walk_sees_the_imports_it_must_check():
    found = {(top, rel) for top, rel, _, _ in third_party_imports()}
    assert ("bm25s", "colbertzero/retrieval/models.py") in found  # inside a function
    assert ("psutil", "tools/bench/chaos.py") in found
    assert ("late_interaction_kernels", "colbertzero/scoring.py") in found  # not installed on a CPU machine
    assert not any(top in ("os", "json", "colbertzero", "local_slurm", "quality") for top, _ in found)


@pytest.mark.parametrize("requirement,where", [("bm25s[indexing]==0.3.16", "colbertzero/retrieval/models.py"),
                                               ("psutil", "tools/bench/chaos.py"),
                                               ("submitit==1.5.4", "colbertzero/launcher/submit.py")])
def test_removing_a_declared_dependency_fails(tmp_path, requirement, where):
    """The same check on a copy of setup.cfg without one requirement names the imports that lose it."""
    cfg = (ROOT / "setup.cfg").read_text()
    line = f"    {requirement}\n"
    assert line in cfg, requirement
    (tmp_path / "setup.cfg").write_text(cfg.replace(line, ""))
    shutil.copy(ROOT / "requirements-nodeps.txt", tmp_path)
    problems = undeclared(ROOT, tmp_path / "setup.cfg", tmp_path / "requirements-nodeps.txt")
    assert any(p.startswith(where) for p in problems), problems


def test_an_optional_import_must_be_lazy_and_name_its_extra(tmp_path):
    pkg = tmp_path / "colbertzero"
    pkg.mkdir()
    for t in TREES[1:]:
        (tmp_path / t).mkdir()
    (pkg / "eager.py").write_text("import late_interaction_kernels\n")
    (pkg / "silent.py").write_text("def f():\n    import wandb\n    raise RuntimeError('wandb is missing')\n")
    (pkg / "good.py").write_text("def f():\n    try:\n        import wandb\n    except ImportError:\n"
                                 "        raise RuntimeError(\"pip install '.[wandb]'\")\n")
    problems = undeclared(tmp_path, ROOT / "setup.cfg", ROOT / "requirements-nodeps.txt")
    assert [p.split(":")[0] for p in problems] == ["colbertzero/eager.py", "colbertzero/silent.py"], problems
    assert "imported when the module loads" in problems[0] and "does not name the extra" in problems[1]


def test_pip_check_allows_only_what_requirements_nodeps_skips():
    sys.path.insert(0, str(ROOT / "tools"))
    import pip_check

    skips = pip_check.allowed()
    assert skips == {"pylate": {"fast-plaid", "fastkmeans"}}
    expected, other = pip_check.judge([
        "pylate 1.6.0 requires fast-plaid, which is not installed.",
        "pylate 1.6.0 requires fastkmeans, which is not installed.",
        "pylate 1.6.0 requires ujson, which is not installed.",  # a runtime need: setup.cfg must bring it
        "pylate 1.6.0 has requirement ninja==1.11.1.4, but you have ninja 1.13.2.",
        "colbertzero 0.1.0 requires bm25s, which is not installed.",
    ], skips)
    assert expected == ["pylate 1.6.0 requires fast-plaid, which is not installed.",
                        "pylate 1.6.0 requires fastkmeans, which is not installed."]
    assert len(other) == 3
    # and this environment, installed by tools/install.sh, passes it
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "pip_check.py")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
