"""`colbertzero status`: where a run is, as a table for a person and JSON for a program."""

from __future__ import annotations

from .. import ledger
from .views import DASH, EvalView, check_manifest_data, fmt, num


def budget_cell(used: float, budget: float | None) -> str:
    return f"{used:.2f} / {fmt(budget)}"


def status_json(manifest_data: dict) -> dict:
    """Machine-readable run status from manifest data (as ``Manifest.read()`` returns it)."""
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
    }


def status_table(manifest_data: dict) -> str:
    """The run's status for a person: one line per phase, totals, then failures."""
    s = status_json(manifest_data)
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
