"""`pip check`, allowing exactly the requirements requirements-nodeps.txt leaves out on purpose.

    python3 tools/pip_check.py        # exit 0: nothing broken but the named exceptions; 1: anything else, printed

A package installed with --no-deps (PyLate) still declares the requirements it was installed without; pip check reports
them on every machine. Those named after `# skips:` in requirements-nodeps.txt are expected and reported in one note;
any other line of pip check — a missing requirement, a version conflict, a requirement of another package — fails.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

NODEPS = Path(__file__).resolve().parents[1] / "requirements-nodeps.txt"
MISSING = re.compile(r"^(\S+) \S+ requires (\S+?)(?:[<>=!~;\[].*)?, which is not installed\.$")


def allowed(path: Path = NODEPS) -> dict[str, set[str]]:
    """{package installed with --no-deps: the requirements it skips}."""
    out = {}
    for line in path.read_text().splitlines():
        req, _, comment = line.partition("#")
        if req.strip():
            skips = comment.split("skips:", 1)[1] if "skips:" in comment else ""
            out[canonicalize_name(Requirement(req).name)] = {canonicalize_name(s.strip()) for s in skips.split(",")
                                                              if s.strip()}
    return out


def judge(lines: list[str], skips: dict[str, set[str]]) -> tuple[list[str], list[str]]:
    """(expected lines, every other line) of pip check's report."""
    expected, other = [], []
    for line in lines:
        m = MISSING.match(line)
        ok = m and canonicalize_name(m.group(2)) in skips.get(canonicalize_name(m.group(1)), set())
        (expected if ok else other).append(line)
    return expected, other


def main() -> int:
    r = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    lines = [x.strip() for x in r.stdout.splitlines() if x.strip() and x.strip() != "No broken requirements found."]
    expected, other = judge(lines, allowed())
    if other or (r.returncode != 0 and not lines):
        print("[pip check] broken requirements:\n  " + "\n  ".join(other or [r.stderr.strip()]), file=sys.stderr)
        return 1
    if expected:
        names = sorted({m.group(2) for x in expected if (m := MISSING.match(x))})
        print(f"[pip check] ok: only the requirements left out on purpose are missing ({', '.join(names)}; "
              "see requirements-nodeps.txt)")
    else:
        print("[pip check] ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
