"""`colbertzero beir`: the sharded exact evaluation (encode, search, merge) against the one-process `evaluate` on the
shared MS MARCO cut, BEIR's split and CQADupStack conventions, kill -9 and resume, arrays on the local Slurm cluster,
and the paper's per-dataset figures in the report of a colbert-zero.yaml run."""

from __future__ import annotations

import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_evaluate import TINY_CORPUS, TINY_QRELS, TINY_QUERIES, _write_beir

from colbertzero.evaluate import evaluate, load_beir, subsample_corpus
from colbertzero.evaluate.metrics import METRICS, read_trec_run
from colbertzero.evaluate.sharded import Evaluation, EvaluationError, Settings, evaluate_here
from colbertzero.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
NO_SLURM = ROOT / "tests" / "no_slurm_task.sh"
QUERIES, OTHERS = 10, 300


@pytest.fixture(scope="module")
def model(minilm, tmp_path_factory) -> str:
    from pylate import models

    folder = tmp_path_factory.mktemp("model") / "minilm-colbert"
    models.ColBERT(minilm, device="cpu", prompts={"query": "search_query: ", "document": "search_document: "}).save(
        str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def msmarco_cut(shared_data, tmp_path_factory) -> Path:
    """msmarco-5k's 10 queries with the fewest judgements, all their judged passages and 300 others (by id hash),
    graded judgements as they are; named like the shared folder (test judgements only: TREC-DL)."""
    corpus, queries, qrels = load_beir(shared_data / "beir" / "msmarco-5k")
    chosen = sorted(qrels, key=lambda q: (len(qrels[q]), q))[:QUERIES]
    sub_qrels = {q: qrels[q] for q in chosen}
    judged = {d for q in chosen for d in qrels[q]}
    sub_corpus = subsample_corpus(corpus, sub_qrels, len(judged) + OTHERS)
    return _write_beir(tmp_path_factory.mktemp("data") / "msmarco-5k", sub_corpus, {q: queries[q] for q in chosen},
                       sub_qrels)


EXACT = {"lengths": "model", "dtype": "float32", "shard_docs": 100}  # evaluate's settings, in shards


@pytest.fixture(scope="module")
def sharded(model, msmarco_cut, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("beir") / "out"
    evaluate_here(out, Settings(model=model, **EXACT), [str(msmarco_cut)], show_progress=False)
    return out


def test_equals_evaluate_on_the_shared_msmarco_cut(model, msmarco_cut, sharded, tmp_path):
    ref = evaluate(model, [str(msmarco_cut)], cache_dir=str(tmp_path / "cache"), runs_dir=tmp_path / "runs",
                   show_progress=False)["datasets"]["msmarco-5k"]
    res = json.loads((sharded / "results.json").read_text())
    ours = res["datasets"]["msmarco-5k"]
    planned = json.loads((sharded / "beir.json").read_text())["datasets"][0]
    assert planned["shards"] == -(-planned["documents"] // 100) > 1
    for m in METRICS:
        assert ours[m] == pytest.approx(ref[m], abs=1e-6), m
    assert (ours["queries"], ours["documents"]) == (ref["queries"], ref["documents"]) == (QUERIES, ours["documents"])
    # the same documents per query: the top-k of the shards' top-ks is the global top-k
    a, b = read_trec_run(sharded / "runs" / "msmarco-5k.trec"), read_trec_run(tmp_path / "runs" / "msmarco-5k.trec")
    assert {q: set(d) for q, d in a.items()} == {q: set(d) for q, d in b.items()}
    for q in a:
        for d in a[q]:
            assert a[q][d] == pytest.approx(b[q][d], abs=1e-5)
    # a folder named for MS MARCO with only test judgements keeps working, and says it is not BEIR's dev split
    assert ours["split"] == "test" and "dev" in ours["split_note"]
    assert res["query_prompt"] == "search_query: " and res["document_prompt"] == "search_document: "


def test_fp16_storage_keeps_the_figures(model, msmarco_cut, sharded, tmp_path):
    """The default stores fp16 token embeddings (half the disk and reads); scores are summed in fp32."""
    half = evaluate_here(tmp_path / "half", Settings(model=model, lengths="model", shard_docs=100),
                         [str(msmarco_cut)], show_progress=False)
    full = json.loads((sharded / "results.json").read_text())
    assert next((tmp_path / "half" / "msmarco-5k" / "shard-00000").glob("embeddings.f16")).is_file()
    for m in METRICS:
        assert half["datasets"]["msmarco-5k"][m] == pytest.approx(full["datasets"]["msmarco-5k"][m], abs=0.01), m


def _dev_and_test(root: Path, name: str, dev: bool) -> Path:
    folder = _write_beir(root / name, TINY_CORPUS, TINY_QUERIES, TINY_QRELS)  # test: q1, q2, q3
    if dev:
        (folder / "qrels" / "dev.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t1\n")
    return folder


def test_beirs_split_per_dataset(model, tmp_path):
    msmarco = _dev_and_test(tmp_path / "a", "msmarco", dev=True)
    scifact = _dev_and_test(tmp_path / "b", "scifact", dev=True)
    plan = Evaluation(tmp_path / "out").plan(Settings(model=model), [str(msmarco), str(scifact)])
    got = {d["key"]: (d["split"], d["queries"], d["split_note"]) for d in plan["datasets"]}
    assert got == {"msmarco": ("dev", 2, None), "scifact": ("test", 3, None)}
    # PyLate's BEIR script's query lengths where it names the dataset, its document length for all
    assert {d["key"]: (d["query_length"], d["document_length"]) for d in plan["datasets"]} == {
        "msmarco": (32, 300), "scifact": (48, 300)}
    forced = Evaluation(tmp_path / "out2").plan(Settings(model=model, split="test"), [str(msmarco)])
    assert (forced["datasets"][0]["split"], forced["datasets"][0]["queries"]) == ("test", 3)


def test_cqadupstack_is_one_column_the_mean_of_its_sub_forums(model, tmp_path):
    forums = tmp_path / "cqadupstack"
    _write_beir(forums / "android", TINY_CORPUS, TINY_QUERIES, TINY_QRELS)
    _write_beir(forums / "gis", {k: v.upper() for k, v in TINY_CORPUS.items()}, TINY_QUERIES,
                {"q1": {"d3": 1}, "q2": {"d6": 1}})
    other = _write_beir(tmp_path / "scifact", TINY_CORPUS, TINY_QUERIES, {"q3": {"d4": 1}})
    res = evaluate_here(tmp_path / "out", Settings(model=model, lengths="model", dtype="float32", shard_docs=4),
                        [str(forums), str(other)], show_progress=False)
    assert list(res["datasets"]) == ["cqadupstack", "scifact"]
    assert set(res["parts"]) == {"cqadupstack/android", "cqadupstack/gis"}
    alone = evaluate(model, [str(forums / "android"), str(forums / "gis")], cache_dir=str(tmp_path / "cache"),
                     show_progress=False)["datasets"]
    for m in METRICS:
        for forum in ("android", "gis"):
            assert res["parts"][f"cqadupstack/{forum}"][m] == pytest.approx(alone[forum][m], abs=1e-6)
        assert res["datasets"]["cqadupstack"][m] == pytest.approx(statistics.fmean(alone[f][m] for f in alone))
        assert res["average"][m] == pytest.approx((res["datasets"]["cqadupstack"][m] + res["datasets"]["scifact"][m])
                                                  / 2)
    assert res["datasets"]["cqadupstack"]["mean_of"] == 2 and res["datasets"]["cqadupstack"]["queries"] == 5


def test_changed_settings_over_unfinished_work_are_refused(model, msmarco_cut, tmp_path):
    Evaluation(tmp_path / "out").plan(Settings(model=model, shard_docs=100), [str(msmarco_cut)])
    with pytest.raises(EvaluationError, match=r"changed: shard_docs\)"):
        Evaluation(tmp_path / "out").plan(Settings(model=model, shard_docs=50), [str(msmarco_cut)])
    r = _cli("beir", model, "--datasets", str(msmarco_cut), "--out", str(tmp_path / "out"), "--dtype", "float32")
    assert r.returncode == 2 and "changed: dtype" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = _cli("beir", "--out", str(tmp_path / "out"), "--stage", "search")
    items = 1 + json.loads((tmp_path / "out" / "beir.json").read_text())["datasets"][0]["shards"]  # queries + shards
    assert r.returncode == 2 and f"encode stage has {items} item(s) to run before search" in r.stderr, r.stderr


def _cli(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "colbertzero", *args], capture_output=True, text=True, timeout=600,
                          cwd=ROOT, **kw)


def test_kill_9_then_resume_gives_the_same_run_file(model, msmarco_cut, sharded, tmp_path):
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "colbertzero", "beir", model, "--datasets", str(msmarco_cut), "--out", str(out),
            "--lengths", "model", "--dtype", "float32", "--shard-docs", "100", "--json"]
    for done_before_kill in (2, 4):  # killed in the encode stage twice, each time after some items finished
        p = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while len(list(out.glob("msmarco-5k/*/meta.json"))) < done_before_kill and time.monotonic() < deadline:
            assert p.poll() is None, "finished before it could be killed"
            time.sleep(0.05)
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        assert not (out / "results.json").exists()
    r = _cli("beir", "--out", str(out), "--json")  # only the folder: the evaluation planned there goes on
    assert r.returncode == 0, r.stderr
    assert (out / "runs" / "msmarco-5k.trec").read_bytes() == (sharded / "runs" / "msmarco-5k.trec").read_bytes()
    assert json.loads(r.stdout)["datasets"] == json.loads((sharded / "results.json").read_text())["datasets"]


def test_arrays_on_the_local_slurm_cluster_equal_the_local_run(local_slurm, model, msmarco_cut, sharded, tmp_path):
    """Encode and search as arrays, a merge job after them, each task inside a `command` container without Slurm's
    commands (the profile's wrapper on srun)."""
    log = tmp_path / "in-container.log"
    profile = tmp_path / "site.yaml"
    profile.write_text(yaml.safe_dump({"container": {"runtime": "command", "command": [str(NO_SLURM), str(log)]}}))
    out = tmp_path / "out"
    r = _cli("beir", model, "--datasets", str(msmarco_cut), "--out", str(out), "--lengths", "model", "--dtype",
             "float32", "--shard-docs", "100", "--executor", "slurm", "--cluster", str(profile), "--cpus-per-task",
             "1", "--time", "0:10:00", "--json")
    assert r.returncode == 0, r.stderr
    jobs = json.loads(r.stdout)["jobs"]
    shards = json.loads((out / "beir.json").read_text())["datasets"][0]["shards"]
    assert [len(jobs[s]["items"]) for s in ("encode", "search")] == [1 + shards, shards] and "merge" in jobs
    deadline = time.monotonic() + 540
    while not (out / "results.json").is_file() and time.monotonic() < deadline:
        time.sleep(2)
    logs = "\n".join(p.read_text() for p in sorted((out / "slurm").glob("*.log")))
    assert (out / "results.json").is_file(), logs[-3000:]
    assert (out / "runs" / "msmarco-5k.trec").read_bytes() == (sharded / "runs" / "msmarco-5k.trec").read_bytes()
    ran = log.read_text().splitlines()
    assert len(ran) == (1 + shards) + shards + 1 and all("scontrol=none" in line for line in ran), ran
    again = _cli("beir", model, "--datasets", str(msmarco_cut), "--out", str(out), "--lengths", "model", "--dtype",
                 "float32", "--shard-docs", "100", "--executor", "slurm", "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["jobs"] == {}, again.stderr


def _paper_rows() -> dict[str, dict[str, float]]:
    lines = [x for x in (ROOT.parent / "shared" / "paper" / "beir-ndcg10.tsv").read_text().splitlines()
             if not x.startswith("#")]
    rows = list(csv.reader(lines, delimiter="\t"))
    return {r[0]: {"avg": float(r[1]), **{h: float(v) for h, v in zip(rows[0][2:], r[2:])}} for r in rows[1:]}


@pytest.mark.parametrize("recipe,run,phases", [
    ("colbert-zero.yaml", "ColBERT-Zero (distillation)",
     {"unsupervised": "ColBERT-Zero-unsupervised", "supervised": "ColBERT-Zero-supervised"}),
    ("modern-colbert-embed-base.yaml", "ModernColBERT-embed-base (supervised + KD)",
     {"supervised": "ModernColBERT-embed-base-supervised"}),
    ("kd-only.yaml", "ModernColBERT-embed-base-kd-only", {}),
    ("ablations/kd-both.yaml", "ModernColBERT-embed-base-kd-only", {}),
    ("ablations/colbert-zero-noprompts.yaml", "ColBERT-Zero-noprompts (distillation)",
     {"unsupervised": "ColBERT-Zero-noprompts-unsupervised", "supervised": "ColBERT-Zero-noprompts-supervised"}),
])
def test_paper_recipes_carry_the_model_cards_per_dataset_figures(recipe, run, phases):
    paper = _paper_rows()
    r = load_recipe(ROOT / "recipes" / recipe)
    for ref, row in [(r.reference, paper[run])] + [(r.phases[p].reference, paper[m]) for p, m in phases.items()]:
        assert ref.per_dataset == {k: v for k, v in row.items() if k != "avg"}
        assert statistics.fmean(ref.per_dataset.values()) == pytest.approx(row["avg"], abs=0.006)
    assert r.reference.beir_ndcg10 == paper[run]["avg"]
    final = list(r.phases)[-1]
    assert not r.phases[final].reference.per_dataset  # the final model is the run's: its figures are the run's


def test_the_report_of_a_colbert_zero_run_puts_the_paper_beside_each_dataset(model, tmp_path):
    from colbertzero.manifest import Manifest
    from colbertzero.report import build_report

    run = tmp_path / "run"
    Manifest.create(run, load_recipe(ROOT / "recipes" / "colbert-zero.yaml"))
    data = tmp_path / "data"
    ds = [_write_beir(data / "scifact", TINY_CORPUS, TINY_QUERIES, TINY_QRELS),
          _write_beir(data / "cqadupstack" / "android", TINY_CORPUS, TINY_QUERIES, {"q1": {"d1": 1}}),
          _write_beir(data / "cqadupstack" / "gis", TINY_CORPUS, TINY_QUERIES, {"q2": {"d2": 1}})]
    r = _cli("beir", model, "--datasets", str(ds[0]), str(data / "cqadupstack"), "--out", str(tmp_path / "out"),
             "--run-dir", str(run), "--phase", "distillation", "--shard-docs", "4")
    assert r.returncode == 0, r.stderr
    assert "cqadupstack" in r.stdout and "scifact" in r.stdout
    md = build_report([str(run)]).read_text()
    table = md.split("## Results: nDCG@10")[1].split("###")[0]
    header = next(line for line in table.splitlines() if line.startswith("| Phase"))
    paper = _paper_rows()["ColBERT-Zero (distillation)"]
    assert [c.strip() for c in header.split("|")[2:17]] == [k for k in paper if k != "avg"]  # the card's 15 columns
    final = next(line for line in table.splitlines() if line.startswith("| distillation (final)"))
    ev = json.loads((run / "phases" / "distillation" / "eval.json").read_text())
    ours = 100 * ev["datasets"]["scifact"]["ndcg@10"]
    assert f"{ours:.2f} (76.50, {ours - 76.50:+.2f})" in final
    assert "— (85.24)" in final  # quora: not run, the paper's figure beside the dash
    same = (76.50 + 41.34) / 2  # the paper's mean over the two datasets we ran
    assert f"| {same:.2f} | {100 * ev['average']['ndcg@10'] - same:+.2f} |" in final
    assert "13 of the paper's 15 datasets not evaluated" in md
    assert Manifest(run).phase("distillation")["eval"]["datasets"]["cqadupstack"]["mean_of"] == 2


def test_a_phase_evaluation_is_submitted_after_the_phase_and_lands_in_the_run(local_slurm, model, msmarco_cut, sharded,
                                                                            tmp_path):
    """In a Slurm job rank 0 only plans eval.beir; `after-phase` on the host submits the arrays with eval.job's
    resources; the merge job records the results as the phase's evaluation (manifest, eval.json, runs/)."""
    from colbertzero.evaluate.sharded import evaluate_phase
    from colbertzero.manifest import Manifest

    ev = "phases.distillation.eval"
    recipe = load_recipe(ROOT / "recipes" / "tiny-cpu.yaml", [
        f"{ev}.beir=[{msmarco_cut}]", f"{ev}.job.cpus_per_task=1", f"{ev}.lengths=model", f"{ev}.dtype=float32",
        f"{ev}.shard_docs=100"])
    run = tmp_path / "run"
    m = Manifest.create(run, recipe)
    assert evaluate_phase(m, "distillation", model, defer=True) is None
    assert m.phase("distillation")["beir_eval"]["state"] == "planned"
    r = _cli("after-phase", str(run), "--phase", "distillation", "--exit-code", "0")
    assert r.returncode == 0, r.stderr
    planned = m.phase("distillation")["beir_eval"]
    assert planned["state"] == "submitted" and set(planned["jobs"]) == {"encode", "search", "merge"}, planned
    deadline = time.monotonic() + 540
    while not m.phase("distillation").get("eval") and time.monotonic() < deadline:
        time.sleep(2)
    phase = m.phase("distillation")
    assert phase.get("eval"), "\n".join(p.read_text() for p in Path(planned["logs"]).glob("*.log"))[-3000:]
    assert phase["beir_eval"]["state"] == "done"
    assert phase["eval"]["datasets"] == json.loads((sharded / "results.json").read_text())["datasets"]
    layout = m.layout.phase("distillation")
    assert json.loads(layout.eval_json.read_text()) == phase["eval"]
    assert (layout.runs / "msmarco-5k.trec").read_bytes() == (sharded / "runs" / "msmarco-5k.trec").read_bytes()
    status = _cli("status", str(run))
    assert status.returncode == 0 and "eval.beir distillation merge" in status.stdout, status.stdout
    assert all(h["state"] == "done" for h in json.loads(_cli("status", str(run), "--json").stdout)["helpers"])
