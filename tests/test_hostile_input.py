"""Hostile strings never reach a shell as code: every recipe string that goes into generated scripts, and the run dir,
is refused or quoted. The scripts are generated for real and run by bash with `sbatch`, `srun` and the Python of
the phase scripts replaced by recorders on PATH; an injected command would create a marker file."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from colbertzero.launcher.sbatch import write_sbatch_scripts
from colbertzero.manifest import ManifestError
from colbertzero.recipe import RecipeError, load_recipe

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "recipes" / "tiny-cpu-slurm.yaml"

# Pieces an attacker (or a slip of the keyboard) puts into a value: shell syntax, quotes, newlines, expansions.
PAYLOADS = ["$(touch {m})", "`touch {m}`", "; touch {m}", "' ; touch {m} ; '", '" ; touch {m} ; "', "\ntouch {m}\n",
            "${{IFS}}touch${{IFS}}{m}", "&& touch {m}", "| touch {m}", "\\\ntouch {m}", "$HOME", "a b", "-x", "#"]

RECORDER = """#!/bin/bash
printf '%s\\0' "$0" "$@" >> "$RECORD"
printf '\\n' >> "$RECORD"
echo 4242
"""


def _hostile(marker: Path):
    return st.lists(st.sampled_from(PAYLOADS) | st.text(alphabet=" $'\"`;|&\\\n\t()#*?~ab-", max_size=12),
                    min_size=1, max_size=3).map(lambda parts: "".join(p.format(m=marker) for p in parts))


def _recorders(folder: Path) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("sbatch", "srun", "squeue", "scontrol", "fake-python"):
        tool = folder / name
        tool.write_text(RECORDER)
        tool.chmod(0o755)
    return {"PATH": f"{folder}{os.pathsep}{os.environ['PATH']}", "RECORD": str(folder / "record"),
            "COLBERTZERO_PYTHON": str(folder / "fake-python")}


def _directives(script: str) -> dict[str, str]:
    """#SBATCH options as sbatch reads them: the leading comment block, each line shell-split."""
    out = {}
    for line in script.splitlines()[1:]:
        if not line.startswith("#"):
            if line.strip():
                break
            continue
        if line.startswith("#SBATCH "):
            word = shlex.split(line[len("#SBATCH "):])
            assert len(word) == 1, line  # one option per line, quoting intact
            key, _, value = word[0][2:].partition("=")
            out[key] = value
    return out


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_hostile_strings_are_refused_or_quoted(tmp_path_factory, data):
    work = tmp_path_factory.mktemp("hostile")
    marker = work / "INJECTED"
    hostile = _hostile(marker)
    values = {"account": data.draw(hostile), "partition": data.draw(hostile), "qos": data.draw(hostile),
              "constraint": data.draw(hostile), "extra": data.draw(hostile)}
    run_dir = work / ("run" + data.draw(hostile).replace("/", "_").replace("\0", ""))
    doc = {"extends": str(BASE), "name": "hostile", "phases": {"supervised": None, "distillation": None,
           "unsupervised": {"eval": {"beir": []}, "resources": {
               "account": values["account"], "partition": values["partition"], "qos": values["qos"],
               "constraint": values["constraint"], "extra_sbatch": [f"--comment={values['extra']}"]}}}}
    recipe_file = work / "r.yaml"
    recipe_file.write_text(yaml.safe_dump(doc))
    try:
        recipe = load_recipe(recipe_file, ["phases.unsupervised.data.shards_dir=" + str(work / "shards")])
        paths = write_sbatch_scripts(recipe, run_dir)
    except (RecipeError, ManifestError) as e:  # refused: one message, naming what to fix
        # the two reasons a hostile value here is refused: a control character, or a ${VAR} not set
        assert "control characters" in str(e) or "is not set (set it or write" in str(e), str(e)
        assert not marker.exists()
        return
    env = {**os.environ, **_recorders(work / "bin")}
    phase = next(p for p in paths if p.name == "unsupervised.sbatch")
    directives = _directives(phase.read_text())
    for key in ("account", "partition", "qos", "constraint"):
        # the value, whole, as sbatch reads it (an empty one means "not set")
        assert directives.get(key) == (values[key] or None), key
    assert directives["comment"] == values["extra"] and {"time", "requeue", "signal", "nodes"} <= set(directives)
    for script in paths:  # run every script: recorders stand in for Slurm and the phase's Python
        subprocess.run(["bash", str(script)], env=env, cwd=work, capture_output=True, timeout=60)
    assert not marker.exists(), "an injected command ran"
    calls = [c.split("\0")[:-1] for c in (work / "bin" / "record").read_text().split("\n") if c]
    srun = next(c for c in calls if c[0].endswith("srun"))
    assert srun[-4:] == ["train", str(run_dir), "--phase", "unsupervised"]  # the run dir, one argument


def test_run_dir_and_names_with_control_characters_are_refused(tmp_path):
    recipe = load_recipe(BASE)
    with pytest.raises(ManifestError, match="control characters"):
        write_sbatch_scripts(recipe, tmp_path / "run\ntouch x")
    for override, what in (("name=..", "recipe name"), ("name=-rf", "recipe name"),
                           ('phases.unsupervised.resources.account="a\\nb"', "control characters")):
        with pytest.raises(RecipeError, match=what):
            load_recipe(BASE, [override])
    res = subprocess.run([sys.executable, "-m", "colbertzero", "sbatch", str(BASE), "--run-dir",
                          str(tmp_path / "a\tb")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 2 and "control characters" in res.stderr and "Traceback" not in res.stderr
