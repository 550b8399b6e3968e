"""Export: the PyLate folder written after 2-rank training at ZeRO 0, 2 and 3 loads offline in this (fresh) process,
holds exactly the trained fp32 weights, encodes like the trained module, and carries prompts, lengths and lineage."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_worker import DOCUMENTS, EXPORT_STAGES, PHASE, QUERIES, STEPS, WORLD, recipe_dict, zero_runs  # noqa: E402

from colbertzero.files import sha256_tree, temps_in  # noqa: E402
from colbertzero.manifest import Manifest  # noqa: E402
from colbertzero.recipe import recipe_from_dict  # noqa: E402
from colbertzero.train.export import ExportError, export_model, read_card_info, update_model_card  # noqa: E402


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_modernbert) -> Path:
    return zero_runs(tmp_path_factory.getbasetemp() / "zero-runs", tiny_modernbert)


def _front_matter(readme: Path) -> dict:
    text = readme.read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n", 2)[1])


def _export(runs: Path, stage: int) -> Path:
    return runs / f"zero{stage}" / "A" / "phases" / PHASE / "export"


@pytest.mark.parametrize("stage", EXPORT_STAGES)
def test_export_loads_offline_and_encodes_like_the_trained_module(runs, stage):
    from pylate.models import ColBERT

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    out = _export(runs, stage)
    expected = torch.load(runs / f"encode-zero{stage}.pt", weights_only=True)
    assert Path(expected["out"]) == out
    model = ColBERT(str(out), device="cpu")

    # exactly the trained weights (fp32, gathered across ranks), not merely close
    trained = torch.load(runs / f"weights-zero{stage}-A.pt", weights_only=True)
    sd = model.state_dict()
    assert {f"model.{k}" for k in sd} == set(trained) - {"temperature"}
    assert all(torch.equal(v, trained[f"model.{k}"]) for k, v in sd.items())

    q = model.encode(QUERIES, is_query=True, prompt_name="query", convert_to_tensor=True)
    d = model.encode(DOCUMENTS, is_query=False, prompt_name="document", convert_to_numpy=False)
    for got, want in zip(list(q) + list(d), expected["queries"] + expected["documents"]):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("stage", EXPORT_STAGES)
def test_export_config_tokenizer_card_and_manifest(runs, stage):
    from transformers import AutoTokenizer

    out = _export(runs, stage)
    ph = recipe_dict("x")["phases"][PHASE]
    cfg = json.loads((out / "config_sentence_transformers.json").read_text())
    assert cfg["prompts"] == {"query": "search_query: ", "document": "search_document: "}
    assert cfg["default_prompt_name"] is None
    assert cfg["query_length"] == ph["query_length"] + 7 and cfg["document_length"] == ph["document_length"] + 7
    assert (cfg["query_prefix"], cfg["document_prefix"]) == ("[Q] ", "[D] ")
    assert cfg["do_query_expansion"] is True and cfg["attend_to_expansion_tokens"] is False
    assert (out / "model.safetensors").is_file() and (out / "1_Dense" / "model.safetensors").is_file()
    assert not temps_in(out.parent)

    tok = AutoTokenizer.from_pretrained(out)
    ids = tok.convert_tokens_to_ids(["[Q] ", "[D] "])
    assert tok.unk_token_id not in ids and len(set(ids)) == 2

    run_a = runs / f"zero{stage}" / "A"
    m = Manifest(run_a)
    entry = m.phase(PHASE)["export"]
    assert entry["path"] == f"phases/{PHASE}/export" and entry["step"] == STEPS
    assert entry["sha256"] == sha256_tree(out)

    meta = _front_matter(out / "README.md")
    info = meta["colbertzero"]
    assert info["recipe"] == "ckpt-test" and info["recipe_hash"] == m.read()["recipe_hash"]
    assert info["step"] == STEPS and info["zero_stage"] == stage and info["world_size"] == WORLD
    assert info["lineage"]["data_index"] == "/nonexistent/index.json" and info["lineage"]["init"]
    assert info["gpu_hours_phase"] == 0.0 and info["weights_dtype"] == "float32"
    assert len(info["other_parameters"]["temperature"]) == 1  # the learnable temperature, recorded
    assert info["eval"]["toy-beir"] == {"ndcg@10": 0.5, "recall@100": 0.75, "queries": 50, "retrieval": "exact"}
    assert meta["library_name"] == "PyLate" and "ColBERT" in meta["tags"]
    (result,) = meta["model-index"][0]["results"]
    assert result["dataset"]["name"] == "toy-beir"
    assert {x["type"]: x["value"] for x in result["metrics"]} == {"MaxSim_ndcg@10": 0.5, "MaxSim_recall@100": 0.75}
    body = (out / "README.md").read_text()
    assert "/nonexistent/index.json" in body and "ckpt-test" in body and "GPU-hours" in body


def test_update_model_card_adds_results_keeps_lineage_and_weights(runs, tmp_path):
    out = tmp_path / "export"
    shutil.copytree(_export(runs, 2), out)
    before, weights = read_card_info(out), sha256_tree(out)
    update_model_card(out, {"scifact": {"ndcg@10": 0.71}, "nfcorpus": {"ndcg@10": 0.33, "mrr@10": np.float32(0.5)}})
    meta = _front_matter(out / "README.md")
    results = {
        r["dataset"]["name"]: {x["type"]: x["value"] for x in r["metrics"]} for r in meta["model-index"][0]["results"]
    }
    assert results == {"scifact": {"MaxSim_ndcg@10": 0.71}, "nfcorpus": {"MaxSim_ndcg@10": 0.33, "MaxSim_mrr@10": 0.5}}
    after = read_card_info(out)
    assert {k: v for k, v in after.items() if k != "eval"} == {k: v for k, v in before.items() if k != "eval"}
    assert sha256_tree(out) == weights
    with pytest.raises(ValueError, match="dataset"):
        update_model_card(out, {"scifact": 0.71})
    with pytest.raises(ExportError, match="model card"):
        update_model_card(tmp_path, {"scifact": {"ndcg@10": 0.7}})


def test_export_of_a_plain_module_without_prompts(tmp_path, tiny_modernbert):
    """One process, no DeepSpeed: a module given as the template is copied, not changed; prompts may be off."""
    from pylate.models import ColBERT

    data = recipe_dict(tiny_modernbert)
    data["phases"][PHASE]["prompts"]["enabled"] = False
    data["model"]["do_query_expansion"] = False
    recipe = recipe_from_dict(data)
    model = ColBERT(tiny_modernbert, device="cpu", embedding_size=32, query_length=8, document_length=24)
    with torch.no_grad():
        model[1].linear.weight.mul_(2.0)  # differs from what the path would build
    m = Manifest.create(tmp_path / "run", recipe)
    out = export_model(
        model,
        model,
        tmp_path / "run" / "exported",
        recipe=recipe,
        phase_name=PHASE,
        manifest=m,
        lineage={"init": tiny_modernbert},
        step=0,
    )
    cfg = json.loads((out / "config_sentence_transformers.json").read_text())
    assert cfg["prompts"] == {} and cfg["query_length"] == 8 and cfg["do_query_expansion"] is False
    loaded = ColBERT(str(out), device="cpu")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    assert m.phase(PHASE)["export"]["path"] == "exported"
    # re-export replaces the folder atomically; a template with other prefixes is refused
    export_model(model, tiny_modernbert, out, recipe=recipe, phase_name=PHASE, manifest=None, lineage={}, step=1)
    assert read_card_info(out)["step"] == 1 and not temps_in(out.parent)
    other = ColBERT(tiny_modernbert, device="cpu", embedding_size=32, query_prefix="[unused0]")
    with pytest.raises(ExportError, match="query_prefix"):
        export_model(other, other, tmp_path / "x", recipe=recipe, phase_name=PHASE, manifest=None, lineage={}, step=0)
