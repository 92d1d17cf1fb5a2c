"""The ingest tier in a process of its own (`PQL_INGEST_PROCESS=true`).

The Faust tier and the ingest tier share one Python process by default, so they share one core
(the GIL): under a backlog the worker runs at 100 % of a core while the machine's other core idles
(benchmarks/RESULTS.md). With this setting the worker starts the ingest loop (streams/worker/ingest.py,
unchanged: same consumer group, same envelopes, same guarantees) in a child process and talks to it
through three channels:

- `published`: where this worker's `detect` is on each <app>-accounts partition it owns (-1 for the
  others), which the child's batching reads (`Ingest.detect_busy`), refreshed every few ms;
- `ticks`: the worker's tick (the partitions to tick, wall clock ms): the child writes its progress
  report (`Ingest.report`) to `<app>-progress`, then the tick lines (`Ingest.tick`);
- `counts`: the child's ingest metrics, sent as increments (gauges as values) every second and
  applied to the worker's own, so /metrics looks the same either way.

The child dies with the worker (PR_SET_PDEATHSIG, and it checks its parent); the worker crashes
when the child exits (a supervisor restarts both), as it does when the in-process loop fails.
"""
from __future__ import annotations

import asyncio
import ctypes
import logging
import multiprocessing as mp
import os
import queue
import signal
import sys
import threading
from typing import Callable

from streams.topics import Topics
from streams.worker import metrics

log = logging.getLogger("pql.ingest")
REFRESH = 0.005  # s between copies of where `detect` is
RELAYED = {"events_consumed": metrics.events_consumed, "events_invalid": metrics.events_invalid,
           "events_unattributed": metrics.events_unattributed,
           "events_clock_corrected": metrics.events_clock_corrected, "rebalances": metrics.rebalances,
           "clients_recreated": metrics.clients_recreated,
           "consumer_lag": metrics.consumer_lag}


def readings() -> dict[tuple[str, tuple], float]:
    """The relayed metrics' current samples: (attribute, labels) -> value (counters: their total)."""
    out = {}
    for attr, metric in RELAYED.items():
        for family in metric.collect():
            for s in family.samples:
                if s.name.endswith("_created"):
                    continue
                out[(attr, tuple(sorted(s.labels.items())))] = s.value
    return out


def changes(before: dict, now: dict) -> list[tuple[str, tuple, float]]:
    """What to send: counter increments since `before`, gauge values that changed."""
    out = []
    for key, value in now.items():
        attr, labels = key
        gauge = RELAYED[attr]._type == "gauge"
        if gauge and before.get(key) != value:
            out.append((attr, labels, value))
        elif not gauge and value != before.get(key, 0.0):
            out.append((attr, labels, value - before.get(key, 0.0)))
    return out


def apply(changed: list[tuple[str, tuple, float]]) -> None:
    """The child's changes on this process's metrics."""
    for attr, labels, value in changed:
        metric = RELAYED[attr]
        m = metric.labels(**dict(labels)) if labels else metric
        if metric._type == "gauge":
            m.set(value)
        else:
            m.inc(value)


class Remote:
    """Stands in for the `Ingest` loop in the worker's process (streams/worker/progress.py)."""

    def __init__(self, ticks):
        self.ticks = ticks

    def report(self, ms: int) -> None:
        """The child reports at each tick itself, through `<app>-progress` only."""
        return None

    def tick(self, partitions: list[int], ms: int) -> None:
        self.ticks.put((partitions, ms))


class Task:
    """The worker's ingest task when the ingest tier runs in its own process."""

    def __init__(self, settings, rules, topics: Topics, unpublished: Callable[[], dict[int, int]]):
        self.settings, self.rules, self.topics, self.unpublished = settings, rules, topics, unpublished
        self.loop: Remote | None = None
        self.proc = None

    def alive(self) -> bool:
        """The ingest process runs (for /ready)."""
        return self.proc is not None and self.proc.is_alive()

    async def run(self) -> None:
        ctx = mp.get_context("spawn")  # (a fork would copy the Faust process, its threads and sockets)
        n = self.settings.partitions
        published = ctx.Array("q", [-1] * n, lock=False)
        ticks, counts = ctx.Queue(), ctx.Queue()
        proc = ctx.Process(target=child, args=(self.settings, self.rules, published, ticks, counts, os.getpid()),
                           name="pql-ingest", daemon=True)
        proc.start()
        self.proc = proc
        self.loop = Remote(ticks)
        try:
            while proc.is_alive():
                where = self.unpublished()
                for p in range(n):
                    published[p] = where.get(p, -1)
                try:
                    while True:
                        apply(counts.get_nowait())
                except queue.Empty:
                    pass
                await asyncio.sleep(REFRESH)
            raise RuntimeError(f"the ingest process exited ({proc.exitcode})")
        finally:
            if proc.is_alive():
                proc.terminate()
                proc.join(5)


def child(settings, rules, published, ticks, counts, parent: int) -> None:
    """The ingest process: the same loop as in-process, fed through the shared channels."""
    _die_with(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the worker stops us
    logging.basicConfig(level=logging.WARNING if settings.log_level == "warn" else settings.log_level.upper())
    from detectors.engine import Engine
    from streams.config import alert_max_age_ms
    from streams.worker import ingest

    engine = Engine(rules, alert_max_age_ms(settings.alert_max_age))
    loop = ingest.make(settings, engine, Topics.of(settings),
                       lambda: {p: v for p, v in enumerate(published) if v >= 0})

    async def main() -> None:
        aio = asyncio.get_running_loop()

        def tick(partitions: list[int], ms: int) -> None:
            loop.report(ms)
            loop.tick(partitions, ms)

        def take_ticks() -> None:  # blocks on the queue in a thread; each tick runs on the loop
            while True:
                args = ticks.get()
                aio.call_soon_threadsafe(tick, *args)

        threading.Thread(target=take_ticks, name="pql-ingest-ticks", daemon=True).start()
        aio.add_signal_handler(signal.SIGTERM, lambda: setattr(loop, "running", False))  # close, leave the group
        run = asyncio.ensure_future(loop.run())
        sent: dict = {}
        while not run.done():
            now = readings()
            if changed := changes(sent, now):
                counts.put(changed)
            sent = now
            if os.getppid() != parent:
                os._exit(1)
            await asyncio.wait([run], timeout=1.0)
        run.result()

    try:
        asyncio.run(main())
    except ingest.FatalClientError as err:  # the worker sees us exit and stops too (Task.run)
        logging.getLogger("pql.ingest").critical("%s; the ingest process exits (1)", err)
        sys.exit(1)


def _die_with(parent: int) -> None:
    """SIGKILL this process when the worker dies (Linux), and stop now if it already has."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        log.warning("PR_SET_PDEATHSIG unavailable: the ingest process checks for its parent every second")
    if os.getppid() != parent:
        os._exit(1)
