"""What the chaos and hostile-input runs expect: `pql replay` of the same input."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from benchmarks.chaos.faults import ROOT
from detectors.timefmt import parse_ms


def pql(*args: str) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "streams.tools.cli", *args], cwd=ROOT, capture_output=True,
                         text=True, timeout=900)
    if out.returncode:
        raise RuntimeError(f"pql {' '.join(args)}: {out.stderr[-2000:]}")
    return out


def replay(events: Path, rules: Path, *extra: str, save: Path | None = None) -> tuple[dict[str, tuple[str, float, str]], str]:
    """id -> (type, event time in seconds, account) of every CloudEvent replay prints, and its summary."""
    out = pql("replay", str(events), "--rules", str(rules), "--milestones", "--stages", *extra)
    if save is not None:
        save.write_text(out.stdout)
    docs = [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]
    return {d["id"]: (d["type"], parse_ms(d["time"]) / 1000, d.get("subject", "")) for d in docs}, out.stderr


def summary_count(summary: str, label: str, pattern: str) -> int:
    m = re.search(rf"^{label}:\s+{pattern}", summary, re.M)
    return int(m.group(1).replace(",", "")) if m else 0
