"""Where things live inside a run dir: the one place its paths are made (docs/CONTRACTS.md lists them).

    RUN_DIR/
      manifest.json, recipe.yaml, launch.lock, local-chain.lock, eval-init.json, runs-init/ (its TREC runs)
      logs/local-chain.log          the local executor's chain (its own and its ranks' output)
      slurm/<step>/                 submitit's folder of a job (scripts, logs, results); slurm/ holds the logs of
                                    `colbertzero sbatch`'s scripts, sbatch/ the scripts
      report/                       `colbertzero report`'s default output
      phases/<phase>/
        checkpoints/step-XXXXXXXX/  evals/step-XXXXXXXX/  export/  beir/  runs/  eval.json  hangs/
        logs/train.jsonl  logs/eval.jsonl  logs/tensorboard/

Nothing else joins "phases" to a run dir or formats a step's folder name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def step_name(step: int) -> str:
    """A step's folder name: sorts in step order."""
    return f"step-{int(step):08d}"


def step_of(name: str) -> int | None:
    """The step a folder named by `step_name` holds; None for any other name."""
    head, _, digits = name.partition("-")
    return int(digits) if head == "step" and len(digits) == 8 and digits.isdigit() else None


@dataclass(frozen=True)
class PhaseLayout:
    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / step_name(step)

    @property
    def export(self) -> Path:
        return self.root / "export"

    @property
    def runs(self) -> Path:
        """TREC run files of the end-of-phase evaluation."""
        return self.root / "runs"

    @property
    def beir(self) -> Path:
        """The evaluation of the export on eval.beir (`colbertzero beir`'s folder: embeddings, top-k, runs)."""
        return self.root / "beir"

    @property
    def eval_json(self) -> Path:
        return self.root / "eval.json"

    @property
    def evals(self) -> Path:
        return self.root / "evals"

    def eval_dir(self, step: int) -> Path:
        """An in-training evaluation job's folder: the weights it scores, its log."""
        return self.evals / step_name(step)

    @property
    def hangs(self) -> Path:
        return self.root / "hangs"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def nccl_logs(self) -> Path:
        """NCCL's init logs, one per rank process (host.pid.log): the network NCCL chose is read from them."""
        return self.logs / "nccl"

    @property
    def train_log(self) -> Path:
        return self.logs / "train.jsonl"

    @property
    def eval_log(self) -> Path:
        return self.logs / "eval.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.logs / "tensorboard"


@dataclass(frozen=True)
class RunLayout:
    root: Path

    @classmethod
    def of(cls, run_dir: str | os.PathLike) -> "RunLayout":
        return cls(Path(run_dir).resolve())

    def phase(self, name: str) -> PhaseLayout:
        return PhaseLayout(self.root / "phases" / name)

    def resolve(self, relative: str) -> Path:
        """A path the manifest records (relative to the run dir, so a run dir can move)."""
        return self.root / relative

    def relative(self, path: str | os.PathLike) -> str:
        return os.path.relpath(Path(path).resolve(), self.root)

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def recipe_file(self) -> Path:
        return self.root / "recipe.yaml"

    @property
    def launch_lock(self) -> Path:
        """Held by a launch or resume while it submits."""
        return self.root / "launch.lock"

    @property
    def chain_lock(self) -> Path:
        """Held by the local executor's chain process for as long as it runs."""
        return self.root / "local-chain.lock"

    @property
    def chain_log(self) -> Path:
        return self.root / "logs" / "local-chain.log"

    @property
    def slurm_logs(self) -> Path:
        return self.root / "slurm"

    def slurm(self, step: str) -> Path:
        """submitit's folder for one step's job."""
        return self.slurm_logs / step

    @property
    def sbatch(self) -> Path:
        return self.root / "sbatch"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def eval_init(self) -> Path:
        """The evaluation of the model the first phase starts from (demo, quality benchmark)."""
        return self.root / "eval-init.json"

    @property
    def init_runs(self) -> Path:
        """TREC run files of that evaluation (per-query comparisons against the phases' `runs/`)."""
        return self.root / "runs-init"
