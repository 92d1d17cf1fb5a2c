"""The stall report: where each task running our code is suspended."""
import asyncio

from streams.worker import monitor


def test_waits_names_the_innermost_frames_a_task_is_suspended_in():
    async def publish():
        await asyncio.Event().wait()  # a send that never completes

    async def envelope():
        await publish()

    async def main():
        task = asyncio.create_task(envelope(), name="detect")
        await asyncio.sleep(0)
        try:
            return monitor.waits(ours="/tests/unit/"), monitor.waits(ours="/no/such/dir/")
        finally:
            task.cancel()

    said, elsewhere = asyncio.run(main())
    stalled = next(part for part in said.split("; ") if part.startswith("[detect]"))
    assert "test_monitor.py" in stalled and "envelope > " in stalled and "publish > " in stalled
    assert stalled.index("envelope") < stalled.index("publish") < stalled.index("wait")
    assert elsewhere == "none"


def test_waits_walks_faust_agents_from_their_own_coroutine():
    """Faust awaits an agent through a wrapper (ActorRef.__await__) that hides the agent's frames."""
    from types import SimpleNamespace

    async def envelope():
        await asyncio.Event().wait()  # e.g. an MQL lookup retrying while Redis is down

    class Actor:  # as faust.agents.actor.Actor: awaited, it awaits `it`
        def __init__(self, it):
            self.it = it

        def __await__(self):
            return self.it.__await__()

    async def execute(actor):
        await actor

    async def main():
        actor = Actor(envelope())
        app = SimpleNamespace(agents={"detect": SimpleNamespace(name="detect", _actors={actor})})
        task = asyncio.create_task(execute(actor))
        await asyncio.sleep(0)
        try:
            return monitor.waits(ours="/tests/unit/", app=None), monitor.waits(ours="/tests/unit/", app=app)
        finally:
            task.cancel()

    without, with_app = asyncio.run(main())
    assert "envelope" not in without
    assert "[agent detect] test_monitor.py:" in with_app and "envelope" in with_app


def test_a_hung_tick_is_named_with_where_it_waits_and_the_worker_is_not_ready(caplog):
    """The tick carries the barrier's reports: one that never ends holds every decision in silence
    (the SIGKILL stack test's last worker, twice in CI). Monitor says so; /ready answers 503."""
    from types import SimpleNamespace

    from streams.worker.progress import Progress

    async def hung():
        await asyncio.Event().wait()  # e.g. a blocking call queued behind others that never returns

    progress = Progress.__new__(Progress)
    progress.started = None
    progress._tick = hung
    app = SimpleNamespace(consumer=SimpleNamespace(assignment=lambda: {("t", 0)}), rebalancing=False, agents={},
                          tables=SimpleNamespace(recovery=SimpleNamespace(completed=SimpleNamespace(is_set=lambda: True))),
                          pql_progress=progress)
    m = monitor.Monitor(app, ("t",), "v1", {})

    async def main():
        task = asyncio.create_task(progress.tick(), name="pql.tick")
        await asyncio.sleep(0)
        assert monitor.ready(app) and progress.running(progress.started + 1) == 1
        m.tick_stalled()
        assert caplog.messages == []
        progress.started -= monitor.TICK_STALL  # as if it started TICK_STALL ago
        m.tick_stalled()
        m.tick_stalled()  # once per TICK_STALL
        ready = monitor.ready(app)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return ready

    caplog.set_level("WARNING")
    assert not asyncio.run(main())
    (said,) = caplog.messages
    assert said.startswith("the tick has run for 30 s") and "[pql.tick]" in said and "hung" in said
    assert progress.started is None and monitor.ready(app)  # a tick that ends clears it
