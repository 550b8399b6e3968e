"""`colbertzero status`: where a run is, as a table for a person and JSON for a program."""

from __future__ import annotations

from .. import ledger, slurm
from ..runtime import detached_state
from .views import DASH, EvalView, check_manifest_data, fmt, num


def budget_cell(used: float, budget: float | None) -> str:
    return f"{used:.2f} / {fmt(budget)}"


def describe_accelerator(f: dict | None) -> str:
    """An attempt's `accelerator` record (train/accelerator.py) in one line: '4× NVIDIA GH200 120GB, CUDA 12.9,
    NCCL 2.26.5 over AWS Libfabric, bf16' or 'CPU (torch 2.13.0+cpu)'."""
    if not f:
        return "?"
    if not f.get("gpus"):
        parts = [f"CPU (torch {f.get('torch')})"]
    else:
        names = "/".join(f.get("gpu_names") or ["GPU"])
        parts = [f"{f['gpus']}× {names}", f"CUDA {f.get('cuda')}"]
        if f.get("nccl"):
            parts.append(f"NCCL {f['nccl']}" + (f" over {f['nccl_network']}" if f.get("nccl_network") else ""))
        if f.get("bf16"):
            parts.append("bf16")
    if f.get("ranks"):
        cpus = sorted({len(r["cpus"]) for r in f["ranks"]})
        each = str(cpus[0]) if len(cpus) == 1 else f"{cpus[0]}-{cpus[-1]}"
        threads = sorted({r["threads"] for r in f["ranks"] if "threads" in r})
        line = f"{len(f['ranks'])} rank(s) on {len({r['host'] for r in f['ranks']})} host(s), {each} CPU(s) each"
        if threads:
            line += f" ({threads[0] if len(threads) == 1 else f'{threads[0]}-{threads[-1]}'} torch thread(s))"
        parts.append(line)
    return ", ".join(parts)


HELPER_FINAL = ("done", "failed", "cancelled", "abandoned", "not started", "ended")


def helper_jobs(manifest_data: dict, live: dict[str, tuple[str, str]] | None = None) -> list[dict]:
    """The run's helper jobs — in-training evaluation jobs, eval.beir's arrays after a phase and derive (mine/score)
    arrays — with their state:
    the manifest's, refreshed by ``live`` ({handle: (Slurm state, reason)}: `live_states`) for those still open."""
    live = live or {}
    out = []
    for name, p in manifest_data["phases"].items():
        for step, rec in sorted((p.get("eval_jobs") or {}).items(), key=lambda kv: int(kv[0])):
            state, reason = rec.get("state"), rec.get("reason")
            if state in ("submitted", "running") and rec.get("handle") in live:
                slurm_state, slurm_reason = live[rec["handle"]]
                state = slurm_state.lower() if slurm_state not in ("RUNNING", "UNKNOWN") else state
                reason = slurm_reason if slurm_reason and slurm_reason != "None" else reason
            out.append({"kind": "eval", "phase": name, "step": int(step), "handle": rec.get("handle"),
                        "state": state, "reason": reason})
        beir = p.get("beir_eval") or {}
        if beir.get("state") == "failed" and not beir.get("jobs"):
            out.append({"kind": "beir", "phase": name, "step": "submit", "handle": None, "state": "failed",
                        "reason": beir.get("reason")})
        for stage, job in (beir.get("jobs") or {}).items():  # eval.beir after the phase: its arrays
            handle = f"job:{job['job']}"
            state, reason = ((beir["state"], beir.get("reason")) if beir.get("state") in ("done", "cancelled")
                             else live.get(handle, ("submitted", "")))
            out.append({"kind": "beir", "phase": name, "step": stage, "handle": handle, "state": state.lower(),
                        "reason": reason if reason and reason != "None" else None})
    for sub in manifest_data.get("submissions") or []:
        for step, job in (sub.get("jobs") or {}).items():
            if step.startswith("derive-"):
                handle = f"job:{job}"
                state, reason = live.get(handle, ("submitted", ""))
                out.append({"kind": "derive", "phase": None, "step": step.removeprefix("derive-"), "handle": handle,
                            "state": state.lower(), "reason": reason if reason and reason != "None" else None})
    return out


def open_handles(manifest_data: dict) -> list[str]:
    """Handles of the helper jobs whose state the manifest does not know to be final."""
    return [h["handle"] for h in helper_jobs(manifest_data) if h["handle"] and h["state"] not in HELPER_FINAL]


def live_states(manifest_data: dict) -> dict[str, tuple[str, str]]:
    """Slurm's view (one query for all) and the process table's of the helper jobs still open; empty where neither
    answers (another machine, no Slurm client)."""
    handles = open_handles(manifest_data)
    jobs = [h.removeprefix("job:") for h in handles if h.startswith("job:")]
    states = {f"job:{j}": st for j, st in slurm.job_states(jobs).items()}
    states.update({h: detached_state(h) for h in handles if h.startswith("pid:")})
    return states


def status_json(manifest_data: dict, live: dict[str, tuple[str, str]] | None = None) -> dict:
    """Machine-readable run status from manifest data (as ``Manifest.read()`` returns it); ``live``: Slurm's view of
    the helper jobs still open (`report.live_states`), else the manifest's alone."""
    data = check_manifest_data(manifest_data)
    phases = []
    for name, p in data["phases"].items():
        attempts = p.get("attempts") or []
        cks = p.get("checkpoints") or []
        ev = EvalView.of(p.get("eval"))
        steps = [int(c["step"]) for c in cks if num(c.get("step")) is not None]
        phases.append(
            {
                "name": name,
                "kind": p.get("kind"),
                "state": p.get("state"),
                "step": p.get("step"),
                "total_steps": p.get("total_steps"),
                "checkpoints": len(cks),
                "newest_checkpoint_step": max(steps) if steps else None,
                "export": (p.get("export") or {}).get("path"),
                "gpu_hours": ledger.record_gpu_hours(p),
                "budget_gpu_hours": ledger.phase_budget(data, name),
                "attempts": len(attempts),
                "last_attempt": attempts[-1] if attempts else None,
                "ndcg10": ev.average.get("ndcg@10") if ev else None,  # percent
                "eval_datasets": sorted(ev.datasets) if ev else [],
                "failure": p.get("failure"),
                # what the newest attempt ran on (or a refused start saw): train/accelerator.py
                "accelerator": ((attempts[-1] if attempts else {}).get("accelerator")
                                or (p.get("failure") or {}).get("accelerator")),
            }
        )
    return {
        "recipe": (data.get("recipe") or {}).get("name"),
        "recipe_hash": data.get("recipe_hash"),
        "created": data.get("created"),
        "updated": data.get("updated"),
        "gpu_hours": sum(ph["gpu_hours"] for ph in phases),
        "budget_gpu_hours": ledger.run_budget(data),
        "phases": phases,
        "helpers": helper_jobs(data, live),
    }


def status_table(manifest_data: dict, live: dict[str, tuple[str, str]] | None = None) -> str:
    """The run's status for a person: one line per phase, totals, helper jobs, then failures."""
    s = status_json(manifest_data, live)
    header = ["phase", "kind", "state", "steps", "checkpoints", "GPU-h used / budget", "attempts", "nDCG@10"]
    rows = []
    for ph in s["phases"]:
        total = ph["total_steps"]
        steps = f"{ph['step'] or 0}/{total if total is not None else DASH}"
        ck = DASH if not ph["checkpoints"] else f"{ph['checkpoints']} (newest {ph['newest_checkpoint_step']})"
        la = ph["last_attempt"]
        attempts = DASH if not ph["attempts"] else f"{ph['attempts']} (last: {(la or {}).get('exit_state') or '?'})"
        rows.append(
            [
                ph["name"],
                ph["kind"] or DASH,
                ph["state"] or DASH,
                steps,
                ck,
                budget_cell(ph["gpu_hours"], ph["budget_gpu_hours"]),
                attempts,
                fmt(ph["ndcg10"]),
            ]
        )
    total_attempts = sum(ph["attempts"] for ph in s["phases"])
    rows.append(["total", "", "", "", "", budget_cell(s["gpu_hours"], s["budget_gpu_hours"]), str(total_attempts), ""])
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]

    def line(r):
        return "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()

    out = [
        f"run: {s['recipe'] or '?'}  (recipe {str(s['recipe_hash'] or '?')[:12]}, updated {s['updated'] or '?'})",
        line(header),
        line(["-" * w for w in widths]),
    ]
    out += [line(r) for r in rows[:-1]]
    out += [line(["-" * w for w in widths]), line(rows[-1])]
    if s["helpers"]:
        out.append("helper jobs:")
        for h in s["helpers"]:
            what = {"eval": f"eval {h['phase']} step {h['step']}", "beir": f"eval.beir {h['phase']} {h['step']}"
                    }.get(h["kind"], f"derive {h['step']}")
            out.append(f"  {what:<32} {h['handle'] or DASH:<14} {h['state'] or DASH}"
                       + (f" ({h['reason']})" if h["reason"] else ""))
    ran_on = [(ph["name"], describe_accelerator(ph["accelerator"])) for ph in s["phases"] if ph["accelerator"]]
    if ran_on:
        out.append("ran on:")
        out += [f"  {name:<14} {what}" for name, what in ran_on]
    for ph in s["phases"]:
        f = ph["failure"]
        if f:
            out.append(
                f"! {ph['name']}: {ph['state']} at step {f.get('step', '?')}"
                + (f" (source {f['source']})" if f.get("source") else "")
                + f": {f.get('reason', '?')}"
            )
        if ph["state"] == "over-budget":
            out.append(
                f"! {ph['name']}: over budget ({ph['gpu_hours']:.2f} of {fmt(ph['budget_gpu_hours'])} GPU-h); "
                f"raise it to continue"
            )
    return "\n".join(out)
