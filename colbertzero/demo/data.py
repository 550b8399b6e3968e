"""The demo data set, built from text that ships with Python itself: no hub, no download, no ``../shared/data``.

Two kinds of real technical English, present in every CPython install:

- the Python Language Reference, as ``pydoc_data.topics`` (the pages ``help("assert")`` prints);
- the docstrings of a fixed list of standard-library modules (their functions, classes and methods).

Python's documentation is licensed under the PSF License Version 2; since Python 3.8.6 the code examples in it are
dual-licensed PSF-2.0 / Zero-Clause BSD. The built folder carries that licence (copied from the running Python when
it ships one) and a README saying where every file comes from.

From that text, for each phase's data shape (``build_demo_data``):

- ``train/pairs/<source>.jsonl`` — unsupervised (``query``, ``document``), one file per source so global batches can
  be drawn from one source at a time:
  ``docstrings`` (an API's summary line → the rest of its docstring), ``titles`` ("What does json.dumps do?" → its
  whole docstring) and ``topics`` (a language-reference heading or a paragraph's first sentence → the text after it);
- ``beir/pydocs/`` — an evaluation set in BEIR layout: held-out APIs' summary lines as queries; the corpus holds the
  docstring body of every API whose summary could be a query. No held-out API, and no document holding a held-out
  answer, appears in any training file, and no eval query equals a training query.

This is what a researcher with a new domain starts from: queries with their documents, and a corpus. The supervised
and distillation data are derived from the pairs by `colbertzero mine` and `colbertzero score` (``demo/derived.py``).

Everything is seeded and sorted, and the text is read in a clean interpreter: two builds on the same Python give
byte-identical files. The text itself depends on the Python version (docstrings change between releases), which is
recorded in ``demo_data.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from filelock import FileLock

from ..files import folder_replacing
from .pydocs import (
    STDLIB_MODULES,
    DemoDataError,
    norm_query,
    read_python_docs,
    retrievable_apis,
)

FORMAT = "colbertzero-demo-data/2"
INFO = "demo_data.json"
SOURCES = ("docstrings", "titles", "topics")
EVAL_NAME = "pydocs"
TITLE_TEMPLATES = ("What does {} do?", "What is {} for?", "{}", "How do I use {}?", "{} documentation")


# ---------------------------------------------------------------- build
@dataclass(frozen=True)
class Params:
    seed: int = 0
    eval_queries: int = 200


def _jsonl(path: Path, rows: Iterable[dict]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    return n


def _build(root: Path, params: Params) -> dict:
    rng = random.Random(params.seed)
    apis, ref = read_python_docs()
    pool = retrievable_apis(apis)
    if len(pool) < params.eval_queries * 3:
        raise DemoDataError(
            f"only {len(pool)} stdlib APIs with a usable summary and body; "
            f"too few for {params.eval_queries} eval queries"
        )
    held = {a.name for a in rng.sample(pool, params.eval_queries)}

    # unsupervised pairs, one file per source; a query repeated within a source keeps its first document
    pairs: dict[str, list[tuple[str, str]]] = {
        "docstrings": [(a.summary, a.body) for a in pool if a.name not in held],
        "titles": [(rng.choice(TITLE_TEMPLATES).format(a.name), a.text) for a in apis if a.name not in held],
        "topics": ref,
    }
    # docstrings copy each other (walk_packages repeats iter_modules' paragraph): a training document holding a
    # held-out answer would leak it
    held_bodies = [a.body.lower() for a in pool if a.name in held]

    def leaks(doc: str) -> bool:
        low = doc.lower()
        return any(h in low for h in held_bodies)

    for src, rows in pairs.items():
        seen: set[str] = set()
        pairs[src] = [
            r for r in rows if not (leaks(r[1]) or norm_query(r[0]) in seen or seen.add(norm_query(r[0])))
        ]
    train_queries = {norm_query(q) for rows in pairs.values() for q, _ in rows}
    eval_apis = [a for a in pool if a.name in held and norm_query(a.summary) not in train_queries]

    counts: dict[str, float] = {}
    for src in SOURCES:
        rel = f"train/pairs/{src}.jsonl"
        counts[f"pairs/{src}"] = _jsonl(root / rel, ({"query": q, "document": d} for q, d in pairs[src]))

    beir = root / "beir" / EVAL_NAME
    counts["eval/corpus"] = _jsonl(beir / "corpus.jsonl", ({"_id": a.name, "title": "", "text": a.body} for a in pool))
    eval_apis.sort(key=lambda a: a.name)
    qids = [f"q{i:04d}" for i in range(len(eval_apis))]
    counts["eval/queries"] = _jsonl(
        beir / "queries.jsonl", ({"_id": qid, "text": a.summary} for qid, a in zip(qids, eval_apis))
    )
    (beir / "qrels").mkdir(parents=True, exist_ok=True)
    # BEIR's qrels files carry a header line; its loaders skip the first line
    qrels = "query-id\tcorpus-id\tscore\n" + "".join(f"{qid}\t{a.name}\t1\n" for qid, a in zip(qids, eval_apis))
    (beir / "qrels" / "test.tsv").write_text(qrels, encoding="utf-8")
    counts["eval/qrels"] = len(eval_apis)
    _write_notices(root, params, counts)
    return counts


def _python_license() -> str | None:
    for base in (sys.base_prefix, sys.prefix):
        for cand in (
            Path(base) / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "LICENSE.txt",
            Path(base) / "LICENSE.txt",
        ):
            if cand.is_file():
                return cand.read_text(encoding="utf-8", errors="replace")
    return None


def _write_notices(root: Path, params: Params, counts: dict) -> None:
    lic = _python_license()
    header = (
        "The text in this folder comes from the Python documentation shipped with CPython "
        f"{sys.version.split()[0]}: the Language Reference (module pydoc_data.topics) and the docstrings of "
        "standard-library modules.\n"
        "Python's documentation is licensed under the Python Software Foundation License Version 2; "
        "examples, recipes and other code in the documentation are dual licensed under the PSF License Version 2 "
        "and the Zero-Clause BSD license. Copyright (c) 2001 Python Software Foundation; All Rights Reserved.\n"
        "See https://docs.python.org/3/license.html.\n"
    )
    body = lic if lic else "(this Python installation ships no LICENSE.txt; the licence text is at the address above)\n"
    (root / "LICENSE").write_text(header + "\n" + "=" * 78 + "\n\n" + body, encoding="utf-8")
    rows = [
        ("train/pairs/docstrings.jsonl", counts["pairs/docstrings"], "query, document",
         "an API's docstring: first sentence → the rest"),
        ("train/pairs/titles.jsonl", counts["pairs/titles"], "query, document",
         'a question naming the API (e.g. "What does json.dumps do?") → its docstring'),
        ("train/pairs/topics.jsonl", counts["pairs/topics"], "query, document",
         "the Language Reference: a heading → its section; a paragraph's first sentence → the rest"),
        (f"beir/{EVAL_NAME}/", f"{counts['eval/queries']} queries, {counts['eval/corpus']} documents", "BEIR layout",
         "held-out APIs' first sentences → their docstring bodies; the corpus holds the body of every API whose first "
         "sentence could be a query, held out or not"),
    ]
    table = "\n".join(f"| {f} | {n} | {shape} | {where} |" for f, n, shape, where in rows)
    readme = f"""# colbertzero demo data

Built by `colbertzero.demo.data.build_demo_data` (format `{FORMAT}`) from text that ships with Python
{sys.version.split()[0]}; no download. Licence: Python Software Foundation License Version 2 (see LICENSE).

Sources: the Python Language Reference as CPython ships it in the module `pydoc_data.topics` (what `help("assert")`
prints), and the docstrings (`__doc__`) of the public functions, classes and methods of these standard-library
modules: {", ".join(f"`{m}`" for m in STDLIB_MODULES)} (a module this Python lacks is skipped).

| file | rows | shape | where the text comes from |
|---|---|---|---|
{table}

The {params.eval_queries} held-out APIs appear in no training file, none of their documents serves as a negative,
and no eval query equals a training query. Seed {params.seed}; two builds on the same Python are identical.
Docstrings change between Python releases, so another Python builds other (equally valid) data.
"""
    (root / "README.md").write_text(readme, encoding="utf-8")


def _paths(root: Path) -> dict:
    return {
        "root": str(root),
        "pairs": {s: str(root / "train" / "pairs" / f"{s}.jsonl") for s in SOURCES},
        "beir": str(root / "beir" / EVAL_NAME),
        "readme": str(root / "README.md"),
        "license": str(root / "LICENSE"),
        "info": str(root / INFO),
    }


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _wanted(params: Params) -> dict:
    return {"format": FORMAT, "params": params.__dict__, "python": sys.version.split()[0]}


def _complete(root: Path, want: dict) -> bool:
    """The folder holds a finished build of these parameters on this Python, every file intact."""
    try:
        info = json.loads((root / INFO).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if {k: info.get(k) for k in want} != want:
        return False
    files = info.get("files") or {}
    return bool(files) and all((root / rel).is_file() and _sha256(root / rel) == h for rel, h in files.items())


def build_demo_data(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    eval_queries: int = 200,
) -> dict:
    """Build the demo data set into ``out_dir`` (skipped when a complete build of the same parameters is there).

    Returns the paths: ``root``, ``pairs`` ({source: file}), ``beir`` (the BEIR folder),
    ``readme``, ``license``, ``info`` (``demo_data.json``: parameters, Python version, row counts, file hashes).
    The build goes to a temp folder beside ``out_dir`` and is renamed into place, so a killed build leaves nothing
    that looks complete. A non-empty ``out_dir`` that is not demo data is refused, never overwritten.
    """
    params = Params(seed, eval_queries)
    if eval_queries < 1:
        raise DemoDataError("eval_queries must be at least 1")
    root = Path(out_dir).resolve()
    want = _wanted(params)
    if _complete(root, want):
        return _paths(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root.parent / f".{root.name}.lock"), timeout=600):
        if _complete(root, want):  # another process finished it while we waited
            return _paths(root)
        if root.exists() and (not root.is_dir() or (any(root.iterdir()) and not (root / INFO).exists())):
            raise DemoDataError(f"{root}: exists and is not a demo data folder; refusing to overwrite it")
        with folder_replacing(root) as tmp:  # an older or other-parameter build is replaced whole
            counts = _build(tmp, params)
            files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
            info = {**want, "counts": counts, "files": {rel: _sha256(tmp / rel) for rel in files}}
            (tmp / INFO).write_text(json.dumps(info, indent=2) + "\n")
    return _paths(root)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
