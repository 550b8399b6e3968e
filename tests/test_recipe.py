"""Recipe schema: every shipped recipe loads and passes the schema-level checks; round-trips; overrides; errors."""

from __future__ import annotations

import glob
from pathlib import Path

import pytest
import yaml

from colbertzero import preflight
from colbertzero.recipe import (
    RecipeError,
    dump_recipe,
    load_recipe,
    parse_time_limit,
    recipe_from_dict,
)

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(glob.glob(str(ROOT / "recipes" / "**" / "*.yaml"), recursive=True))


def test_recipes_exist():
    names = {Path(p).name for p in RECIPES}
    assert {"colbert-zero.yaml", "modern-colbert-embed-base.yaml", "kd-only.yaml", "tiny-cpu.yaml"} <= names
    assert len([p for p in RECIPES if "/ablations/" in p]) >= 5


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: Path(p).name)
def test_every_recipe_validates(path):
    r = load_recipe(path)
    # Data and hub models are not on this machine: schema, divisibility, alignment, cadence and budget only.
    errs = preflight.errors(preflight.check(r, paths=False))
    assert not errs, "\n".join(map(str, errs))


def test_shipped_recipes_share_shards_only_when_the_tokens_are_the_same():
    """Shards are tokenized for one tokenizer, prompt setup and lengths: two recipes (or phases) that differ in any
    of them must not write the same shards_dir, or preparing one would refuse (or clobber) the other's."""
    def tokenizer(r, name):  # the model a phase's tokenizer comes from: the root of its init chain
        ph = r.phase(name)
        return ph.init if ph.init_from is None else tokenizer(r, ph.init_from)

    owners: dict[str, tuple] = {}
    for path in RECIPES:
        if "tiny-cpu" in path:  # the toy recipes share the test data's shards on purpose (same settings)
            continue
        r = load_recipe(path)
        for name, ph in r.phases.items():
            key = (ph.kind, tokenizer(r, name), ph.prompts.enabled and (ph.prompts.query, ph.prompts.document),
                   ph.effective_query_length, ph.effective_document_length, ph.data.max_negatives,
                   ph.data.docs_per_query, tuple(s.name for s in ph.data.sources))
            where = f"{Path(path).name}:{name}"
            seen = owners.setdefault(ph.data.shards_dir, (key, where))
            assert seen[0] == key, f"{where} and {seen[1]} share {ph.data.shards_dir} with other token settings"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: Path(p).name)
def test_round_trip(path):
    r = load_recipe(path)
    again = recipe_from_dict(yaml.safe_load(dump_recipe(r)))
    assert again.resolved() == r.resolved()
    assert again.hash() == r.hash()


def test_pipelines_and_ablations_derive():
    b = load_recipe(ROOT / "recipes" / "modern-colbert-embed-base.yaml")
    assert list(b.phases) == ["supervised", "distillation"]
    assert b.phases["supervised"].init == "nomic-ai/modernbert-embed-unsupervised"
    assert b.reference.beir_ndcg10 == 55.12
    a = load_recipe(ROOT / "recipes" / "kd-only.yaml")
    assert list(a.phases) == ["distillation"] and a.reference.beir_ndcg10 == 54.09
    assert a.phases["distillation"].init == "nomic-ai/modernbert-embed-base"
    nop = load_recipe(ROOT / "recipes" / "ablations" / "colbert-zero-noprompts.yaml")
    assert nop.reference.beir_ndcg10 == 54.61
    assert not any(p.prompts.enabled for p in nop.phases.values())
    length = load_recipe(ROOT / "recipes" / "ablations" / "kd-length.yaml")
    d = length.phases["distillation"]
    assert not d.prompts.enabled and (d.effective_query_length, d.effective_document_length) == (39, 519)
    prompt = load_recipe(ROOT / "recipes" / "ablations" / "kd-prompt.yaml").phases["distillation"]
    assert prompt.prompts.enabled and prompt.effective_query_length == 32


def test_overrides():
    r = load_recipe(
        ROOT / "recipes" / "colbert-zero.yaml",
        [
            "phases.supervised.lr=1e-5",
            "phases.unsupervised.resources.nodes=8",
            "phases.supervised.prompts.query=query: ",
        ],
    )
    assert r.phases["supervised"].lr == 1e-5
    assert r.phases["unsupervised"].resources.nodes == 8
    assert r.phases["supervised"].prompts.query == "query: "


def test_fused_scores_need_gpus():
    r = load_recipe(ROOT / "recipes" / "colbert-zero.yaml", ["phases.supervised.scores_backend=lik"])
    assert not preflight.errors(preflight.check(r, paths=False))  # GPUs: the kernel may run there
    r = load_recipe(ROOT / "recipes" / "colbert-zero.yaml", ["phases.supervised.scores_backend=lik",
                                                             "phases.supervised.resources.gpus_per_node=0"])
    (e,) = preflight.errors(preflight.check(r, paths=False))
    assert e.where == "phases.supervised.scores_backend" and "use auto or torch" in e.message


def test_error_names_field_path():
    with pytest.raises(RecipeError, match=r"phases\.supervised\.lr: must be > 0"):
        load_recipe(ROOT / "recipes" / "colbert-zero.yaml", ["phases.supervised.lr=0"])
    with pytest.raises(RecipeError, match=r"phases\.supervised\.lrr: unknown field"):
        load_recipe(ROOT / "recipes" / "colbert-zero.yaml", ["phases.supervised.lrr=1"])
    with pytest.raises(RecipeError, match=r"no phases\.supervisd"):
        load_recipe(ROOT / "recipes" / "colbert-zero.yaml", ["phases.supervisd.lr=1"])
    with pytest.raises(RecipeError, match="not an earlier phase"):
        load_recipe(ROOT / "recipes" / "colbert-zero.yaml", ["phases.unsupervised.init={from: distillation}"])


def test_env_and_missing_file(tmp_path, monkeypatch):
    monkeypatch.setenv("COLBERTZERO_DATA", str(tmp_path))
    r = load_recipe(ROOT / "recipes" / "colbert-zero.yaml")
    assert r.phases["unsupervised"].data.shards_dir == str(tmp_path / "shards" / "colbert-zero" / "unsupervised")
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)


def test_time_limits():
    assert parse_time_limit("24:00:00") == 86400
    assert parse_time_limit("2-00:00:00") == 172800
    assert parse_time_limit("90") == 5400
    assert parse_time_limit("1-12") == 129600
    with pytest.raises(ValueError):
        parse_time_limit("tomorrow")


def test_cluster_refusals_name_the_field_and_the_largest_value_the_partition_allows():
    """The jobs of a run against the partitions `sinfo` reports (here written out): CPUs per node (a phase's tasks
    share its node), memory per node, the partition's time limit, a partition that does not exist; an evaluation
    job takes its phase's CPUs unless set."""
    from colbertzero.slurm import Partition

    parts = {"debug": Partition("debug", True, 8, 16000, 4 * 3600), "long": Partition("long", False, 8, 16000, None)}
    base = load_recipe(ROOT / "recipes" / "tiny-cpu-slurm.yaml")
    assert preflight.cluster_refusals(base, parts) == []
    r = load_recipe(ROOT / "recipes" / "tiny-cpu-slurm.yaml", [
        "phases.unsupervised.resources.gpus_per_node=4", "phases.unsupervised.resources.cpus_per_task=4",
        "phases.supervised.resources.mem=20G", "phases.supervised.resources.time_limit=5:00:00",
        "phases.distillation.resources.partition=gpu", "phases.supervised.cadence.eval_every=2",
        "phases.supervised.eval.in_training=[x]", "phases.supervised.resources.cpus_per_task=9",
        "prepare.time_limit=4:00:01", "prepare.partition=long"])
    found = {f.where: f.message for f in preflight.cluster_refusals(r, parts)}
    assert found == {
        "phases.unsupervised.resources.cpus_per_task": "4 CPUs × 4 tasks on one node, but the nodes of partition "
                                                       "debug have 8: the largest value it allows is 2",
        "phases.supervised.resources.cpus_per_task": "9 CPUs on one node, but the nodes of partition debug have 8: "
                                                     "the largest value it allows is 8",
        "phases.supervised.resources.mem": "20G per node, but the nodes of partition debug have 16000 MB: the "
                                           "largest value it allows is 16000M",
        "phases.supervised.resources.time_limit": "5:00:00 is over partition debug's limit: the largest value it "
                                                  "allows is 04:00:00",
        "phases.supervised.eval.job.cpus_per_task": "9 CPUs on one node, but the nodes of partition debug have 8: "
                                                    "the largest value it allows is 8",
        "phases.distillation.resources.partition": "'gpu' is not a partition of this cluster (it has: debug, long)",
    }, found  # prepare on `long` has no time limit
    assert preflight.cluster_refusals(r, None) == []  # no Slurm answered: nothing to check against
