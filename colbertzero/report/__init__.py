"""Reports from run dirs: what trained, how fast, what it cost and how well it retrieves, beside the paper's numbers.

Reads only each run's manifest (ledger, checkpoints, eval) and its phases' logs; writes ``report.md``,
``report.json`` and PNG figures (`build`). `status` is the one-run table/JSON; `views` reads run dirs; `results`
makes the paper-shaped table; `figures` the PNGs.
"""

from .build import build_report
from .status import helper_jobs, live_states, status_json, status_table
from .views import ReportError, load_run, read_run_manifest

__all__ = ["ReportError", "build_report", "helper_jobs", "live_states", "load_run", "read_run_manifest", "status_json",
           "status_table"]
