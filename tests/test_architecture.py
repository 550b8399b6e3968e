"""The package's shape: no import cycle, the trainer never loads the launcher, one model builder for every caller."""

from __future__ import annotations

import ast
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
