"""The docs cannot fall behind the code: every recipe field is in docs/recipes.md (its generated table current), and
every `colbertzero` command and flag the docs show exists."""

from __future__ import annotations

import argparse
import importlib.util
import re
import typing
from pathlib import Path

from pydantic import BaseModel

from colbertzero import recipe as R

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "recipes.md"


def _generator():
    spec = importlib.util.spec_from_file_location("gen_recipe_docs", ROOT / "tools" / "gen_recipe_docs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _schema_paths(cls: type[BaseModel], prefix: str = "") -> list[str]:
    """Walked here on its own (not with the generator's walk), so a generator bug cannot hide a field."""
    out = []
    for name, f in cls.model_fields.items():
        if f.exclude:
            continue
        key = f.alias or name
        path = f"{prefix}{key}"
        out.append(path)
        origin, args = typing.get_origin(f.annotation), typing.get_args(f.annotation)
        if origin is dict:  # phases: {name: Phase}
            nested, sub = [args[1]], f"{path}.<phase>."
        elif origin is list:  # sources: [Source]
            nested, sub = [args[0]], f"{path}[]."
        else:  # a model, or a union holding one (init: str | InitFrom)
            nested, sub = [f.annotation, *args], f"{path}."
        for a in nested:
            if isinstance(a, type) and issubclass(a, BaseModel) and a is not R.InitFrom:
                out += _schema_paths(a, sub)
    return out


def test_every_schema_field_is_documented():
    doc = DOC.read_text()
    paths = _schema_paths(R.Recipe)
    assert len(paths) > 100  # the walk found the nested sections
    missing = [p for p in paths if f"| `{p}` |" not in doc]
    assert not missing, f"docs/recipes.md lacks {missing}: run python tools/gen_recipe_docs.py"


def test_generated_table_is_current(capsys):
    assert _generator().main(["--check"]) == 0, capsys.readouterr().err


def test_paper_values_come_from_the_paper_recipe():
    doc = DOC.read_text()
    # a few rows checked against recipes/colbert-zero.yaml by hand
    assert "| `phases.<phase>.temperature` | float | `1` | `0.02` / `0.2` / `1` |" in doc
    assert "| `phases.<phase>.global_batch_size` | int | required | `16384` / `64` / `32` |" in doc
    assert "| `model.embedding_size` | int | `128` | `128` |" in doc


# ---------------------------------------------------------------- commands in the docs
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "slurm" / "README.md"]
COMMAND = re.compile(r"colbertzero (plan|validate|status|prepare|train|evaluate|report|launch|resume|sbatch|demo)\b"
                     r"([^`\n|]*)")


def _options(parser) -> dict[str, set[str]]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: {s for a in sp._actions for s in a.option_strings} for name, sp in sub.choices.items()}


def test_documented_commands_and_flags_exist():
    from colbertzero.cli import build_parser

    options = _options(build_parser())
    seen, wrong = 0, []
    for doc in DOCS:
        if not doc.is_file():
            continue
        for line in doc.read_text().splitlines():
            for cmd, rest in COMMAND.findall(line):
                seen += 1
                for flag in re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", rest):
                    if flag not in options[cmd]:
                        wrong.append(f"{doc.relative_to(ROOT)}: `colbertzero {cmd} … {flag}`")
    assert seen > 30  # the pattern found the docs' commands
    assert not wrong, "documented flags that the CLI does not have:\n" + "\n".join(wrong)


def test_quality_bench_flags_exist():
    src = (ROOT / "tools" / "bench" / "quality.py").read_text()
    lines = [line for d in DOCS if d.is_file() for line in d.read_text().splitlines() if "quality.py" in line]
    flags = {f for line in lines for f in re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", line)}
    assert flags, "the docs show no quality.py flag"
    assert all(f'"{f}"' in src for f in flags), flags
