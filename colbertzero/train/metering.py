"""Metering of a phase run: model FLOPs and MFU, throughput, and the one record each log step feeds every sink.

`Metrics` owns the logging cadence (`should_log`) and the throughput window between two logs; `log` makes one record
(docs/CONTRACTS.md, `phases/<phase>/logs/train.jsonl`) and hands the same record to every sink: the JSONL file
always, TensorBoard and Weights & Biases when the recipe's `report_to` lists them and the package is installed.
W&B runs are grouped by run dir and named by phase, with an id derived from both, so every attempt of a phase
(requeues, resumes) appends to the same W&B run.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch

from ..files import now_iso
from ..layout import PhaseLayout, RunLayout
from .losses import loss_for

# bf16 dense tensor-core peaks (FLOP/s, no sparsity) by device name, first match wins: more specific names first.
BF16_PEAK_FLOPS = (
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
)
def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Peak FLOP/s of one device for the compute dtype, or None where no honest figure exists: a CPU (its peak
    depends on cores, clocks and vector units, none of which torch reports) or a GPU not in BF16_PEAK_FLOPS or not
    computing in bf16 (fp32 peaks hinge on TF32 settings)."""
    if device.type != "cuda" or dtype != torch.bfloat16:
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK_FLOPS if key in name), None)


class FlopCounter:
    """Model FLOPs of one optimizer step: what the step must compute, not what the kernels happen to do.

    Encoder, per forward: 2·N per processed token (N = parameters outside embedding tables, which are lookups) plus
    attention, 4·hidden·(output position, attended key) pairs per layer and sequence; on ModernBERT's
    sliding-window layers a position attends to the keys within `sliding_window` of it (counted exactly, edges
    included). Processed tokens are the real ones, and every query position when queries
    are expanded ([MASK] positions are scored). Training costs 3 forwards (backward = 2), 4 with GradCache (its
    extra no-grad forward); distillation's micro-batches recompute nothing.
    MaxSim: 2·dim per (query token, document token) pair scored, ×3 for forward and backward. Contrastive scores
    every query of an accumulation group against every document of the group (gathered: over all ranks);
    distillation scores each query against its own documents. Real document tokens (skiplist tokens included).
    `local(batch)` is this rank's part as a vector; summed over ranks, `total(summed)` is the step's FLOPs.
    """

    def __init__(self, colbert, phase, world_size: int) -> None:
        loss = loss_for(phase.kind)
        self.contrastive = loss.in_batch_negatives
        self.passes = 4 if (self.contrastive and phase.gradcache_mini_batch is not None) else 3
        self.gather = self.contrastive and phase.gather_across_ranks and world_size > 1
        self.groups = phase.gradient_accumulation
        self.expand = bool(colbert.do_query_expansion)
        size = lambda p: int(getattr(p, "ds_numel", p.numel()))  # noqa: E731 - ZeRO-3 partitions keep the full size
        embedded = {id(m.weight) for m in colbert.modules() if isinstance(m, torch.nn.Embedding)}
        self.n_params = sum(size(p) for p in colbert.parameters() if id(p) not in embedded)
        cfg = colbert[0].auto_model.config
        self.hidden = int(cfg.hidden_size)
        layers = int(cfg.num_hidden_layers)
        types = getattr(cfg, "layer_types", None) or ["full_attention"] * layers
        half = getattr(cfg, "sliding_window", None)
        self.windows = [None if t == "full_attention" or not half else int(half) for t in types]
        self.dim = int(colbert[-1].out_features)

    @staticmethod
    def _pairs(outputs: torch.Tensor, keys: torch.Tensor, half: int | None) -> float:
        """(output position, attended key) pairs of sequences whose first `keys` tokens are attended; with a sliding
        window, position i attends to the keys j with |i - j| <= half."""
        o, k = outputs.long(), keys.long()
        if half is None:
            return float((o.double() * k.double()).sum())
        i = torch.arange(int(o.max()) if len(o) else 0)[None, :]
        hi = torch.minimum(k[:, None] - 1, i + half)
        lo = torch.clamp(i - half, min=0)
        counts = (hi - lo + 1).clamp(min=0) * (i < o[:, None])
        return float(counts.sum())

    def _encoder(self, outputs: torch.Tensor, keys: torch.Tensor) -> float:
        """Forward FLOPs of sequences with `outputs` processed positions and `keys` attended tokens each."""
        attention = sum(self._pairs(outputs, keys, w) for w in self.windows)
        return 2.0 * self.n_params * float(outputs.double().sum()) + 4.0 * self.hidden * attention

    def local(self, batch) -> torch.Tensor:
        q_mask, d_mask = batch.queries["attention_mask"], batch.documents["attention_mask"]
        q_keys, d_tok = q_mask.sum(1), d_mask.sum(1)
        q_out = torch.full_like(q_keys, q_mask.shape[1]) if self.expand else q_keys
        encoder = self.passes * (self._encoder(q_out, q_keys) + self._encoder(d_tok, d_tok))
        n = q_out.shape[0]
        per_query_docs = d_tok.view(n, -1).sum(1).double()  # row-major: query i owns n_docs consecutive documents
        q_groups = q_out.double().view(self.groups, -1).sum(1)
        d_groups = per_query_docs.view(self.groups, -1).sum(1)
        if not self.contrastive:
            maxsim = float((q_out.double() * per_query_docs).sum())
        elif self.gather:
            maxsim = 0.0  # needs every rank's tokens: see total()
        else:
            maxsim = float((q_groups * d_groups).sum())
        head = torch.tensor([encoder, 3 * 2.0 * self.dim * maxsim], dtype=torch.float64)
        return torch.cat([head, q_groups, d_groups])

    def total(self, summed: torch.Tensor) -> float:
        flops = float(summed[0] + summed[1])
        if self.gather:
            q, d = summed[2 : 2 + self.groups], summed[2 + self.groups :]
            flops += 3 * 2.0 * self.dim * float((q * d).sum())
        return flops


class _Window:
    """Sums over the steps since the last log: training time only (saves, logs and evaluations excluded)."""

    def __init__(self) -> None:
        self.steps, self.seconds, self.samples, self.tokens, self.flops = 0, 0.0, 0, 0, 0.0

    def add(self, seconds: float, samples: int, tokens: int, flops: float) -> None:
        self.steps += 1
        self.seconds += seconds
        self.samples += samples
        self.tokens += tokens
        self.flops += flops


class _TensorBoard:
    def __init__(self, folder: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter  # optional package: imported only when asked for

        self.writer = SummaryWriter(str(folder))

    def scalars(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, log_dir: Path, run_dir: Path, phase: str, config: dict) -> None:
        import wandb  # optional package: imported only when asked for

        run_id = hashlib.sha256(f"{run_dir}:{phase}".encode()).hexdigest()[:16]
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "colbertzero"), group=run_dir.name,
                              name=phase, id=run_id, resume="allow", dir=str(log_dir), config=config,
                              settings=wandb.Settings(silent=True))

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


def _sinks(report_to: list[str], logs: PhaseLayout, run_dir: Path, phase: str, config: dict) -> list:
    sinks = []
    for name, make, extra in (("tensorboard", lambda: _TensorBoard(logs.tensorboard), "pip install '.[tensorboard]'"),
                              ("wandb", lambda: _WandB(logs.logs, run_dir, phase, config), "pip install '.[wandb]'")):
        if name not in report_to:
            continue
        try:
            sinks.append(make())
        except ImportError:
            print(f"[colbertzero] report_to lists {name}, which is not installed here; its metrics are skipped "
                  f"({extra})", file=sys.stderr)
    return sinks


def eval_sinks(report_to: list[str], logs: PhaseLayout) -> list:
    """What an evaluation job writes to: TensorBoard (another event file in the same folder, merged by TensorBoard
    on read). Not W&B: its run has one writer, the training process."""
    return _sinks([r for r in report_to if r == "tensorboard"], logs, logs.logs, "", {})


class Metrics:
    """Throughput, FLOPs and the log records of one phase run. Every rank counts; rank 0 (``write``) writes."""

    SCALARS = ("loss", "lr", "temperature", "grad_norm", "samples_per_s", "tokens_per_s", "mfu", "tflops")

    def __init__(self, *, phase_name: str, run_dir: Path, total: int, log_every: int, world_size: int,
                 peak: float | None, write: bool, report_to: list[str], config: dict,
                 max_grad_norm: float | None = None) -> None:
        self.phase_name, self.total, self.log_every = phase_name, total, log_every
        self.max_grad_norm = max_grad_norm
        self.world_size, self.peak, self.write = world_size, peak, write
        self.layout = RunLayout.of(run_dir).phase(phase_name)
        self.window = _Window()
        self.last: dict | None = None  # the newest record (what the ledger's throughput reads)
        self.sinks = []
        if write:
            self.layout.logs.mkdir(parents=True, exist_ok=True)
            self.sinks = _sinks(report_to, self.layout, Path(run_dir), phase_name, config)

    def count(self, seconds: float, samples: int, tokens: int, flops: float) -> None:
        self.window.add(seconds, samples, tokens, flops)

    def should_log(self, step: int) -> bool:
        return step % self.log_every == 0 or step == self.total

    def log(self, step: int, res, *, source: str | None, consumed: dict, attempt: str) -> dict:
        """The record of this log step, written to every sink; the window starts again."""
        w = self.window
        rate = (lambda x: x / w.seconds) if w.seconds > 0 else (lambda x: None)
        flops_per_s = rate(w.flops)
        rec = {
            "time": now_iso(), "phase": self.phase_name, "step": step, "total_steps": self.total,
            "loss": res.loss, "lr": res.lr, "temperature": res.temperature, "grad_norm": res.grad_norm,
            # the norm is the pre-clip one: did clipping rescale this step's update?
            "clipped": (res.grad_norm > self.max_grad_norm) if self.max_grad_norm and res.grad_norm is not None
            else None,
            "samples_per_s": rate(w.samples), "tokens_per_s": rate(w.tokens),
            # MFU only against a known device peak (peak_flops); on CPU it is null and the achieved model TFLOP/s
            # (all ranks together) is still logged.
            "mfu": flops_per_s / (self.peak * self.world_size) if flops_per_s is not None and self.peak else None,
            "tflops": flops_per_s / 1e12 if flops_per_s is not None else None,
            "source": source, "consumed": consumed, "attempt": attempt,
            "seconds_per_step": w.seconds / w.steps if w.steps else None,
        }
        self.window = _Window()
        self.last = rec
        if self.write:
            with open(self.layout.train_log, "a") as f:
                f.write(json.dumps(rec) + "\n")
            scalars = {f"train/{k}": rec[k] for k in self.SCALARS if rec[k] is not None}
            scalars.update({f"consumed/{src}": rows for src, rows in consumed.items()})
            for sink in self.sinks:
                sink.scalars(scalars, step)
        return rec

    def throughput(self) -> dict | None:
        """What projections read: the newest record's rates."""
        rec = self.last
        if rec is None:
            return None
        return {"samples_per_s": rec["samples_per_s"], "seconds_per_step": rec["seconds_per_step"],
                "tflops": rec["tflops"], "mfu": rec["mfu"], "measured_at_step": rec["step"]}

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []
