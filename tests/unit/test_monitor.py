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
