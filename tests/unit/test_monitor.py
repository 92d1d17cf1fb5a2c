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
