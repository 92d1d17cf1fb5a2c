"""What the worker shows about itself beyond the counters in metrics.py: the /metrics, /health and
/ready pages on PQL_WEB_PORT, the Faust tier's consumer lag, and rebalance and table recovery time."""
from __future__ import annotations

import asyncio
import logging
import time

from streams.worker import metrics

log = logging.getLogger("pql.worker")
STALL = 30.0  # seconds a partition may have lag without progress before the worker says so
TICK_STALL = 30.0  # seconds a tick may run before the worker says where it waits (and /ready says 503)


class Monitor:
    def __init__(self, app, sources: tuple[str, ...], rules_version: str, processed: dict[int, int]):
        """`sources`: the topics whose lag is reported (the first is <app>-accounts, whose position is
        `processed`, where `detect` is)."""
        self.app, self.sources, self.rules_version, self.processed = app, sources, rules_version, processed
        self.rebalance_started = time.perf_counter()
        self.progress = Unmoved()  # tp -> position, for partitions with lag
        self.tick_warned = 0.0  # monotonic time of the last "the tick has run for" warning

    def install(self) -> None:
        app = self.app
        app.page("/metrics")(metrics_page)
        app.page("/health")(health_page)
        app.page("/ready")(ready_page)
        app.pql_rules_version = self.rules_version
        app.timer(5.0, name="pql.lag")(self.lag)
        app.on_partitions_assigned.connect(self.on_assigned)
        app.on_rebalance_complete.connect(self.on_recovered)

    async def on_assigned(self, sender, assigned, **kwargs) -> None:
        metrics.rebalances.inc()
        self.rebalance_started = time.perf_counter()

    async def on_recovered(self, sender, **kwargs) -> None:
        metrics.table_recovery.set(time.perf_counter() - self.rebalance_started)

    async def lag(self) -> None:
        """pql_consumer_lag for the Faust tier: end offset minus what was processed.

        For envelopes, "processed" is the offset after the last one `detect` published (the fetch
        position runs ahead of processing and would hide a backlog); for crm.lifecycle, the position.
        """
        self.tick_stalled()
        consumer = self.app.consumer
        for tp in consumer.assignment():
            if tp.topic not in self.sources:
                continue
            try:
                position = self.processed.get(tp.partition) if tp.topic == self.sources[0] else None
                position = position or await consumer.position(tp)
                end = consumer.highwater(tp)
            except Exception:  # partition moving away mid-read
                continue
            if position is not None and end is not None:
                metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(max(0, end - position))
                await self.stalled(tp, position, end)

    def tick_stalled(self) -> None:
        """The tick carries the progress reports: while one hangs, every decision waits and nothing
        else says so. Past TICK_STALL, a warning every TICK_STALL with where our tasks wait."""
        progress = getattr(self.app, "pql_progress", None)
        now = time.monotonic()
        running = progress.running(now) if progress is not None else 0.0
        if running >= TICK_STALL and now - self.tick_warned >= TICK_STALL:
            self.tick_warned = now
            log.warning("the tick has run for %.0f s (progress reports wait for it, and every decision with "
                        "them); where our tasks wait: %s", running, waits(app=self.app))

    async def stalled(self, tp, position: int, end: int) -> None:
        """Say so when a partition with lag has not moved for STALL seconds (with what Faust thinks
        of it: a stalled partition is a bug to report)."""
        now = time.monotonic()
        still = self.progress.seconds(tp, position, now, moving=end <= position or self.app.rebalancing)
        if still >= STALL:
            c = self.app.consumer
            log.warning("partition %s[%d] has not moved for %.0f s: at %d of %d; fetch position %s, Faust: "
                        "active %s, paused %s, buffered %s, read offset %s", tp.topic, tp.partition, still,
                        position, end, await c.position(tp), tp in (getattr(c, "_active_partitions", None) or ()),
                        tp in getattr(c, "_paused_partitions", ()), tp in getattr(c, "_buffered_partitions", ()),
                        getattr(c, "_read_offset", {}).get(tp))
            log.warning("where our tasks wait: %s", waits(app=self.app))
            self.progress.again(tp, now)


class Unmoved:
    """How long each key's value has stayed the same (the stall checks of the worker's tiers)."""

    def __init__(self):
        self.since: dict = {}  # key -> (value, since when)

    def seconds(self, key, value, now: float, moving: bool = False) -> float:
        """Since when `value` has not changed (0 when it just did, or when `moving`: nothing waits)."""
        seen = self.since.get(key)
        if moving or seen is None or seen[0] != value:
            self.since[key] = (value, now)
            return 0
        return now - seen[1]

    def again(self, key, now: float) -> None:
        """Count from `now` (after a warning: the next one comes a whole period later)."""
        self.since[key] = (self.since[key][0], now)


def waits(ours: str = "/streams/", app=None) -> str:
    """Each task running our code, with the innermost frames it is suspended in (a stall's cause).
    Faust runs an agent's coroutine behind an awaitable wrapper the chain of frames cannot cross: with
    `app`, the agents' coroutines are walked from their start."""
    roots = [(task.get_name(), task.get_coro()) for task in asyncio.all_tasks()]
    for agent in (app.agents.values() if app is not None else ()):
        roots += [(f"agent {agent.name}", getattr(actor, "it", None)) for actor in getattr(agent, "_actors", ())]
    found = []
    for name, awaited in roots:
        frames = []
        while awaited is not None and len(frames) < 60:
            frame = next((getattr(awaited, a) for a in ("cr_frame", "gi_frame", "ag_frame") if getattr(awaited, a, None)), None)
            if frame is None:
                break
            frames.append(frame)
            awaited = next((getattr(awaited, a) for a in ("cr_await", "gi_yieldfrom", "ag_await") if getattr(awaited, a, None)), None)
        if any(ours in f.f_code.co_filename for f in frames):
            inner = " > ".join(f"{f.f_code.co_filename.rsplit('/', 2)[-1]}:{f.f_lineno} {f.f_code.co_name}"
                               for f in frames[-6:])
            found.append(f"[{name}] {inner} > {type(awaited).__name__}")
    return "; ".join(found) or "none"


async def metrics_page(web, request):
    return web.bytes(metrics.render(), content_type="text/plain; version=0.0.4")


def ready(app) -> bool:
    """Partitions assigned, their tables recovered, the ingest tier polling and the tick not hung: the
    worker is processing."""
    feed, progress = getattr(app, "pql_feed", None), getattr(app, "pql_progress", None)
    return (bool(app.consumer.assignment()) and not app.rebalancing and app.tables.recovery.completed.is_set()
            and (feed is None or feed.alive())
            and (progress is None or progress.running(time.monotonic()) < TICK_STALL))


async def health_page(web, request):
    """Alive (for a liveness probe): always 200 while the web server runs."""
    return web.json({"status": "ok", "ready": ready(web.app), "rules_version": web.app.pql_rules_version})


async def ready_page(web, request):
    """For a readiness probe: 200 once processing, 503 while starting or rebalancing."""
    ok = ready(web.app)
    return web.json({"ready": ok}, status=200 if ok else 503)
