"""`colbertzero plan / validate` as a user runs them: the real console script, exit codes, messages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny-cpu.yaml")


def run(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "colbertzero", *args], capture_output=True, text=True, cwd=cwd or ROOT, timeout=300
    )


def test_plan_json_has_paper_values():
    r = run("plan", "recipes/colbert-zero.yaml", "--json")
    assert r.returncode == 0, r.stderr
    p = json.loads(r.stdout)
    u = p["phases"]["unsupervised"]["hyperparameters"]
    assert (u["lr"], u["global_batch_size"], u["temperature"], u["gradcache_mini_batch"]) == (3e-4, 16384, 0.02, 512)
    assert (u["effective_query_length"], u["effective_document_length"]) == (39, 187)
    assert u["gather_across_ranks"] and u["sampling"] == "proportional" and len(u["sources"]) == 29
    s = p["phases"]["supervised"]["hyperparameters"]
    assert (s["lr"], s["global_batch_size"], s["temperature"], s["max_negatives"]) == (8e-6, 64, 0.2, 10)
    d = p["phases"]["distillation"]["hyperparameters"]
    assert (d["lr"], d["docs_per_query"], d["micro_batch_per_rank"], d["gradient_accumulation"]) == (1e-5, 32, 4, 2)
    assert p["reference"]["beir_ndcg10"] == 55.43
    assert abs(p["projected_gpu_hours"] - 408) < 1


def test_plan_table():
    r = run("plan", TINY)
    assert r.returncode == 0, r.stderr
    assert "unsupervised" in r.stdout and "proj GPU-h" in r.stdout


def _refused(r, *needles):
    assert r.returncode == 2, (r.stdout, r.stderr)
    for n in needles:
        assert n in r.stderr, r.stderr


def test_validate_ok(tmp_path):
    r = run("validate", TINY)
    assert r.returncode == 0, r.stderr
    assert "ok" in r.stdout


def test_validate_refuses_prompt_mismatch():
    _refused(
        run("validate", TINY, "phases.supervised.prompts.enabled=false"),
        "phases.supervised.prompts",
        "prompts.enabled",
        "allow_prompt_mismatch",
    )
    # an ablation may allow it explicitly
    r = run(
        "validate",
        TINY,
        "phases.supervised.prompts.enabled=false",
        "phases.distillation.prompts.enabled=false",
        "allow_prompt_mismatch=true",
    )
    assert r.returncode == 0, r.stderr


def test_validate_refuses_over_budget():
    _refused(
        run("validate", TINY, "phases.supervised.budget_gpu_hours=0.01"),
        "phases.supervised.budget_gpu_hours",
        "exceed the budget",
    )
    _refused(run("validate", TINY, "budget_gpu_hours=0.5"), "budget_gpu_hours", "for the run exceed")


def test_validate_refuses_indivisible_batch():
    _refused(
        run("validate", TINY, "phases.unsupervised.global_batch_size=9"),
        "phases.unsupervised.global_batch_size",
        "not divisible by the GPU count",
    )
    _refused(run("validate", TINY, "phases.unsupervised.gradcache_mini_batch=3"), "gradcache_mini_batch")


def test_validate_refuses_cadence_longer_than_time_limit():
    # 500 steps × 5.8 s/step (the paper's step time) > a 30-minute limit
    _refused(
        run(
            "validate",
            "recipes/colbert-zero.yaml",
            "--no-path-checks",
            "phases.unsupervised.resources.time_limit=00:30:00",
        ),
        "phases.unsupervised.cadence.save_every",
        "before its first checkpoint",
    )


def test_validate_refuses_missing_local_data(tmp_path):
    _refused(
        run("validate", TINY, f"phases.unsupervised.data.sources=[{{name: x, path: {tmp_path}/none.jsonl}}]"),
        "none.jsonl: not found",
    )


def test_validate_refuses_missing_eval_sets_and_warns_on_a_cadence_without_sets(tmp_path):
    _refused(
        run("validate", TINY, f"phases.distillation.eval.beir=[{tmp_path}/beir/scifact]"),
        "phases.distillation.eval.beir[0]",
        "scifact: no such dataset folder",
        "eval.beir=[]",
    )
    _refused(
        run(
            "validate",
            TINY,
            "phases.supervised.cadence.eval_every=2",
            f"phases.supervised.eval.in_training=[{tmp_path}/nano]",
        ),
        "phases.supervised.eval.in_training[0]",
    )
    r = run("validate", TINY, "phases.supervised.cadence.eval_every=2")
    assert r.returncode == 0 and "eval.in_training lists no dataset" in r.stdout + r.stderr, (r.stdout, r.stderr)


def test_validate_writes_nothing(tmp_path):
    before = sorted(p.name for p in tmp_path.iterdir())
    run("validate", TINY, "phases.unsupervised.global_batch_size=9", cwd=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_bad_recipe_message():
    r = run("validate", TINY, "phases.supervised.lr=-1")
    _refused(r, "phases.supervised.lr: must be > 0")


def test_a_reader_that_leaves_early_is_not_an_error():
    """`colbertzero plan R | head -1`: the pipe closes before the output is flushed."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "colbertzero", "plan", "recipes/colbert-zero.yaml", "--json"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()  # long before the interpreter has even imported the package
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 0 and "BrokenPipe" not in err, err


def test_plan_projects_from_a_gpu_bench_json(tmp_path):
    bench = tmp_path / "gpu.json"
    bench.write_text(json.dumps({"device": "NVIDIA H200", "kinds": {
        "unsupervised": {"pairs_per_s": 1024.0}, "supervised": {"pairs_per_s": 64.0},
        "distillation": {"pairs_per_s": 16.0}}}))
    res = run("plan", "recipes/colbert-zero.yaml", "--gpu-bench", bench, "--json")
    assert res.returncode == 0, res.stderr
    phases = json.loads(res.stdout)["phases"]
    u = phases["unsupervised"]
    # 16,384 pairs a step over 16 GPUs at 1,024 pairs/s each: 1 s a step
    assert u["seconds_per_step"] == pytest.approx(1.0) and u["seconds_per_step_from"] == "GPU bench on NVIDIA H200"
    assert phases["supervised"]["seconds_per_step"] == pytest.approx(64 / (64 * 4))
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    res = run("plan", "recipes/colbert-zero.yaml", "--gpu-bench", bad)
    assert res.returncode == 2 and "not the JSON of tools/bench/gpu.sh" in res.stderr
    # the script's own CPU check (gpu.py --device cpu --tiny) is no GPU figure
    cpu = tmp_path / "cpu.json"
    cpu.write_text(json.dumps({"device": "cpu", "model": "ModernBERT-base architecture (tiny shapes)",
                               "kinds": {"unsupervised": {"pairs_per_s": 30.0}}}))
    res = run("plan", "recipes/colbert-zero.yaml", "--gpu-bench", cpu)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
    assert "measured on cpu at tiny shapes" in res.stderr and "tools/bench/gpu.sh" in res.stderr


def test_user_errors_are_one_message_never_a_traceback(tmp_path):
    latin = tmp_path / "latin1.yaml"
    latin.write_bytes("name: caf\xe9\n".encode("latin-1"))
    twice = tmp_path / "twice.yaml"
    twice.write_text("name: a\nphases: {}\nname: b\n")
    cases = [
        (("validate", latin), "not UTF-8 text"),
        (("validate", tmp_path), "is a directory"),
        (("validate", twice), "key 'name' is written twice, on lines 1 and 3"),
        (("prepare", TINY, "--array-task", "4", "--array-tasks", "4"), "outside 0..3"),
        (("prepare", TINY, "--workers", "0"), "must be at least 1"),
        (("prepare", TINY, "--workers", "-1"), "must be at least 1"),
    ]
    for args, message in cases:
        res = run(*args)
        assert res.returncode == 2, (args, res.stderr)
        assert message in res.stderr and "Traceback" not in res.stderr, (args, res.stderr)
