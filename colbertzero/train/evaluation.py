"""In-training evaluation: the current weights scored on a phase's small `eval.in_training` sets every
`cadence.eval_every` steps, in the training processes.

Every rank gathers the weights (collective under ZeRO-3); rank 0 evaluates a CPU copy on its device while the others
wait for its outcome, which is broadcast: an evaluation that fails (a bad dataset) fails every rank at once instead of
leaving them at a barrier. The RNG is restored afterwards, so a run with evaluations trains exactly like one without.
Results go to `phases/<phase>/logs/eval.jsonl`, the metrics sinks and the manifest (docs/CONTRACTS.md).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ..evaluate import evaluate
from ..files import now_iso
from . import dist
from .checkpoint import capture_rng_state, restore_rng_state
from .export import gather_colbert


class EvalError(RuntimeError):
    pass


class Evaluator:
    def __init__(self, *, manifest, recipe, phase_name: str, init_path: str, device: str, metrics) -> None:
        self.manifest, self.recipe, self.phase_name = manifest, recipe, phase_name
        self.phase = recipe.phase(phase_name)
        self.init_path, self.device, self.metrics = init_path, device, metrics
        self.logs = Path(manifest.run_dir) / "phases" / phase_name / "logs"

    def should_eval(self, step: int, total: int) -> bool:
        c, e = self.phase.cadence, self.phase.eval
        return bool(c.eval_every and e.in_training and step % c.eval_every == 0 and step < total)

    def run(self, engine, step: int, attempt: str) -> None:
        """Every rank calls it (the weights are gathered collectively)."""
        model = gather_colbert(engine, self.init_path, self.recipe, self.phase_name)
        dist.rank0_outcome(lambda: self._score(model, step, attempt),
                           f"in-training evaluation of phase {self.phase_name} at step {step}", EvalError)

    def _score(self, model, step: int, attempt: str) -> None:
        rng = capture_rng_state()
        t0 = time.perf_counter()
        e = self.phase.eval
        try:
            # Not a saved folder: the evaluator keeps these throw-away embeddings in a temp dir, not its cache.
            res = evaluate(f"{self.phase_name}@step{step}", e.in_training, model=model, batch_size=e.batch_size,
                           max_corpus=e.max_corpus, device=self.device, show_progress=False)
        finally:
            restore_rng_state(rng)
        datasets = {n: {k: v for k, v in r.items() if k != "retrieval"} for n, r in res["datasets"].items()}
        rec = {"time": now_iso(), "phase": self.phase_name, "step": step, "attempt": attempt,
               "seconds": round(time.perf_counter() - t0, 3), "average": res["average"], "datasets": datasets}
        with open(self.logs / "eval.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        ndcg = {n: r["ndcg@10"] for n, r in res["datasets"].items()}
        self.metrics.log_eval(step, ndcg, res["average"]["ndcg@10"])

        def add(p):  # a resumed attempt re-evaluates steps after its checkpoint: keep the newest per step
            p["in_training_eval"] = [x for x in p.get("in_training_eval") or [] if x["step"] != step]
            p["in_training_eval"].append({"step": step, "ndcg@10": ndcg})

        self.manifest.update_phase(self.phase_name, add)
        print(f"[colbertzero] phase {self.phase_name}: step {step} nDCG@10 "
              + ", ".join(f"{n} {100 * v:.2f}" for n, v in ndcg.items()), file=sys.stderr)
