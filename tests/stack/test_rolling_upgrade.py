"""A rolling upgrade under load: two workers of the release before format versions
(tests/fixtures/upgrade) are replaced one at a time by this release while events flow. Every handoff
comes out once: the new release reads what the old one wrote, and the old one, still running
beside it, reads what the new one writes (schemas/formats.py)."""
import subprocess
import threading
import time

import pytest

from live import ROOT, publish, read
from schemas.formats import FORMAT, version_of
import test_exactly_once
from test_exactly_once import expected_handoffs, handoff_counts, stream

eo = test_exactly_once.eo  # (the fixture: that file's rules and pipeline)

OLD = "f6a6d9af9c8e9f19b58144f4533475ab605fe7f6"  # the release the fixtures in tests/fixtures/upgrade come from


@pytest.fixture
def old_release(tmp_path):
    """The release before, as a source tree (git archive of OLD: the clone must hold it)."""
    tree = tmp_path / "old-release"
    tree.mkdir()
    done = subprocess.run(f"git archive {OLD} | tar -x -C {tree}", shell=True, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and (tree / "streams").is_dir(), \
        f"commit {OLD} must be in this clone's history (git fetch --unshallow): {done.stderr}"
    return tree


def test_a_rolling_upgrade_under_load_keeps_every_handoff_exact_and_once(eo, tmp_path, old_release):
    lines = stream(accounts=600, seed=14)
    expected = expected_handoffs(eo, lines, tmp_path)
    eo.create_topic("product.events", 4)
    a, b = eo.start_worker("a-old", cwd=old_release), eo.start_worker("b-old", cwd=old_release)
    eo.wait_ready(a, b)
    sender = threading.Thread(target=publish, args=(eo.kafka, eo.topic("product.events"), lines), kwargs={"rate": 110})
    sender.start()  # (~33 s of sending: as long as the upgrade below)
    time.sleep(5)
    new = []
    for old, name in ((a, "a-new"), (b, "b-new")):  # stop one, start the new release, then the other
        old.terminate()
        assert old.wait(60) == 0
        new.append(eo.start_worker(name))
        eo.wait_ready(new[-1])
        time.sleep(5)  # both releases run side by side
    sender.join()
    counts = handoff_counts(eo, len(expected))
    missing = [i for i in expected if counts[i] == 0]
    assert not missing, f"{len(missing)} of {len(expected)} handoffs lost in the upgrade"
    assert all(c == 1 for c in counts.values()), "handoffs duplicated in the upgrade"
    assert set(counts) == set(expected)
    assert all(w.poll() is None for w in new), "the new workers run on"
    for w in new:
        log = open(w.log_path).read()
        assert "CRITICAL" not in log and "has format" not in log, log[-2000:]
    changelog = read(eo.kafka, [eo.vars["PQL_APP_ID"] + "-accounts-changelog"], until=lambda m: True, idle=2)
    formats = {version_of(m.value()) for m in changelog if m.value()}
    assert formats == {0, FORMAT}, f"both releases wrote state: {formats}"
