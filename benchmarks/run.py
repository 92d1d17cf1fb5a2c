"""`make bench`: every benchmark, one after the other, with the machine they ran on."""
from __future__ import annotations

import os
import platform
import sys

from benchmarks import replay_bench


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    mem = next((int(ln.split()[1]) // 1024 // 1024 for ln in open("/proc/meminfo") if ln.startswith("MemTotal")), 0)
    return f"{cpu}, {os.cpu_count()} cores, {mem} GiB, Python {platform.python_version()}"


def main() -> None:
    print(f"machine: {machine()}")
    print("\n## replay vs json.loads (issue: detection engine)")
    sys.argv = [sys.argv[0]]
    replay_bench.main()


if __name__ == "__main__":
    main()
