"""The text of the demo data set, read from Python's own documentation (stdlib only: this file also runs alone in a
clean interpreter, ``python -I -S pydocs.py --python-docs``, so that no imported library changes what it reads).

- the Python Language Reference, as ``pydoc_data.topics`` (the pages ``help("assert")`` prints);
- the docstrings of a fixed list of standard-library modules (their functions, classes and methods).
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

# A fixed list, not "everything importable": the content must not depend on what else is installed, and some
# stdlib modules act on import (this, antigravity, turtle's Tk). Modules missing from a minimal Python are skipped.
STDLIB_MODULES = (
    "abc argparse array ast asyncio base64 binascii bisect bz2 calendar cmath codecs codeop collections colorsys "
    "concurrent.futures configparser contextlib contextvars copy csv dataclasses datetime decimal difflib "
    "email.message email.utils enum filecmp fnmatch fractions ftplib functools getopt gettext glob graphlib gzip "
    "hashlib heapq hmac html html.parser http.client http.cookies imaplib inspect io ipaddress itertools json "
    "logging logging.handlers lzma mailbox math mimetypes multiprocessing numbers operator optparse os os.path "
    "pathlib pickle pkgutil platform plistlib poplib pprint queue quopri random re reprlib sched secrets selectors "
    "shelve shlex shutil smtplib socket sqlite3 ssl stat statistics string struct subprocess sys tarfile tempfile "
    "textwrap threading time timeit tokenize traceback tracemalloc types typing unicodedata unittest urllib.parse "
    "urllib.request uuid warnings wave weakref xml.dom.minidom xml.etree.ElementTree zipfile zlib zoneinfo"
).split()

MAX_DOC_WORDS = 120  # about the 180 tokens a ColBERT document keeps; longer text would only be truncated
QUERY_WORDS = (3, 40)  # a summary line outside this range is no query (a fragment, or a paragraph)
MIN_DOC_WORDS = 12
TITLE_DOC_WORDS = 6  # a one-line docstring still answers "what does X do?"


class DemoDataError(RuntimeError):
    pass


# ---------------------------------------------------------------- text
_SPACE = re.compile(r"\s+")
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(`*])")
_SIGNATURE = re.compile(r"^[\w.]+\(.*\)\s*(-+>.*)?$")  # C builtins may open their docstring with their signature
_UNDERLINE = re.compile(r"^(\*+|=+|-+|~+)$")


def _clean(text: str) -> str:
    return _SPACE.sub(" ", text).strip()


def _words(text: str) -> int:
    return len(text.split())


def _trim(text: str, n: int = MAX_DOC_WORDS) -> str:
    w = text.split()
    return " ".join(w[:n])


def norm_query(text: str) -> str:
    """The form in which two queries count as the same (case, spacing and final punctuation ignored)."""
    return _SPACE.sub(" ", text.lower()).strip().rstrip("?.!: ")


def _first_sentence(paragraph: str) -> tuple[str, str]:
    parts = _SENTENCE.split(paragraph, maxsplit=1)
    return parts[0], (parts[1] if len(parts) > 1 else "")


@dataclass(frozen=True)
class Api:
    name: str  # module.qualname
    summary: str  # the docstring's first sentence
    body: str  # the rest, trimmed

    @property
    def text(self) -> str:
        return _trim(f"{self.summary} {self.body}".strip())

    @property
    def retrievable(self) -> bool:
        """Its summary reads as a query and its body can answer it (the docstrings source and the eval set)."""
        lo, hi = QUERY_WORDS
        s = self.summary
        return lo <= _words(s) <= hi and not s.endswith(":") and _words(self.body) >= MIN_DOC_WORDS


def _doc_of(obj) -> str | None:
    # obj.__doc__, not inspect.getdoc: getdoc inherits a parent class's docstring, which would duplicate documents.
    doc = getattr(obj, "__doc__", None)
    return inspect.cleandoc(doc) if isinstance(doc, str) and doc.strip() else None


def _split_docstring(doc: str) -> tuple[str, str] | None:
    paras = [p.strip() for p in re.split(r"\n\s*\n", doc) if p.strip()]
    while paras:
        lines = paras[0].splitlines()
        if not _SIGNATURE.match(lines[0].strip()):
            break
        rest = "\n".join(lines[1:]).strip().lstrip("-").strip()
        paras = ([rest] if rest else []) + paras[1:]
    if not paras:
        return None
    summary, tail = _first_sentence(_clean(paras[0]))
    return summary, _trim(_clean(" ".join([tail] + paras[1:])))


def _members(mod, modname: str) -> Iterable[tuple[str, object]]:
    """Public functions and classes defined by the module (not re-exported), then their public methods."""
    homes = {modname, mod.__name__, "_" + modname.rsplit(".", 1)[-1]}  # json / posixpath for os.path / _heapq
    for attr, obj in sorted(vars(mod).items()):
        if attr.startswith("_") or not (inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj)):
            continue
        # defined here, and under its own name (ArrayType is array.array again, SocketType is socket's base class)
        if getattr(obj, "__module__", None) not in homes or getattr(obj, "__name__", attr) != attr:
            continue
        yield f"{modname}.{attr}", obj
        if inspect.isclass(obj):
            for mname, m in sorted(vars(obj).items()):
                if mname.startswith("_"):
                    continue
                if isinstance(m, (classmethod, staticmethod)):
                    m = m.__func__
                elif isinstance(m, property):
                    m = m.fget
                elif not (inspect.isfunction(m) or inspect.ismethoddescriptor(m)):
                    continue
                yield f"{modname}.{attr}.{mname}", m


def stdlib_apis() -> list[Api]:
    """Documented stdlib APIs with distinct docstrings, in module-list then name order (as this process sees them;
    ``read_python_docs`` reads them in a clean interpreter)."""
    out, seen = [], set()
    for modname in STDLIB_MODULES:
        try:
            mod = importlib.import_module(modname)
        except ImportError:
            continue
        for name, obj in _members(mod, modname):
            doc = _doc_of(obj)
            parts = _split_docstring(doc) if doc else None
            if parts is None:
                continue
            api = Api(name, *parts)
            key = api.text.lower()
            if _words(api.text) < TITLE_DOC_WORDS or key in seen:
                continue
            seen.add(key)
            out.append(api)
    return out


def retrievable_apis(apis: list[Api]) -> list[Api]:
    """APIs whose summary can serve as a query with exactly one answer: "Return self==value." documents many
    names, so a summary (or a body) shared by two APIs drops both."""
    pool = [a for a in apis if a.retrievable]
    qn = Counter(norm_query(a.summary) for a in pool)
    dn = Counter(a.body.lower() for a in pool)
    return [a for a in pool if qn[norm_query(a.summary)] == 1 and dn[a.body.lower()] == 1]


def reference_pairs() -> list[tuple[str, str]]:
    """(query, document) from the Language Reference: heading → section text, first sentence → rest of paragraph."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise DemoDataError(
            "this Python lacks pydoc_data (the Language Reference text); some distributions ship it in a separate "
            "python3-doc / libpython3-stdlib package"
        ) from None
    pairs = []
    for key in sorted(topics):
        lines = topics[key].split("\n")
        sections: list[tuple[str, list[str]]] = []
        i = 0
        while i < len(lines):
            line = lines[i]
            nxt = lines[i + 1] if i + 1 < len(lines) else ""
            if line.strip() and _UNDERLINE.match(nxt) and len(nxt) == len(line):
                sections.append((_clean(line), []))
                i += 2
                continue
            if sections:
                sections[-1][1].append(line)
            i += 1
        for heading, body_lines in sections:
            paras = re.split(r"\n\s*\n", "\n".join(body_lines))
            # prose only: indented blocks are grammar rules and code, and a paragraph opening in lower case
            # continues a sentence cut by such a block
            prose = [
                _clean(p)
                for p in paras
                if p.strip() and not p[0].isspace() and not p[0].islower() and _words(p) >= MIN_DOC_WORDS
            ]
            if prose:
                pairs.append((heading, _trim(" ".join(prose))))
            for p in prose:
                first, rest = _first_sentence(p)
                if QUERY_WORDS[0] <= _words(first) <= QUERY_WORDS[1] and _words(rest) >= MIN_DOC_WORDS:
                    pairs.append((first, _trim(rest)))
    return pairs


def read_python_docs() -> tuple[list[Api], list[tuple[str, str]]]:
    """``stdlib_apis()`` and ``reference_pairs()`` as a fresh interpreter without site-packages sees them.

    Libraries imported into this process patch the standard library (torch replaces ``inspect.getfile``,
    transformers adds ``logging.Logger.warning_once``), so reading it here would make the data depend on what was
    imported before. ``-I -S``: no environment variables, no user or site packages.
    """
    try:
        proc = subprocess.run(
            [sys.executable, "-I", "-S", str(Path(__file__).resolve()), "--python-docs"],
            capture_output=True,
            text=True,
            timeout=300,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise DemoDataError(f"could not run {sys.executable} to read the stdlib documentation: {e}") from None
    if proc.returncode != 0:
        raise DemoDataError(
            f"reading the standard library's documentation failed ({sys.executable} -I -S, exit {proc.returncode}):\n"
            + proc.stderr.strip()[-2000:]
        )
    data = json.loads(proc.stdout)
    return [Api(*a) for a in data["apis"]], [tuple(p) for p in data["reference"]]


def _print_python_docs() -> None:
    if sys.flags.optimize >= 2:
        raise DemoDataError("Python runs with -OO, which strips docstrings; run the demo data build without -OO")
    out = {"apis": [[a.name, a.summary, a.body] for a in stdlib_apis()], "reference": reference_pairs()}
    sys.stdout.write(json.dumps(out, ensure_ascii=True))  # ASCII: whatever this interpreter's locale is


if __name__ == "__main__" and sys.argv[1:] == ["--python-docs"]:
    _print_python_docs()
