"""The worker's tick (streams/worker/progress.py): a partition reports only what its committed
transactions hold, is idle only when it has read and committed its whole log, and gets a tick line
only when a tick has something to decide."""
import asyncio
import json
from types import SimpleNamespace

from faust.types import TP

from streams.worker import envelope, eos, progress
from test_publish import TOPICS, Tx, qualifying_envelope, setup


def _progress(committed: dict[int, int]):
    tables, detector, pub = setup(Tx())
    app = SimpleNamespace(consumer=SimpleNamespace(_committed_offset={TP(TOPICS.accounts, p): o for p, o in committed.items()}))
    settings = SimpleNamespace(confluent=lambda: {}, app_id="app")
    return progress.Progress(app, settings, TOPICS, detector, pub, feed=None), detector, pub


def test_a_report_tells_what_the_last_commit_holds():
    pr, detector, pub = _progress({})
    p = envelope.partition_of("acme", 4)
    pub.processed[p], pub.reported[p] = 10, (1000, 900)
    pr.noted()
    pub.processed[p], pub.reported[p] = 20, (2000, 1900)  # published, not committed yet
    pr.noted()
    assert pr.committed(p) is None  # nothing committed since the partition was assigned
    pr.app.consumer._committed_offset[TP(TOPICS.accounts, p)] = 10
    assert pr.committed(p) == (1000, 900)
    pr.app.consumer._committed_offset[TP(TOPICS.accounts, p)] = 20
    assert pr.committed(p) == (2000, 1900)


def test_a_partition_is_idle_once_it_has_read_and_committed_its_log(monkeypatch):
    pr, detector, pub = _progress({1: 50})
    where = {"position": 50, "delivered": 49}
    monkeypatch.setattr(eos, "read_to", lambda app, tp: (where["position"], where["delivered"]))
    pub.processed[1] = 50
    assert pr.idle(1, 50)
    assert not pr.idle(1, 51)  # a line below the high watermark not read yet
    where["delivered"] = 50
    assert not pr.idle(1, 50)  # delivered to the stream, not processed yet
    where["delivered"], pub.processed[1] = 49, 50
    pr.app.consumer._committed_offset[TP(TOPICS.accounts, 1)] = 45
    assert not pr.idle(1, 50)  # processed, not committed: its forwards may still be aborted
    where["position"] = None
    assert not pr.idle(1, 50)


def test_a_progress_record_reads_back_as_its_reports():
    lines = [envelope.told(envelope.WATERMARK, 3, 1000, 900), envelope.told(envelope.INPUT, 100_001, 1000, envelope.IDLE)]
    (body,) = envelope.pack_all(lines)
    assert progress.parse(body) == [("w", 3, (1000, 900)), ("i", 100_001, (1000, envelope.IDLE))]


def test_only_a_partition_with_something_to_decide_gets_a_tick():
    tables, detector, pub = setup(Tx())
    p = envelope.partition_of("acme", 4)
    assert not pub.needs_tick(p, 0)  # nothing there: an idle partition costs nothing
    result = asyncio.run(detector.process(qualifying_envelope("acme"), p))
    assert asyncio.run(pub.publish(result, p, offset=0))
    (due, _), = json.loads(tables.clocks.data[str(p)]).values()
    assert not pub.needs_tick(p, due - 1) and pub.needs_tick(p, due)  # the handoff's SLA clock
    tables.clocks.data[f"w{p}"] = json.dumps({"stream": 0, "accounts": {"acme": 5}}).encode()
    assert pub.needs_tick(p, 0)  # a decision waits
