"""`make bench`: every benchmark, one after the other, with the machine they ran on."""
from __future__ import annotations

import os
import platform
import sys

from benchmarks import backlog, backtest_bench, bootstrap_bench, disorder, replay_bench, scaling, stream_bench


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    mem = next((int(ln.split()[1]) // 1024 // 1024 for ln in open("/proc/meminfo") if ln.startswith("MemTotal")), 0)
    return f"{cpu}, {os.cpu_count()} cores, {mem} GiB, Python {platform.python_version()}"


def main() -> None:
    print(f"machine: {machine()}")
    sys.argv = [sys.argv[0]]
    print("\n## replay vs json.loads (detection engine)")
    replay_bench.main()
    print("\n## pql backtest: two rules files over 1M events")
    backtest_bench.main()
    print("\n## bounded disorder: replay of a file and of its lines moved (event-time correctness)")
    disorder.main()
    print("\n## streaming: raw client vs naive Faust vs pql worker, and latency (needs `make stack`)")
    stream_bench.main()
    print("\n## backlog: eight weeks on the topic before the worker starts, time order and sorted by account")
    backlog.main()
    print("\n## scaling: one worker at 4 to 256 partitions, and one vs two workers at 64")
    scaling.main()
    print("\n## pql bootstrap: 1M history events sorted by account, beside pql replay")
    bootstrap_bench.main()


if __name__ == "__main__":
    main()
