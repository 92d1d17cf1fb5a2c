"""The Faust and aiokafka internals that exactly-once relies on (streams/eos.py) are still there.

An upgrade that removes or renames one fails here, naming it, instead of losing handoffs under
SIGKILL. The versions are pinned in pyproject.toml to the ones these were checked against.
"""
import importlib
import inspect
from importlib.metadata import version

import pytest

from streams.eos import INTERNALS, CHECKED


@pytest.mark.parametrize("module,path", INTERNALS, ids=[f"{m}:{p}" for m, p in INTERNALS])
def test_internal_attribute_exists(module, path):
    obj = importlib.import_module(module)
    for part in path.split("."):
        assert hasattr(obj, part), f"{module}.{path}: {part!r} is gone (see streams/eos.py)"
        obj = getattr(obj, part)


def test_faust_still_skips_and_acks_as_guard_skips_expects():
    import faust.streams

    src = inspect.getsource(faust.streams.Stream)
    assert "skipped_value" in src and "flow_control.is_active()" in src, (
        "faust.streams.Stream no longer skips messages while flow control is off: review guard_skips")


def test_versions_are_the_checked_ones():
    for package, checked in CHECKED.items():
        assert version(package) == checked, f"{package} {version(package)}: streams/eos.py was checked with {checked}"
