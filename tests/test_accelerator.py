"""A GPU phase is refused, with one message, by a process that cannot run it on GPUs; the facts are recorded."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from colbertzero.manifest import Manifest
from colbertzero.recipe import load_recipe
from colbertzero.report.status import describe_accelerator
from colbertzero.train import accelerator

ROOT = Path(__file__).resolve().parents[1]

# What a GH200 node's torch reports (NGC PyTorch container): the shape `facts()` returns on such a node.
GH200 = {"host": "nid001234", "torch": "2.8.0a0+5228986c39.nv25.05", "cuda": "12.9", "gpus": 4,
         "gpu_names": ["NVIDIA GH200 120GB"], "bf16": True, "nccl": "2.26.5", "cuda_visible_devices": None}


def test_this_machine_is_described_as_it_is():
    f = accelerator.facts()
    assert f["torch"] == torch.__version__ and f["cuda"] == torch.version.cuda
    assert f["gpus"] == torch.cuda.device_count()
    if not torch.cuda.is_available():
        assert describe_accelerator(f) == f"CPU (torch {torch.__version__})"
        assert f["nccl"] is None and f["bf16"] is False
    accelerator.check(f, phase="unsupervised", gpus_per_node=0, bf16=True)  # a CPU phase runs anywhere


def test_a_gpu_node_passes_and_is_described_in_one_line():
    accelerator.check(GH200, phase="supervised", gpus_per_node=4, bf16=True)
    assert describe_accelerator(GH200) == "4× NVIDIA GH200 120GB, CUDA 12.9, NCCL 2.26.5, bf16"


@pytest.mark.parametrize("change, gpus_per_node, bf16, words", [
    ({"cuda": None, "gpus": 0, "gpu_names": [], "bf16": False, "nccl": None}, 4, True,
     ["gpus_per_node=4", "on nid001234", "is a CPU-only build", "gpus_per_node=0"]),
    ({"gpus": 1, "cuda_visible_devices": "2"}, 4, True,
     ["sees 1 GPU(s)", "CUDA_VISIBLE_DEVICES=2", "--gpus-per-node"]),
    ({"bf16": False, "gpu_names": ["Tesla V100-SXM2-32GB"]}, 4, True,
     ["Tesla V100-SXM2-32GB has no bfloat16 support", "phases.distillation.bf16=false"]),
])
def test_what_a_gpu_phase_cannot_run_on_is_refused_with_the_fix(change, gpus_per_node, bf16, words):
    with pytest.raises(accelerator.AcceleratorError) as e:
        accelerator.check({**GH200, **change}, phase="distillation", gpus_per_node=gpus_per_node, bf16=bf16)
    for w in words:
        assert w in str(e.value), str(e.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch that sees no GPU (this machine's CPU wheel)")
def test_train_refuses_a_gpu_phase_on_a_cpu_only_torch(tmp_path, shared_data):
    """The real `colbertzero train` on this machine's CPU-only torch: exit 2, one line, the phase marked failed
    with the reason, nothing trained; before the fix it started gloo on CPU in silence."""
    run = tmp_path / "run"
    Manifest.create(run, load_recipe(ROOT / "recipes" / "tiny-cpu.yaml",
                                     ["phases.unsupervised.resources.gpus_per_node=1"]))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    res = subprocess.run([sys.executable, "-m", "colbertzero", "train", str(run), "--phase", "unsupervised"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert res.returncode == 2, res.stdout + res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert "Traceback" not in res.stderr and len(lines) == 1, res.stderr
    assert "gpus_per_node=1" in lines[0] and "CPU-only build" in lines[0], lines
    phase = json.loads((run / "manifest.json").read_text())["phases"]["unsupervised"]
    assert phase["state"] == "failed" and "CPU-only build" in phase["failure"]["reason"], phase
    assert phase["failure"]["accelerator"]["cuda"] is None and phase["step"] in (0, None)
    status = subprocess.run([sys.executable, "-m", "colbertzero", "status", str(run)], capture_output=True,
                            text=True, env=env, cwd=ROOT, timeout=120).stdout
    assert f"unsupervised   CPU (torch {torch.__version__})\n" in status, status
    assert "! unsupervised: failed at step 0" in status and "CPU-only build" in status, status


# NCCL's init log as NCCL 2.2x writes it with NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT,NET (host:pid:tid [device]).
NCCL_LOG_OFI = """\
nid001234:61234:61234 [0] NCCL INFO Bootstrap: Using hsn0:10.100.4.17<0>
nid001234:61234:61234 [0] NCCL INFO cudaDriverVersion 12080
nid001234:61234:61234 [0] NCCL INFO NET/Plugin: Loaded net plugin Libfabric (v8)
nid001234:61234:61234 [0] NCCL INFO NET/OFI Initializing aws-ofi-nccl 1.14.0
nid001234:61234:61234 [0] NCCL INFO NET/OFI Selected provider is cxi, fabric is cxi (found 4 nics)
nid001234:61234:61234 [0] NCCL INFO Using network AWS Libfabric
nid001234:61234:61301 [0] NCCL INFO ncclCommInitRankConfig comm 0x5f1e2c0 rank 0 nranks 16 cudaDev 0 nvmlDev 0
"""
NCCL_LOG_SOCKET = """\
nid001234:61234:61234 [0] NCCL INFO Bootstrap: Using hsn0:10.100.4.17<0>
nid001234:61234:61234 [0] NCCL INFO NET/Plugin: Could not find: libnccl-net.so. Using internal net plugin.
nid001234:61234:61234 [0] NCCL INFO Failed to open libibverbs.so[.1]
nid001234:61234:61234 [0] NCCL INFO NET/Socket : Using [0]hsn0:10.100.4.17<0> [1]hsn1:10.100.4.18<0>
nid001234:61234:61234 [0] NCCL INFO Using network Socket
"""


@pytest.mark.parametrize("log, network", [(NCCL_LOG_OFI, "AWS Libfabric"), (NCCL_LOG_SOCKET, "Socket"),
                                          ("NCCL INFO Using network IB\n", "IB"), ("", None)])
def test_the_network_nccl_chose_is_read_from_its_init_log(log, network):
    assert accelerator.nccl_network(log) == network


def test_nccl_is_asked_for_its_log_unless_the_user_chose_its_logging(tmp_path):
    env = accelerator.nccl_log_env(tmp_path, {})
    assert env["NCCL_DEBUG"] == "INFO" and env["NCCL_DEBUG_FILE"] == f"{tmp_path}/%h.%p.log"
    assert accelerator.nccl_log_env(tmp_path, {"NCCL_DEBUG": "INFO"}) == {}  # the user's own INFO log stands
    # a site module's quieter level (Isambard's brics/nccl sets VERSION) would hide the network line: raised
    assert accelerator.nccl_log_env(tmp_path, {"NCCL_DEBUG": "VERSION"})["NCCL_DEBUG"] == "INFO"
    assert accelerator.nccl_log_env(tmp_path, {"NCCL_DEBUG_FILE": "/x/%h.log"}) == {}


def test_a_socket_fallback_between_nodes_is_recorded_and_warned(tmp_path, capsys):
    # The file NCCL writes for this process, under the name NCCL_DEBUG_FILE's %h.%p gives it.
    accelerator.nccl_log_of_this_process(tmp_path).write_text(NCCL_LOG_SOCKET)
    rec = accelerator.record_network(GH200, tmp_path, nodes=4)
    assert rec["nccl_network"] == "Socket" and rec["nodes"] == 4
    assert "NCCL uses TCP sockets between the 4 nodes" in capsys.readouterr().err
    assert describe_accelerator(rec) == "4× NVIDIA GH200 120GB, CUDA 12.9, NCCL 2.26.5 over Socket, bf16"
    accelerator.nccl_log_of_this_process(tmp_path).write_text(NCCL_LOG_OFI)
    rec = accelerator.record_network(GH200, tmp_path, nodes=4)
    assert rec["nccl_network"] == "AWS Libfabric"
    rec["ranks"] = [{"rank": i, "host": f"nid{i // 4}", "cpus": list(range(72 * (i % 4), 72 * (i % 4 + 1)))}
                    for i in range(16)]
    assert describe_accelerator(rec) == ("4× NVIDIA GH200 120GB, CUDA 12.9, NCCL 2.26.5 over AWS Libfabric, bf16, "
                                         "16 rank(s) on 4 host(s), 72 CPU(s) each")
    assert capsys.readouterr().err == ""
    one_node = accelerator.record_network(GH200, tmp_path / "missing", nodes=1)
    assert one_node["nccl_network"] is None and capsys.readouterr().err == ""


def test_placement_problems_name_the_rank_the_host_and_the_cpus():
    here = accelerator.placement(3)
    assert here["rank"] == 3 and set(here["cpus"]) == os.sched_getaffinity(0)
    good = [{"rank": 0, "host": "nid1", "cpus": [0, 1]}, {"rank": 1, "host": "nid1", "cpus": [2, 3]},
            {"rank": 2, "host": "nid2", "cpus": [0, 1]}]
    assert accelerator.placement_problems(good, 2) == []
    # Slurm >= 22.05 without SRUN_CPUS_PER_TASK: every rank on one core
    one_core = [{"rank": 0, "host": "nid1", "cpus": [0]}, {"rank": 1, "host": "nid1", "cpus": [72]}]
    assert accelerator.placement_problems(one_core, 72) == [
        "rank 0 on nid1 runs on 1 CPU(s) [0] of the 72 cpus_per_task it was given",
        "rank 1 on nid1 runs on 1 CPU(s) [72] of the 72 cpus_per_task it was given"]
    unbound = [{"rank": 0, "host": "nid1", "cpus": [0, 1, 2, 3]}, {"rank": 1, "host": "nid1", "cpus": [0, 1, 2, 3]}]
    assert accelerator.placement_problems(unbound, 2) == ["ranks 0 and 1 on nid1 share CPU 0"]
