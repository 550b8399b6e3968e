"""`colbertzero demo`: the whole pipeline on CPU in minutes (`driver`), on a data set built from Python's own
documentation (`data`, from the text `pydocs` reads)."""

from .driver import evaluate_init, format_stages, ndcg_by_stage, run_demo, tiny_recipe_path

__all__ = ["evaluate_init", "format_stages", "ndcg_by_stage", "run_demo", "tiny_recipe_path"]
