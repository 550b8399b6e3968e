"""The package's shape: no import cycle, the trainer never loads the launcher, one model builder for every caller."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pylate.models import ColBERT

from colbertzero.models import colbert_for
from colbertzero.recipe import load_recipe
from colbertzero.train.export import export_model

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "colbertzero"


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """{module: package modules it imports}, at any depth of the file (function-level imports included)."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        out = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                # `from pkg import sub` imports the module pkg.sub when there is one, else a name of pkg
                targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in files else mod for a in node.names]
            else:
                continue
            out |= {t for t in targets if t in files and t != name}
        graph[name] = out
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_import_walk_sees_the_package():
    graph = _imports()
    assert {"colbertzero.train.runner", "colbertzero.launcher.api", "colbertzero.ledger"} <= set(graph)
    assert "colbertzero.ledger" in graph["colbertzero.launcher.api"]  # `from .. import ledger`
    assert "colbertzero.train.dist" in graph["colbertzero.train.runner"]  # `from . import dist`


def test_no_import_cycle_in_the_package():
    assert _cycles(_imports()) == []


def _package(module: str) -> str:
    """colbertzero.evaluate.dense -> colbertzero.evaluate; top-level modules stand for themselves."""
    return ".".join(module.split(".")[:2])


def test_no_import_cycle_between_the_packages():
    """Subpackages too (an import inside a function is an edge: it runs when the function does). A cycle between
    packages is a module that belongs below both."""
    graph: dict[str, set[str]] = {}
    for mod, deps in _imports().items():
        graph.setdefault(_package(mod), set()).update(_package(d) for d in deps if _package(d) != _package(mod))
    for deps in list(graph.values()):
        for d in deps:
            graph.setdefault(d, set())
    assert _cycles(graph) == []


# (what, regex, the one file allowed to hold it): each rule's home; nothing else in the package rebuilds it.
ONE_HOME = [
    ("run dir layout", r'"phases"\s*/|/\s*"phases"|/\s*"checkpoints"|/\s*"export"\b|"train\.jsonl"|"eval\.jsonl"',
     "layout.py"),
    ("step folder names", r"step-\{|step-%|:08d\}", "layout.py"),
    ("shard folders and indexes", r"shards_dir\)\s*/|\"index\.json\"", "data/shards.py"),
    ("the resume command", r"f\"colbertzero resume|`colbertzero resume \{", "runtime.py"),
    ("GPU-hours", r"/\s*3600\.0\s*(>|$)|\*\s*3600\.0", "ledger.py"),
    ("temporary names", r"mkdtemp|mkstemp|\.tmp-", "files.py"),
    ("calls to Slurm's clients", r'\[\s*"(sbatch|squeue|sacct|scontrol|scancel)"', "slurm.py"),
]


@pytest.mark.parametrize("what,pattern,home", ONE_HOME, ids=[w for w, _, _ in ONE_HOME])
def test_each_rule_has_one_home(what, pattern, home):
    found = [f"{p.relative_to(PACKAGE)}:{i}: {line.strip()}"
             for p in sorted(PACKAGE.rglob("*.py")) if str(p.relative_to(PACKAGE)) != home
             for i, line in enumerate(p.read_text().splitlines(), 1) if re.search(pattern, line)]
    assert not found, f"{what} is rebuilt outside colbertzero/{home}:\n" + "\n".join(found)


def test_folder_swaps_go_through_files():
    """A folder replaced whole is `files.replace_dir` / `files.folder_replacing`; the renames left elsewhere are a
    shard's own order (sidecar before rename) and an embeddings cache entry another process may have finished."""
    allowed = {"files.py", "data/shards.py", "retrieval/embeddings.py"}
    found = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
             if str(p.relative_to(PACKAGE)) not in allowed and re.search(r"os\.replace\(|\.rename\(", p.read_text())]
    assert not found, found


def test_the_architecture_page_names_only_modules_that_exist():
    """docs/architecture.md's map names every module of the package (package rows as `module.py`), and only those."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    table = text[text.index("## The map"):text.index("## Principles")]
    named: set[str] = set()
    for row in table.splitlines():
        if not row.startswith("| `"):
            continue
        cell, rest = row.split("|")[1].strip().strip("`"), row.split("|", 2)[2]
        if cell == "tools/":
            continue
        if cell.endswith("/"):
            named |= {f"{cell}{m}" for m in re.findall(r"`(\w+)\.py`", rest)}
        else:
            named.add(cell.removesuffix(".py"))
    modules = {str(p.relative_to(PACKAGE).with_suffix("")) for p in PACKAGE.rglob("*.py")
               if p.name not in ("__init__.py", "__main__.py")}
    assert named - modules == set(), f"the page names modules that do not exist: {sorted(named - modules)}"
    assert modules - named == set(), f"modules the page does not name: {sorted(modules - named)}"


def test_trainer_never_imports_the_launcher():
    graph = _imports()
    train = [m for m in graph if m.startswith("colbertzero.train")]
    offending = {m: sorted(t for t in graph[m] if t.startswith("colbertzero.launcher")) for m in train}
    assert not any(offending.values()), offending
    # and at run time: importing the runner loads neither the launcher nor submitit
    code = ("import sys, colbertzero.train.runner; "
            "print([m for m in sys.modules if m.startswith(('colbertzero.launcher', 'submitit'))])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_login_node_commands_load_no_torch():
    code = ("import sys, colbertzero.cli, colbertzero.preflight, colbertzero.ledger, colbertzero.runtime; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'deepspeed', 'pylate', 'transformers'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stderr[-2000:]


# Every model.* field away from its default, one recipe each (prompts off too: a phase-level setting the builder
# applies the same way).
VARIANTS = [
    [],
    ["model.embedding_size=96"],
    ["model.query_prefix='[QRY] '", "model.document_prefix='[DOC] '"],
    ["model.do_query_expansion=false"],
    ["model.attend_to_expansion_tokens=true"],
    ["model.skiplist_punctuation=false"],
    ["phases.unsupervised.prompts.enabled=false", "phases.supervised.prompts.enabled=false",
     "phases.distillation.prompts.enabled=false"],
]


def _settings(m: ColBERT) -> dict:
    # PyLate loads "no prompts" back as empty strings, which it applies as no prompt
    prompts = {k: v for k, v in (m.prompts or {}).items() if v}
    return {"skiplist": sorted(m.skiplist), "prompts": prompts, "query_prefix": m.query_prefix,
            "document_prefix": m.document_prefix, "query_prefix_id": m.query_prefix_id,
            "document_prefix_id": m.document_prefix_id, "query_length": m.query_length,
            "document_length": m.document_length, "do_query_expansion": m.do_query_expansion,
            "attend_to_expansion_tokens": m.attend_to_expansion_tokens, "dim": m[-1].out_features}


@pytest.mark.parametrize("overrides", VARIANTS, ids=lambda o: ",".join(o) or "defaults")
def test_training_and_export_build_the_same_model(overrides, tiny_modernbert, tmp_path):
    recipe = load_recipe(ROOT / "recipes" / "tiny-cpu.yaml", overrides)
    torch.manual_seed(0)
    trained = colbert_for(recipe, "unsupervised", tiny_modernbert, "cpu")  # what the runner builds
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.01)  # "training": the export must carry these weights, not the init's
    out = export_model(trained, tiny_modernbert, tmp_path / "export", recipe=recipe, phase_name="unsupervised",
                       manifest=None, lineage={}, step=1)
    exported = ColBERT(str(out), device="cpu")
    assert _settings(exported) == _settings(trained)
    for (name, a), (_, b) in zip(trained.state_dict().items(), exported.state_dict().items()):
        assert torch.equal(a, b.to(a.dtype)), name
    # the next phase's model, built from this export, keeps them too
    nxt = colbert_for(recipe, "supervised", out, "cpu")
    assert {k: v for k, v in _settings(nxt).items() if k not in ("query_length", "document_length")} == \
        {k: v for k, v in _settings(trained).items() if k not in ("query_length", "document_length")}
