"""The Faust and aiokafka internals that exactly-once relies on (streams/worker/eos.py) are still there.

An upgrade that removes or renames one fails here, naming it, instead of losing handoffs under
SIGKILL. The versions are pinned in pyproject.toml to the ones these were checked against.
"""
import asyncio
import importlib
import inspect
from importlib.metadata import version

import pytest

from streams.worker.eos import INTERNALS, CHECKED


@pytest.mark.parametrize("module,path", INTERNALS, ids=[f"{m}:{p}" for m, p in INTERNALS])
def test_internal_attribute_exists(module, path):
    obj = importlib.import_module(module)
    for part in path.split("."):
        assert hasattr(obj, part), f"{module}.{path}: {part!r} is gone (see streams/worker/eos.py)"
        obj = getattr(obj, part)


def test_faust_still_skips_and_acks_as_guard_skips_expects():
    import faust.streams

    src = inspect.getsource(faust.streams.Stream)
    assert "skipped_value" in src and "flow_control.is_active()" in src, (
        "faust.streams.Stream no longer skips messages while flow control is off: review guard_skips")


def test_versions_are_the_checked_ones():
    for package, checked in CHECKED.items():
        assert version(package) == checked, f"{package} {version(package)}: streams/worker/eos.py was checked with {checked}"


def test_livelock_check_skips_a_partition_whose_position_is_being_reset():
    """Faust's check would crash the worker on aiokafka's assert (eos.quiet_livelock_check)."""
    from types import SimpleNamespace

    from aiokafka.consumer.subscription_state import SubscriptionState
    from aiokafka.structs import TopicPartition
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread
    from faust.types import TP

    from streams.worker import eos

    async def check() -> None:
        eos.quiet_livelock_check()
        subs = SubscriptionState()
        subs.assign_from_user({TopicPartition("t", 0)})
        consumer = SimpleNamespace(_fetcher=SimpleNamespace(_subscriptions=subs))
        thread = SimpleNamespace(_ensure_consumer=lambda: consumer)
        assert AIOKafkaConsumerThread.verify_event_path(thread, 0.0, TP("t", 0)) is None  # skipped, no assert
        subs.subscription.assignment.state_value(TopicPartition("t", 0)).seek(5)
        with pytest.raises(AttributeError):  # a known position goes on to Faust's check (needs a real thread)
            AIOKafkaConsumerThread.verify_event_path(thread, 0.0, TP("t", 0))

    asyncio.run(check())
