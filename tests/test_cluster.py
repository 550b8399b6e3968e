"""Cluster profiles (`cluster:`, clusters/*.yaml): they resolve, validate and say where each setting came from; the
container reaches the task's srun in the sites' documented forms and never the batch script; the fabric a profile
requires is checked; a rank's threads follow its cores. The real jobs in a container without Slurm's commands run in
tests/test_launch.py (time limit, preemption, a hang, the plain scripts)."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_accelerator import GH200, NCCL_LOG_OFI, NCCL_LOG_SOCKET

from colbertzero import cluster
from colbertzero.launcher.sbatch import write_sbatch_scripts
from colbertzero.plan import cluster_settings
from colbertzero.recipe import RecipeError, load_recipe, recipe_from_dict
from colbertzero.runtime import detach
from colbertzero.train import accelerator

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny-cpu-slurm.yaml"
PAPER = ROOT / "recipes" / "colbert-zero.yaml"
SHIPPED = sorted(p.stem for p in (ROOT / "clusters").glob("*.yaml"))


def cz(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "colbertzero", *map(str, args)], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env={**os.environ, **(env or {})})


def recipe_file(tmp_path: Path, **top) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"extends": str(TINY), "name": "prof", **top}))
    return path


def profile_file(tmp_path: Path, doc: dict, name: str = "site") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture
def scratch(monkeypatch):
    monkeypatch.setenv("SCRATCH", "/capstor/scratch/cscs/u1")


# ------------------------------------------------------------------------------------------- profiles resolve
@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_profile_resolves_on_the_paper_recipe_with_its_sources(name, scratch):
    r = load_recipe(PAPER, cluster=name)
    c = r.cluster
    assert c.name == name and Path(c.file) == ROOT / "clusters" / f"{name}.yaml"
    assert c.sources and all(v.startswith("https://") for v in c.sources.values()), c.sources
    for ph in r.phases.values():  # a GH200 node: 4 GPUs, a Grace CPU of 72 cores each
        assert (ph.resources.gpus_per_node, ph.resources.cpus_per_task) == (4, 72)
    # the run dir keeps the resolved recipe; reading it back gives the same recipe, not the profile applied twice
    again = recipe_from_dict(json.loads(json.dumps(r.resolved())))
    assert again.hash() == r.hash() and again.cluster == c


def test_shipped_profiles_are_the_ones_the_docs_show():
    assert SHIPPED == ["cscs-alps", "generic-gh200", "isambard-ai"]
    doc = (ROOT / "docs" / "cluster.md").read_text()
    for name in SHIPPED:
        assert f"--cluster {name}" in doc, name


def test_profile_values_are_defaults_the_recipe_wins_and_plan_says_where_each_came_from(tmp_path):
    prof = profile_file(tmp_path, {"resources": {"partition": "gpu", "qos": "normal", "account": "p1"},
                                   "environment": {"NCCL_CROSS_NIC": 1}, "setup": ["module load cuda"]})
    path = recipe_file(tmp_path, cluster=str(prof), phases={"supervised": {"resources": {"partition": "short"}}})
    r = load_recipe(path, ["cluster.resources.account=p2"])
    res = {n: (ph.resources.partition, ph.resources.qos, ph.resources.account) for n, ph in r.phases.items()}
    assert res == {"unsupervised": ("gpu", "normal", "p2"), "supervised": ("short", "normal", "p2"),
                   "distillation": ("gpu", "normal", "p2")}
    assert r.cluster.environment == {"NCCL_CROSS_NIC": "1"}  # YAML's number, exported as written
    where = {s["field"]: s["from"] for s in cluster_settings(r)["settings"]}
    profile = f"cluster site ({prof})"
    assert where["phases.unsupervised.resources.partition"] == profile
    assert where["phases.supervised.resources.partition"] == "recipe"
    assert where["phases.distillation.resources.account"] == "recipe's cluster.resources"
    assert where["cluster.environment"] == where["cluster.setup"] == profile
    out = cz("plan", path, "cluster.resources.account=p2")
    assert out.returncode == 0, out.stderr
    assert f"phases.unsupervised.resources.partition = gpu  [{profile}]" in out.stdout
    assert "phases.supervised.resources.partition = short  [recipe]" in out.stdout


def test_the_command_line_cluster_replaces_the_recipes_profile(tmp_path, scratch):
    prof = profile_file(tmp_path, {"resources": {"partition": "a100"}})
    path = recipe_file(tmp_path, cluster="generic-gh200")
    assert load_recipe(path).cluster.name == "generic-gh200"
    r = load_recipe(path, cluster=str(prof))
    assert r.cluster.name == "site" and r.phases["unsupervised"].resources.partition == "a100"
    assert load_recipe(TINY, cluster="isambard-ai").cluster.setup == ["module load brics/nccl"]


def test_a_bad_profile_is_refused_in_one_message_naming_its_file_and_fields(tmp_path):
    prof = profile_file(tmp_path, {"resources": {"nodes": 2, "cpus_per_task": 0}, "bogus": 1,
                                   "container": {"runtime": "cscs-edf", "image": "pt", "mounts": ["/a:/a"]}})
    res = cz("plan", TINY, "--cluster", prof)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert f"{prof} (cluster profile '{prof}'): invalid cluster profile" in res.stderr
    assert "cluster.bogus: unknown field (check its spelling in docs/cluster.md)" in res.stderr
    assert "cluster.resources: nodes: not set by a cluster profile" in res.stderr
    assert "with cscs-edf the mounts and the workdir are written in the EDF" in res.stderr
    res = cz("plan", TINY, "--cluster", "nowhere")
    assert res.returncode == 2 and "cluster profile 'nowhere': no " in res.stderr
    assert "shipped profiles: cscs-alps, generic-gh200, isambard-ai" in res.stderr
    env = {k: v for k, v in os.environ.items() if k != "SCRATCH"}
    res = subprocess.run([sys.executable, "-m", "colbertzero", "plan", str(TINY), "--cluster", "cscs-alps"],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert res.returncode == 2 and "cscs-alps.yaml: cluster.container.python: environment variable ${SCRATCH} is " \
                                   "not set" in res.stderr


@pytest.mark.parametrize("container, words", [
    ({"runtime": "pyxis"}, "needs `image`"),
    ({"runtime": "command"}, "needs `command`"),
    ({"runtime": "command", "command": ["w"], "image": "x"}, "takes the whole prefix in `command`"),
    ({"runtime": "slurm-oci", "image": "/b", "workdir": "/w"}, "the OCI bundle's"),
    ({"runtime": "pyxis", "image": "x", "command": ["w"]}, "`command` is for runtime 'command'"),
    ({"runtime": "docker", "image": "x"}, "runtime"),
])
def test_an_incomplete_container_is_refused(tmp_path, container, words):
    path = recipe_file(tmp_path, cluster={"name": "x", "container": container})
    with pytest.raises(RecipeError, match="cluster.container") as e:
        load_recipe(path)
    assert words in str(e.value)


# ------------------------------------------------------------------------------------ containers on the srun
# Each runtime's task line as the sites' documentation writes it (pyxis README, CSCS "Using container engine",
# Apptainer's `exec --nv`, Slurm's containers guide), after colbertzero's own srun arguments.
RUNTIMES = [
    ({"runtime": "pyxis", "image": "nvcr.io#nvidia/pytorch:25.12-py3",
      "mounts": ["/scratch:/scratch", "/data:/data:ro"], "workdir": "/scratch/w"},
     "srun --kill-on-bad-exit=1 --cpu-bind=cores --container-image=nvcr.io#nvidia/pytorch:25.12-py3 "
     "--container-mounts=/scratch:/scratch,/data:/data:ro --container-workdir=/scratch/w PY"),
    ({"runtime": "cscs-edf", "image": "colbertzero"},
     "srun --kill-on-bad-exit=1 --cpu-bind=cores --environment=colbertzero PY"),
    ({"runtime": "apptainer", "image": "/images/pytorch.sif", "mounts": ["/scratch:/scratch"], "workdir": "/scratch"},
     "srun --kill-on-bad-exit=1 --cpu-bind=cores apptainer exec --nv --bind /scratch:/scratch --pwd /scratch "
     "/images/pytorch.sif PY"),
    ({"runtime": "slurm-oci", "image": "/bundles/pytorch"},
     "srun --kill-on-bad-exit=1 --cpu-bind=cores --container=/bundles/pytorch PY"),
    ({"runtime": "command", "command": ["podman-hpc", "run", "--gpu", "pt:1"]},
     "srun --kill-on-bad-exit=1 --cpu-bind=cores podman-hpc run --gpu pt:1 PY"),
]


@pytest.mark.parametrize("container, line", RUNTIMES, ids=[c["runtime"] for c, _ in RUNTIMES])
def test_the_container_wraps_the_task_in_the_sites_form_and_slurm_stays_on_the_host(tmp_path, container, line):
    py = "/scratch/venv/bin/python"
    path = recipe_file(tmp_path, cluster={"name": "site", "container": {**container, "python": py},
                                          "environment": {"NCCL_NET": "AWS Libfabric"}, "srun_args": ["--mpi=pmi2"]})
    r = load_recipe(path)
    write_sbatch_scripts(r, tmp_path / "run")
    script = (tmp_path / "run" / "sbatch" / "unsupervised.sbatch").read_text()
    want = line.replace("--cpu-bind=cores", "--cpu-bind=cores --mpi=pmi2").replace(
        "PY", f"{py} -m colbertzero train {tmp_path / 'run'} --phase unsupervised")
    srun = [s for s in script.splitlines() if s.startswith("srun ")]
    assert [shlex.split(s) for s in srun] == [shlex.split(want)]  # the words the shell hands srun
    # no container option reaches #SBATCH (it would put the batch script, and Slurm's commands, in the container)
    assert not any(s.startswith(("#SBATCH --container", "#SBATCH --environment")) for s in script.splitlines())
    lines = script.splitlines()
    after = lines[lines.index(srun[0]) + 1:]
    assert after[0] == "rc=$?" and after[-1].startswith('exec "${COLBERTZERO_PYTHON:-') and \
        f"-m colbertzero after-phase {tmp_path / 'run'} --phase unsupervised --exit-code \"$rc\"" in after[-1]
    assert "export NCCL_NET='AWS Libfabric'" in lines[:lines.index(srun[0])]
    # the prepare array runs inside the container too: one srun task, the same container arguments
    prep = (tmp_path / "run" / "sbatch" / "prepare.sbatch").read_text().splitlines()[-1]
    assert prep.startswith("exec srun --ntasks=1 --mpi=pmi2 ") and f"{py} -m colbertzero prepare " in prep
    # an evaluation job a phase submits starts outside the container too: srun with the same arguments
    job = ["srun", *cluster.srun_args(r.cluster), *cluster.task_argv(r.cluster, ["-m", "colbertzero", "eval-job"])]
    task = want.split(" -m colbertzero train ")[0].replace("--kill-on-bad-exit=1 --cpu-bind=cores ", "")
    assert job == shlex.split(f"{task} -m colbertzero eval-job")


def test_without_a_profile_the_scripts_are_as_before(tmp_path):
    write_sbatch_scripts(load_recipe(TINY), tmp_path / "run")
    script = (tmp_path / "run" / "sbatch" / "unsupervised.sbatch").read_text()
    [srun] = [s for s in script.splitlines() if s.startswith("srun ")]
    assert srun.startswith('srun --kill-on-bad-exit=1 --cpu-bind=cores "${COLBERTZERO_PYTHON:-')
    prep = (tmp_path / "run" / "sbatch" / "prepare.sbatch").read_text().splitlines()[-1]
    assert prep.startswith('exec "${COLBERTZERO_PYTHON:-') and '--array-task "$SLURM_ARRAY_TASK_ID"' in prep


def test_an_evaluation_without_sbatch_in_the_task_runs_beside_it_and_says_so(tmp_path, monkeypatch, capsys):
    """A task in a container without Slurm's commands cannot submit its evaluation job: it runs the command as a
    background process on its node and says so (the job's srun line is never run there)."""
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    out = tmp_path / "ran"
    handle = detach([sys.executable, "-c", f"open({str(out)!r}, 'w').write('here')"], tmp_path / "log", name="cz-eval",
                    sbatch={"time": "10"}, job_argv=["srun", "--environment=x", "python"])
    assert handle.startswith("pid:")
    os.waitpid(int(handle[4:]), 0)
    assert out.read_text() == "here"
    assert "cz-eval: no sbatch inside this task" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- fabric and threads
def test_a_profile_that_requires_the_fabric_refuses_a_socket_fallback_with_its_settings(tmp_path, capsys, scratch):
    c = load_recipe(TINY, cluster="cscs-alps").cluster
    args = dict(profile=c)
    accelerator.nccl_log_of_this_process(tmp_path).write_text(NCCL_LOG_SOCKET)
    with pytest.raises(accelerator.AcceleratorError) as e:
        accelerator.record_network(GH200, tmp_path, nodes=4, **args)
    msg = str(e.value)
    assert "NCCL between the 4 nodes uses 'Socket'" in msg and "cluster 'cscs-alps' requires 'AWS Libfabric'" in msg
    assert "NCCL_NET='AWS Libfabric'" in msg and "FI_CXI_DISABLE_HOST_REGISTER='1'" in msg
    # one node needs no fabric; the fabric itself passes
    assert accelerator.record_network(GH200, tmp_path, nodes=1, **args)["nccl_network"] == "Socket"
    accelerator.nccl_log_of_this_process(tmp_path).write_text(NCCL_LOG_OFI)
    assert accelerator.record_network(GH200, tmp_path, nodes=4, **args)["nccl_network"] == "AWS Libfabric"
    capsys.readouterr()
    # a log without NCCL's network line (its logging set elsewhere) is not a refusal, but it is said
    rec = accelerator.record_network(GH200, tmp_path / "elsewhere", nodes=4, **args)
    assert rec["nccl_network"] is None and "requires AWS Libfabric, unchecked" in capsys.readouterr().err


def test_a_ranks_threads_follow_its_cores():
    import torch

    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0))
    try:
        assert accelerator.fit_threads({}) == cores == torch.get_num_threads()
        assert accelerator.fit_threads({"OMP_NUM_THREADS": "1"}) == 1 == torch.get_num_threads()
        assert accelerator.fit_threads({"OMP_NUM_THREADS": str(cores * 4)}) == cores  # never more than its cores
        assert accelerator.placement(0)["threads"] == cores
    finally:
        torch.set_num_threads(before)
