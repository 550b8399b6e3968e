"""Hostile strings never reach a shell as code. Every recipe string that goes into a generated script, and the run
dir, is refused (control characters, which end a line somewhere) or quoted — in the plain sbatch scripts, in
submitit's submission files (`colbertzero launch --executor slurm`) and in `runtime.detach`'s `sbatch --wrap` (the
evaluation jobs). The scripts are generated for real and run by bash, with `sbatch`, `srun`, the other Slurm
clients and the phase's Python replaced by recorders on PATH: an injected command would create a marker file, and
every recorded argument must be the value exactly as written."""

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

from colbertzero import runtime
from colbertzero.launcher.api import launch
from colbertzero.launcher.sbatch import write_sbatch_scripts
from colbertzero.manifest import ManifestError
from colbertzero.recipe import RecipeError, load_recipe

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "recipes" / "tiny-cpu-slurm.yaml"

# One example of every kind of payload: shell syntax, quotes, expansions, globs, option-looking values, and the
# characters that end a line for some reader (refused: REFUSED).
PAYLOADS = {
    "command substitution": "$(touch {m})",
    "backticks": "`touch {m}`",
    "semicolon": "a; touch {m}",
    "and": "a && touch {m}",
    "pipe": "a | touch {m}",
    "single quote": "a' ; touch {m} ; '",
    "double quote": 'a" ; touch {m} ; "',
    "variable": "$HOME;touch$IFS{m}",  # (${VAR} is the recipe's own expansion, from the environment)
    "glob": "*",
    "leading dash": "-a --wrap=touch",
    "comment": "# a",
    "backslash": "a\\ b\\",
    "newline": "a\ntouch {m}",
    "carriage return": "a\rtouch {m}",
    "unicode line separator": "a\u2028touch {m}",
    "unicode paragraph separator": "a\u2029touch {m}",
    "next line (C1)": "a\x85touch {m}",
}
REFUSED = {"newline", "carriage return", "unicode line separator", "unicode paragraph separator", "next line (C1)"}
# The recipe fields whose values reach a script (mem and time_limit have formats of their own: only digits, units
# and colons pass; names of recipes, phases and sources are checked names).
FIELDS = ("account", "partition", "qos", "constraint")

RECORDER = r"""#!/bin/bash
printf '%s\0' "$(basename "$0")" "$@" >> "$RECORD"
printf '\n' >> "$RECORD"
n=$((4000 + $(wc -l < "$RECORD")))  # a job id of its own per call
case " $* " in *" --parsable "*) echo "$n" ;; *) echo "Submitted batch job $n" ;; esac
"""
CLIENTS = ("sbatch", "srun", "squeue", "sacct", "scontrol", "scancel", "sinfo", "fake-python")


def _recorders(folder: Path) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    for name in CLIENTS:
        tool = folder / name
        tool.write_text(RECORDER)
        tool.chmod(0o755)
    return {"PATH": f"{folder}{os.pathsep}{os.environ['PATH']}", "RECORD": str(folder / "record"),
            "COLBERTZERO_PYTHON": str(folder / "fake-python"),
            "SLURM_ARRAY_TASK_ID": "0"}  # what Slurm sets in an array task (prepare.sbatch reads it)


def _calls(env: dict) -> list[list[str]]:
    path = Path(env["RECORD"])
    return [c.split("\0")[:-1] for c in path.read_text().split("\n") if c] if path.exists() else []


def _directives(script: str) -> dict[str, str]:
    """#SBATCH options as sbatch reads them: the leading comment block, each line shell-split."""
    out = {}
    for line in script.split("\n")[1:]:
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


def _hostile_recipe(work: Path, value: str) -> Path:
    """tiny-cpu-slurm (unsupervised only) with `value` in every field that reaches a script: the phase's and the
    prepare job's account/partition/qos/constraint and an extra_sbatch option of each, and the evaluation job's
    partition."""
    res = {f: value for f in FIELDS}
    res["extra_sbatch"] = [f"--comment={value}"]
    prep = {f: value for f in FIELDS if f != "constraint"}
    prep["extra_sbatch"] = [f"--comment={value}"]
    doc = {"extends": str(BASE), "name": "hostile", "prepare": prep,
           "phases": {"supervised": None, "distillation": None,
                      "unsupervised": {"eval": {"beir": [], "job": {"partition": value}}, "resources": res,
                                       "data": {"shards_dir": str(work / "shards")}}}}
    path = work / "r.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True))
    return path


def _run_dir(work: Path, value: str) -> Path:
    return work / ("run" + value.replace("/", "_").replace("\0", ""))


def _expected_directives(value: str, phase: bool) -> dict[str, str]:
    fields = FIELDS if phase else FIELDS[:3]
    return {**{f: value for f in fields}, "comment": value}


def _run_scripts(paths: list[Path], env: dict, cwd: Path) -> int:
    ran = 0
    for script in paths:
        before = len(_calls(env))
        r = subprocess.run(["bash", str(script)], env=env, cwd=cwd, capture_output=True, text=True, timeout=60)
        assert len(_calls(env)) > before, f"{script.name} called nothing (exit {r.returncode}): {r.stderr[-800:]}"
        ran += 1
    return ran


@pytest.mark.parametrize("kind", PAYLOADS)
def test_every_payload_in_every_field_of_the_plain_scripts(kind, tmp_path):
    marker = tmp_path / "INJECTED"
    value = PAYLOADS[kind].format(m=marker)
    try:
        paths = write_sbatch_scripts(load_recipe(_hostile_recipe(tmp_path, value)), _run_dir(tmp_path, value))
    except (RecipeError, ManifestError) as e:
        assert kind in REFUSED, f"{kind}: refused ({e})"
        assert "control characters" in str(e)
        assert not _run_dir(tmp_path, value).exists() and not marker.exists()
        return
    assert kind not in REFUSED, f"{kind} reached a script: {[p.name for p in paths]}"
    run_dir = _run_dir(tmp_path, value).resolve()
    scripts = {p.name: p for p in paths}
    assert sorted(scripts) == ["prepare-index.sbatch", "prepare.sbatch", "submit.sh", "unsupervised.sbatch"]
    for name, phase in (("unsupervised.sbatch", True), ("prepare.sbatch", False), ("prepare-index.sbatch", False)):
        got = _directives(scripts[name].read_text())
        for key, want in _expected_directives(value, phase).items():
            assert got.get(key) == want, (name, key, got.get(key))
    env = {**os.environ, **_recorders(tmp_path / "bin")}
    assert _run_scripts(paths, env, tmp_path) == 4
    assert not marker.exists(), "an injected command ran"
    calls = _calls(env)
    srun = next(c for c in calls if c[0] == "srun")
    assert srun[-4:] == ["train", str(run_dir), "--phase", "unsupervised"]  # the run dir, one argument
    after = next(c for c in calls if c[0] == "fake-python" and "after-phase" in c)
    assert after[after.index("after-phase") + 1] == str(run_dir)
    assert sum(c[0] == "sbatch" for c in calls) == 3  # submit.sh: prepare, prepare-index, the phase


@pytest.mark.parametrize("kind", sorted(set(PAYLOADS) - REFUSED))
def test_every_payload_through_submitit_and_its_submission_files(kind, tmp_path, shared_data, monkeypatch):
    """`launch --executor slurm` (submitit writes the files and calls sbatch); each submission file is then run."""
    marker = tmp_path / "INJECTED"
    value = PAYLOADS[kind].format(m=marker)
    env = _recorders(tmp_path / "bin")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    run_dir = _run_dir(tmp_path, value)
    run = launch(_hostile_recipe(tmp_path, value), run_dir, executor="slurm")
    assert set(run.jobs) == {"prepare", "prepare-index", "unsupervised"}
    files = sorted(run.run_dir.glob("slurm/*/*_submission.sh"))
    assert len(files) == 3, files  # the prepare array, its index job, the phase
    test_only = [c for c in _calls(env) if c[0] == "sbatch" and "--test-only" in c]
    for call in test_only:  # Slurm's preflight gets every value as one argument
        assert f"--account={value}" in call and f"--comment={value}" in call
    for f in files:
        got = _directives(f.read_text())
        phase = "unsupervised" in f.parent.name
        for key, want in _expected_directives(value, phase).items():
            assert got.get(key) == want, (f, key, got.get(key))
    assert _run_scripts(files, {**os.environ, **env}, tmp_path) == 3
    assert not marker.exists(), "an injected command ran"
    for f, call in zip(files, [c for c in _calls(env) if c[0] == "srun"]):
        assert call[-1] == str(f.parent), call  # submitit's folder (inside the hostile run dir), one argument


@pytest.mark.parametrize("kind", sorted(set(PAYLOADS) - REFUSED))
def test_every_payload_through_detach_and_sbatch_wrap(kind, tmp_path, monkeypatch):
    """An evaluation job's command line and options: sbatch gets each option as one argument and a --wrap that
    sh runs as exactly the command line given."""
    marker = tmp_path / "INJECTED"
    value = PAYLOADS[kind].format(m=marker)
    env = _recorders(tmp_path / "bin")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    argv = [env["COLBERTZERO_PYTHON"], "-m", "colbertzero", "eval-job", str(_run_dir(tmp_path, value)), "--phase",
            value, "--attempt", value]
    handle = runtime.detach(argv, tmp_path / "job.log", name="cz-eval-hostile",
                            sbatch={"partition": value, "time": "1:00:00"})
    assert handle == "job:4001"
    [sbatch] = _calls(env)
    assert f"--partition={value}" in sbatch
    wrap = sbatch[sbatch.index("--wrap") + 1]
    script = tmp_path / "wrapped.sh"
    script.write_text(f"#!/bin/sh\n{wrap}\n")  # what sbatch --wrap submits
    subprocess.run(["sh", str(script)], env={**os.environ, **env}, timeout=60, check=True)
    assert not marker.exists(), "an injected command ran"
    assert _calls(env)[-1] == ["fake-python", *argv[1:]]


def test_hostile_strings_property(tmp_path_factory):
    """Random strings of shell syntax (no control characters: refused above) in the same fields: every example is
    generated and run, and none injects."""
    ran = []

    @settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(parts=st.lists(st.sampled_from([p for k, p in PAYLOADS.items() if k not in REFUSED])
                          | st.text(alphabet=" $'\"`;|&\\()#*?~ab-=<>{}!", max_size=12), min_size=1, max_size=3))
    def check(parts):
        work = tmp_path_factory.mktemp("hostile")
        marker = work / "INJECTED"
        value = "".join(p.format(m=marker) if "{m}" in p else p for p in parts)
        paths = write_sbatch_scripts(load_recipe(_hostile_recipe(work, value)), _run_dir(work, value))
        got = _directives(next(p for p in paths if p.name == "unsupervised.sbatch").read_text())
        for key, want in _expected_directives(value, True).items():
            assert got.get(key) == (want or None if key != "comment" else want), key  # "" means "not set"
        env = {**os.environ, **_recorders(work / "bin")}
        _run_scripts(paths, env, work)
        assert not marker.exists(), "an injected command ran"
        ran.append(value)

    check()
    assert len(ran) == 30  # every example reached bash


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
