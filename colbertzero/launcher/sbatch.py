"""A recipe's resources as sbatch options, and plain sbatch scripts for users who submit by hand.

`phase_options` / `prepare_options` are the one translation of `resources` / `prepare` into sbatch's long options:
the submitit jobs of `colbertzero launch`, its `sbatch --test-only` preflight and the scripts written here all use
them, so the three never disagree.

`write_sbatch_scripts(recipe, run_dir)` (`colbertzero sbatch RECIPE --run-dir DIR`) creates the run dir (manifest +
resolved `recipe.yaml`, what every job reads) and writes into `RUN_DIR/sbatch/`:

    prepare.sbatch        array job: each task tokenizes its share of the shards (`colbertzero prepare --array-task`)
    prepare-index.sbatch  after the array: checks every shard and writes the indexes
    <phase>.sbatch        one per phase: `srun` one `colbertzero train RUN_DIR --phase P` per GPU, then
                          `colbertzero after-phase` applies the requeue policy (launcher/requeue.py)
    submit.sh             submits all of them chained with `--dependency=afterok:` (what slurm/README.md shows)
"""

from __future__ import annotations

import hashlib
import math
import os
import shlex
import sys
from pathlib import Path

from .. import cluster
from ..files import atomic_write_bytes
from ..layout import RunLayout
from ..manifest import Manifest
from ..preflight import refuse_invalid
from ..recipe import PrepareResources, Recipe, RecipeError, Resources, parse_time_limit

# Options colbertzero sets itself, with the recipe field that says them; `extra_sbatch` may not repeat them (one of
# the two would silently lose).
_OWNED = {
    "nodes": "nodes", "ntasks-per-node": "gpus_per_node", "ntasks": "gpus_per_node", "gpus-per-node": "gpus_per_node",
    "cpus-per-task": "cpus_per_task", "mem": "mem", "partition": "partition", "account": "account", "qos": "qos",
    "constraint": "constraint", "time": "time_limit", "signal": "signal_seconds", "requeue": None,
    "no-requeue": None, "array": "array_tasks", "dependency": None, "job-name": None, "output": None, "error": None,
    "open-mode": None, "kill-on-invalid-dep": None, "wrap": None,
}


# Container options at sbatch level put the batch script itself in the container, where Slurm's commands are usually
# missing (the requeue decision after srun would then fail): they belong to the task's srun, `cluster.container`.
_CONTAINER = {"container-image", "container-mounts", "container-workdir", "container-name", "container",
              "environment"}


def parse_extra(extra: list[str], where: str, fields: set[str] = frozenset()) -> dict[str, str | bool]:
    """`["--container-image=x", "--exclusive"]` -> {"container-image": "x", "exclusive": True}. `where` names the
    list in the recipe (`phases.P.resources.extra_sbatch`), `fields` the recipe fields beside it."""
    prefix = where.rsplit(".", 1)[0]
    out: dict[str, str | bool] = {}
    for i, item in enumerate(extra):
        here = f"{where}[{i}]"
        if not item.startswith("--") or len(item) < 3 or " " in item.split("=", 1)[0]:
            raise RecipeError(f"{here}: {item!r}: write sbatch's long form, --option=value or --flag "
                              f"(e.g. --constraint=gpu, --exclusive)")
        key, eq, value = item[2:].partition("=")
        if key in _CONTAINER:
            raise RecipeError(f"{here}: {item!r}: a container on the batch job runs the batch script in it, where "
                              "Slurm's commands are missing; set cluster.container instead (docs/cluster.md, "
                              "'Cluster profiles and containers'): it wraps each task's srun")
        if key in _OWNED:
            field = _OWNED[key]
            how = f"use the recipe field {prefix}.{field} instead" if field in fields else "remove it"
            raise RecipeError(f"{here}: {item!r}: --{key} is set by colbertzero; {how}")
        out[key] = value if eq else True
    return out


def phase_options(r: Resources, where: str = "resources") -> dict[str, str | bool]:
    """sbatch long options (without dashes) for one phase: one task per GPU (or per CPU task when gpus_per_node=0)."""
    opts: dict[str, str | bool] = {"nodes": str(r.nodes), "ntasks-per-node": str(r.tasks_per_node),
                                   "cpus-per-task": str(r.cpus_per_task), "time": r.time_limit}
    if r.gpus_per_node:
        opts["gpus-per-node"] = str(r.gpus_per_node)
    for key in ("partition", "account", "qos", "constraint", "mem"):
        if getattr(r, key):
            opts[key] = getattr(r, key)
    opts.update(parse_extra(r.extra_sbatch, f"{where}.extra_sbatch", set(Resources.model_fields)))
    return opts


def prepare_options(recipe: Recipe) -> dict[str, str | bool]:
    """The prepare job: one CPU task per array task; partition/account/QoS default to the first phase's."""
    pr: PrepareResources = recipe.prepare
    req = recipe.prepare_request()  # partition, CPUs, time, memory: the one rule validate checks too
    first = next(iter(recipe.phases.values())).resources
    opts: dict[str, str | bool] = {"nodes": "1", "ntasks-per-node": "1", "cpus-per-task": str(req.cpus_per_task),
                                   "time": req.time_limit}
    if req.partition:
        opts["partition"] = req.partition
    for key in ("account", "qos"):
        value = getattr(pr, key) or getattr(first, key)
        if value:
            opts[key] = value
    if req.mem:
        opts["mem"] = req.mem
    opts.update(parse_extra(pr.extra_sbatch, "prepare.extra_sbatch", set(PrepareResources.model_fields)))
    return opts


def directives(opts: dict[str, str | bool]) -> list[str]:
    """`#SBATCH` lines, every value shell-quoted (sbatch reads these lines with shell quoting rules)."""
    return [f"#SBATCH --{k}" if v is True else f"#SBATCH --{k}={shlex.quote(str(v))}" for k, v in opts.items()]


def time_minutes(time_limit: str) -> int:
    """Slurm counts time limits in whole minutes: round up."""
    return max(1, math.ceil(parse_time_limit(time_limit) / 60))


def run_tag(run_dir: str | os.PathLike) -> str:
    return hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:6]


def job_name(recipe: Recipe, step: str, run_dir: str | os.PathLike) -> str:
    """`cz-<recipe>-<step>-<run tag>`: the tag (from the run dir's path) lets `resume` find the run's jobs in the
    queue however they were submitted (launch, these scripts, by hand)."""
    return f"cz-{recipe.name}-{step}-{run_tag(run_dir)}"


# ---------------------------------------------------------------------------------------------- plain scripts
_HEADER = """\
#!/bin/bash
# {what}
# Written by `colbertzero sbatch` for recipe {recipe!r}, run dir {run_dir}.
# {how}
"""


def _python() -> str:
    return f"${{COLBERTZERO_PYTHON:-{shlex.quote(sys.executable)}}}"


def _setup(lines: list[str]) -> str:
    return ("# setup (cluster profile, recipe)\n" + "\n".join(lines) + "\n") if lines else ""


def task_words(recipe: Recipe, args: list[str]) -> str:
    """A task's command in shell words: the container's prefix, its interpreter (the profile's, or
    $COLBERTZERO_PYTHON / this one), then ``args``."""
    py = cluster.task_python(recipe.cluster)
    return " ".join([*map(shlex.quote, cluster.command_prefix(recipe.cluster)),
                     shlex.quote(py) if py else f'"{_python()}"', *map(shlex.quote, args)])


def submitit_python(recipe: Recipe) -> str:
    """submitit's `python` (written into its script as it is): the container's prefix and interpreter."""
    return shlex.join(cluster.task_argv(recipe.cluster, []))


def srun_args(recipe: Recipe) -> list[str]:
    """Every phase task's srun arguments: colbertzero's, the cluster profile's, the container's."""
    return cluster.phase_srun_args(recipe.cluster)


def task_setup(recipe: Recipe, own: list[str]) -> list[str]:
    """A phase job's setup: the profile's lines and environment, the recipe's own, then the per-task settings."""
    return [*cluster.setup_lines(recipe.cluster, own), *cluster.TASK_ENV]


def after_phase_lines(run_dir: str | os.PathLike, phase: str) -> list[str]:
    """Right after the phase's `srun`, in the batch script on the host (outside any container): the requeue policy
    on srun's exit code — the plain scripts' last lines and the submitit jobs' teardown."""
    return ["rc=$?",
            "# Done, requeue (time-limit warning, preemption), stop or fail: the requeue policy decides here, on the "
            "host, where Slurm's commands are.",
            f'exec "{_python()}" -m colbertzero after-phase {shlex.quote(str(run_dir))} --phase {shlex.quote(phase)} '
            '--exit-code "$rc"']


def _prepare_scripts(recipe: Recipe, run_dir: Path, logs: Path) -> dict[str, str]:
    pr = recipe.prepare
    recipe_file = shlex.quote(str(RunLayout.of(run_dir).recipe_file))
    opts = prepare_options(recipe)
    n = pr.array_tasks
    array = "\n".join(directives({"job-name": job_name(recipe, "prepare", run_dir), **opts, "array": f"0-{n - 1}",
                                  "output": str(logs / "%x-%A_%a.out"), "open-mode": "append"}))
    index = "\n".join(directives({"job-name": job_name(recipe, "prepare-index", run_dir), **opts,
                                  "output": str(logs / "%x-%j.out"), "open-mode": "append"}))
    head = dict(recipe=recipe.name, run_dir=run_dir)
    setup = _setup(task_setup(recipe, pr.setup) if cluster.in_container(recipe.cluster)
                   else cluster.setup_lines(recipe.cluster, pr.setup))
    return {
        "prepare.sbatch": _HEADER.format(
            what=f"Tokenize every phase's sources into Arrow shards: {n} array tasks, each a share of the shards.",
            how="Submit first: sbatch --parsable prepare.sbatch", **head)
        + f"{array}\n\nset -euo pipefail\n{setup}"
        + _host_or_container(recipe, ["prepare", recipe_file, "--array-task", '"$SLURM_ARRAY_TASK_ID"',
                                      "--array-tasks", str(n), "--workers", str(pr.workers)]),
        "prepare-index.sbatch": _HEADER.format(
            what="Check that every shard is finished and write each source's index (after the whole array).",
            how="Submit after the array: sbatch --parsable --dependency=afterok:$PREPARE prepare-index.sbatch", **head)
        + f"{index}\n\nset -euo pipefail\n{setup}"
        + _host_or_container(recipe, ["prepare", recipe_file, "--index-only"]),
    }


def _host_or_container(recipe: Recipe, args: list[str]) -> str:
    """A prepare script's command: in the batch shell, or (with a container) as one srun task inside it. ``args``
    are shell words already (the array task's id is expanded by the shell)."""
    if not cluster.in_container(recipe.cluster):
        return f'exec "{_python()}" -m colbertzero {" ".join(args)}\n'
    task = task_words(recipe, ["-m", "colbertzero"])
    return f'exec srun --ntasks=1 {" ".join(map(shlex.quote, cluster.srun_args(recipe.cluster)))} {task} ' \
           f'{" ".join(args)}\n'


def _phase_script(recipe: Recipe, name: str, run_dir: Path, logs: Path) -> str:
    r = recipe.phase(name).resources
    opts = {"job-name": job_name(recipe, name, run_dir), **phase_options(r, f"phases.{name}.resources"),
            # USR2 reaches every task (not the batch shell): the runner checkpoints at the same step on all ranks.
            "signal": f"USR2@{r.signal_seconds}", "requeue": True, "kill-on-invalid-dep": "yes",
            "output": str(logs / "%x-%j.out"), "open-mode": "append"}
    head = _HEADER.format(
        what=f"Phase {name!r} ({recipe.phase(name).kind}): {r.nodes} node(s) x {r.tasks_per_node} task(s), one per "
             f"{'GPU' if r.gpus_per_node else 'CPU task'}.",
        how="Submit after the previous step: sbatch --parsable --dependency=afterok:$PREVIOUS " + f"{name}.sbatch",
        recipe=recipe.name, run_dir=run_dir)
    train = task_words(recipe, ["-m", "colbertzero", "train", str(run_dir), "--phase", name])
    after = "\n".join(after_phase_lines(run_dir, name))
    return head + "\n".join(directives(opts)) + f"""

set -uo pipefail
{_setup(task_setup(recipe, r.setup))}
# One task per GPU, each on its own block of cpus-per-task cores (GH200: the Grace CPU next to its GPU); a container
# (cluster profile) wraps the task only.
srun {" ".join(map(shlex.quote, srun_args(recipe)))} {train}
{after}
"""


def _submit_script(recipe: Recipe, names: list[str]) -> str:
    lines = ["#!/bin/bash",
             f"# Submit the whole chain of recipe {recipe.name!r}; each step starts only after the previous one "
             "succeeded.",
             "# Skip the two prepare lines when the shards exist already (and drop the first --dependency).",
             "set -euo pipefail", 'cd "$(dirname "$0")"',
             "prev=$(sbatch --parsable prepare.sbatch)", 'echo "prepare: $prev"',
             'prev=$(sbatch --parsable --dependency=afterok:"$prev" prepare-index.sbatch)',
             'echo "prepare-index: $prev"']
    for n in names:
        lines += [f'prev=$(sbatch --parsable --dependency=afterok:"$prev" {shlex.quote(n + ".sbatch")})',
                  f'echo {shlex.quote(n + ": ")}"$prev"']
    return "\n".join(lines) + "\n"


def write_sbatch_scripts(recipe: Recipe, run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None
                         ) -> list[Path]:
    """Validate the recipe, create the run dir, write the scripts; returns their paths (submit.sh last).

    A recipe that fails validation (or whose extra_sbatch is malformed) raises before anything is written.
    """
    refuse_invalid(recipe, "nothing was written")
    for n in recipe.phases:
        phase_options(recipe.phase(n).resources, f"phases.{n}.resources")
    prepare_options(recipe)
    m = Manifest.create(run_dir, recipe)
    out = Path(out_dir).resolve() if out_dir else m.layout.sbatch
    logs = m.layout.slurm_logs
    out.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    scripts = _prepare_scripts(recipe, m.run_dir, logs)
    for n in recipe.phases:
        scripts[f"{n}.sbatch"] = _phase_script(recipe, n, m.run_dir, logs)
    scripts["submit.sh"] = _submit_script(recipe, list(recipe.phases))
    with m.update() as d:  # `resume` then knows that Slurm may hold jobs of this run
        d["sbatch_scripts"] = str(out)
    paths = []
    for name, text in scripts.items():
        path = out / name
        atomic_write_bytes(path, text.encode())
        path.chmod(0o755)
        paths.append(path)
    return paths
