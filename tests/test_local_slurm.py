"""tools/local-slurm and colbertzero.runtime on a real two-node Slurm cluster (no mocks).

The session fixture `local_slurm` (conftest.py) starts the cluster, installing Slurm on a fresh machine as root.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import local_slurm as cluster  # tools/local_slurm.py (conftest puts tools/ on sys.path)
import pytest

from colbertzero import runtime as slurm_env
from colbertzero.recipe import parse_time_limit

TOOL = str(cluster.TOOL)
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
        "DEADLINE"}


def sacct(job_id: str, fields: str) -> dict[str, str]:
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", fields], capture_output=True, text=True,
                         check=True).stdout.strip()
    return dict(zip(fields.split(","), out.split("|"))) if out else {}


def run_batch(tmp_path: Path, script: str, *sbatch_args: str, timeout: float = 60) -> tuple[str, str]:
    """Submit `script`, wait until sacct shows it finished; returns (job id, its output)."""
    out = tmp_path / "job-%j.out"
    res = subprocess.run(["sbatch", "--parsable", "-o", str(out), *sbatch_args], input=script, capture_output=True,
                         text=True, check=True)
    job_id = res.stdout.strip().split(";")[0]
    deadline = time.monotonic() + timeout
    while (state := sacct(job_id, "State").get("State", "").split(" ")[0]) not in DONE:
        assert time.monotonic() < deadline, f"job {job_id} not finished after {timeout}s (state {state!r})"
        time.sleep(0.2)
    return job_id, Path(str(out).replace("%j", job_id)).read_text()


@pytest.fixture(scope="module")
def two_node_job(local_slurm, tmp_path_factory) -> tuple[str, str]:
    script = ("#!/bin/bash\n"
              "srun bash -c 'echo task=$SLURM_PROCID node=$SLURMD_NODENAME host=$(hostname) "
              "gpus=$SLURM_GPUS_ON_NODE cvd=$CUDA_VISIBLE_DEVICES'\n")
    return run_batch(tmp_path_factory.mktemp("two-node"), script, "-N2", "--ntasks-per-node=1", "--gpus-per-node=4")


def test_cluster_is_up(local_slurm):
    assert Path(local_slurm["SLURM_CONF"]).is_file()
    status = subprocess.run([TOOL, "status"], capture_output=True, text=True)
    assert status.returncode == 0, status.stdout + status.stderr
    assert "sacct: works" in status.stdout
    nodes = subprocess.run(["sinfo", "-h", "-N", "-p", "debug", "-o", "%N %T"], capture_output=True, text=True).stdout
    states = dict(line.split() for line in nodes.splitlines())
    assert set(states) == {"n1", "n2"} and set(states.values()) <= {"idle", "mixed", "allocated"}, nodes
    partitions = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True).stdout.split()
    assert partitions == ["debug*", "long", "urgent"]


def test_two_node_job_runs_on_both_nodes(two_node_job):
    _, out = two_node_job
    lines = sorted(line for line in out.splitlines() if line.startswith("task="))
    assert [line.split()[:3] for line in lines] == [["task=0", "node=n1", "host=n1"],
                                                  ["task=1", "node=n2", "host=n2"]], out


def test_gpus_per_node_sets_fake_gpus(two_node_job):
    _, out = two_node_job
    tasks = [line for line in out.splitlines() if line.startswith("task=")]
    assert len(tasks) == 2 and all("gpus=4 cvd=0,1,2,3" in line for line in tasks), out


def test_sacct_records_the_job(two_node_job):
    job_id, _ = two_node_job
    # (A job this short may reach slurmdbd's record before its start does: partition and start time come later.)
    rec = sacct(job_id, "State,NNodes,AllocTRES")
    assert (rec["State"], rec["NNodes"]) == ("COMPLETED", "2"), rec
    assert "gres/gpu=8" in rec["AllocTRES"], rec


def test_partition_choice(local_slurm, tmp_path):
    job_id, out = run_batch(tmp_path, "#!/bin/bash\necho partition=$SLURM_JOB_PARTITION\n", "-p", "long")
    assert out.strip() == "partition=long"
    assert sacct(job_id, "State") == {"State": "COMPLETED"}


def test_submitit_gloo_all_reduce_across_two_nodes(local_slurm, tmp_path):
    submitit = pytest.importorskip("submitit")

    # Defined here so cloudpickle ships it by value (this test module is not importable inside the job).
    def all_reduce_task() -> dict:
        import datetime
        import socket

        import torch
        import torch.distributed as dist

        from colbertzero import runtime as env_

        info = env_.set_torch_env()
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))  # env:// from set_torch_env
        value = torch.tensor([float(info.rank + 1)])
        dist.all_reduce(value)
        dist.destroy_process_group()
        return {"rank": info.rank, "world": info.world_size, "node": os.environ["SLURMD_NODENAME"],
                "host": socket.gethostname(), "sum": value.item(), "master": f"{info.master_addr}:{info.master_port}",
                "launcher": info.launcher, "elapsed": env_.job_elapsed_seconds()}

    executor = submitit.AutoExecutor(folder=tmp_path / "submitit")
    assert executor.cluster == "slurm"
    executor.update_parameters(slurm_partition="debug", nodes=2, tasks_per_node=1, cpus_per_task=1, timeout_min=5)
    job = executor.submit(all_reduce_task)
    deadline = time.monotonic() + 120
    while not job.done():
        if time.monotonic() > deadline:
            job.cancel()
            pytest.fail(f"submitit job {job.job_id} not done in 120 s; stderr:\n{job.stderr()}")
        time.sleep(0.5)
    results = sorted(job.results(), key=lambda r: r["rank"])
    port = slurm_env.master_port_for_job(job.job_id)
    assert [(r["rank"], r["node"], r["host"]) for r in results] == [(0, "n1", "n1"), (1, "n2", "n2")]
    assert all(r["world"] == 2 and r["sum"] == 3.0 and r["launcher"] == "slurm" for r in results), results
    assert {r["master"] for r in results} == {f"n1:{port}"}
    assert all(r["elapsed"] is not None and 0 <= r["elapsed"] < 120 for r in results), results
    # submitit reads job states from sacct (without accounting it would see UNKNOWN). slurmctld sends records to
    # slurmdbd asynchronously, so sacct can still say PENDING/RUNNING after the tasks returned: wait, but never
    # accept a terminal state other than COMPLETED.
    state_deadline = time.monotonic() + 60
    while (state := job.state) != "COMPLETED":
        assert state in ("PENDING", "RUNNING", "COMPLETING", "UNKNOWN"), state
        assert time.monotonic() < state_deadline, f"sacct still says {state} 60 s after the job returned"
        time.sleep(0.5)


# ------------------------------------------------------------------------------------- slurm_env without a job
HOSTLISTS = {
    "n1": ["n1"],
    "n[1-3,5],gpu-a[01-02]": ["n1", "n2", "n3", "n5", "gpu-a01", "gpu-a02"],
    "n[08-11]": ["n08", "n09", "n10", "n11"],
    "n[9-11]": ["n9", "n10", "n11"],
    "n[098-101]": ["n098", "n099", "n100", "n101"],
    "r[1-2]n[1-2]": ["r1n1", "r1n2", "r2n1", "r2n2"],
    "x-[1-2],x1,x1": ["x-1", "x-2", "x1", "x1"],
    "n[5]": ["n5"],
}


@pytest.mark.parametrize("expr", sorted(HOSTLISTS))
def test_expand_hostlist(expr):
    assert slurm_env.expand_hostlist(expr) == HOSTLISTS[expr]


@pytest.mark.parametrize("bad", ["n[1-2", "n1]", "n[3-1]", "n[]", "n[a-b]", "n[[1]]"])
def test_expand_hostlist_rejects_malformed(bad):
    with pytest.raises(ValueError):
        slurm_env.expand_hostlist(bad)


def test_expand_hostlist_matches_scontrol(local_slurm):
    for expr, hosts in HOSTLISTS.items():
        out = subprocess.run(["scontrol", "show", "hostnames", expr], capture_output=True, text=True).stdout.split()
        assert out == hosts, expr
        assert slurm_env.hostnames(expr) == hosts


def test_node_address_falls_back_to_node_addr(local_slurm):
    # n1 resolves only inside the node namespaces; out here the answer is the NodeAddr slurmctld knows.
    assert slurm_env.node_address("n1") == "127.0.0.1"
    assert slurm_env.node_address("localhost") == "localhost"


@pytest.mark.parametrize("text,seconds", [("0:05", 5), ("12:34", 754), ("1:02:03", 3723), ("00:00:05", 5),
                                          ("1-02:03:04", 93784), ("2-00", 172800), ("1-02:03", 93780), ("90", 5400),
                                          ("00:01:02.345", 62)])
def test_parse_slurm_time(text, seconds):
    assert parse_time_limit(text) == seconds


def test_parse_slurm_time_rejects_non_durations():
    for text in ("INVALID", "UNLIMITED", "", "1:2:3:4"):
        with pytest.raises(ValueError):
            parse_time_limit(text)


def test_master_port_is_deterministic_and_in_range():
    ports = {slurm_env.master_port_for_job(j) for j in ("1", "39999", "40000", "123456789")}
    assert all(20000 <= p < 60000 for p in ports)
    assert slurm_env.master_port_for_job("77") == slurm_env.master_port_for_job(77) == 20077


def test_detect_slurm_task_environment():
    # What srun gives task 3 of `srun -N2 --ntasks-per-node=2` (unrelated torch variables absent).
    env = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
           "SLURM_NODEID": "1", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_NUM_NODES": "2",
           "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_STEP_NODELIST": "localhost,n9", "SLURM_GPUS_ON_NODE": "4"}
    info = slurm_env.set_torch_env(env)
    assert (info.launcher, info.rank, info.local_rank, info.world_size, info.local_world_size) == ("slurm", 3, 1, 4, 2)
    assert (info.node_rank, info.num_nodes, info.gpus_on_node, info.job_id) == (1, 2, 4, "4242")
    assert (info.master_addr, info.master_port) == ("localhost", slurm_env.master_port_for_job("4242"))
    assert {k: env[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")} == {
        "RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "localhost", "MASTER_PORT": "24242"}


def test_detect_keeps_torchrun_and_user_settings():
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1",
           "MASTER_ADDR": "head", "MASTER_PORT": "29400", "SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0",
           "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_STEP_NODELIST": "n[1-2]"}
    before = dict(env)
    info = slurm_env.set_torch_env(env)
    assert env == before  # nothing overwritten
    assert (info.launcher, info.rank, info.world_size, info.node_rank, info.num_nodes) == ("torchrun", 5, 8, 1, 2)
    assert (info.master_addr, info.master_port) == ("head", 29400)


def test_batch_script_and_plain_process_are_one_process():
    # The batch script of a 2-task job: SLURM_PROCID=0 and SLURM_NTASKS=2, but no step: it is a single process.
    batch = {"SLURM_JOB_ID": "99", "SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n[1-2]"}
    info = slurm_env.set_torch_env(batch)
    assert (info.launcher, info.rank, info.world_size, info.master_port) == ("single", 0, 1, 20099)
    assert batch["WORLD_SIZE"] == "1" and batch["MASTER_ADDR"] == "127.0.0.1"
    plain = slurm_env.detect({"CUDA_VISIBLE_DEVICES": "0,1"})
    assert (plain.launcher, plain.world_size, plain.gpus_on_node, plain.job_id) == ("single", 1, 2, None)
    assert 0 < plain.master_port < 65536
    if "SLURM_JOB_ID" not in os.environ:
        assert slurm_env.job_elapsed_seconds() is None


# --------------------------------------------------------------------------------------------- the tool itself
def test_stop_then_status_fails(local_slurm):
    """A second, private cluster (own directory and ports) so the session's cluster is never pulled away."""
    state = Path(tempfile.mkdtemp(prefix="colbertzero-local-slurm-test-", dir="/tmp"))
    state.chmod(0o755)  # munge wants every directory above its socket searchable
    env = dict(os.environ, LOCAL_SLURM_DIR=str(state), LOCAL_SLURM_PORT_BASE="17100")
    try:
        conf = cluster.start(state, port_base=17100)["SLURM_CONF"]
        assert conf == str(state / "etc" / "slurm.conf")
        assert cluster.is_running(state)
        again = subprocess.run([TOOL, "start"], env=env, capture_output=True, text=True)
        assert again.returncode == 0 and "already running" in again.stdout
        pids = [int(p.read_text()) for p in state.glob("*/*.pid")]
        assert len(pids) == 6  # munged, mariadbd, slurmdbd, slurmctld, slurmd n1, slurmd n2
        cluster.stop(state)
        status = subprocess.run([TOOL, "status"], env=env, capture_output=True, text=True)
        assert status.returncode != 0 and "cluster is down" in status.stdout, status.stdout
        assert not any(Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]
                       for pid in pids)
        assert not cluster.is_running(state)
        assert cluster.is_running()  # the session's cluster is untouched
    finally:
        cluster.stop(state)
        shutil.rmtree(state, ignore_errors=True)
