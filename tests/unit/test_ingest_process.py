"""The ingest process's metrics relay: what the child sends is what the worker's /metrics adds."""
from streams.worker import ingest_process, metrics


def test_counter_increments_and_gauge_values_are_relayed():
    before = ingest_process.readings()
    metrics.events_consumed.labels("track").inc(3)
    metrics.events_invalid.labels("not_json").inc()
    metrics.consumer_lag.labels("product.events", "7").set(42)
    changed = ingest_process.changes(before, ingest_process.readings())
    assert ("events_consumed", (("type", "track"),), 3.0) in changed
    assert ("events_invalid", (("reason", "not_json"),), 1.0) in changed
    assert ("consumer_lag", (("partition", "7"), ("topic", "product.events")), 42.0) in changed
    assert all(name in ingest_process.RELAYED for name, _, _ in changed)
    # applied in the worker's process (here: the same registry, so the counts grow by as much again)
    now = ingest_process.readings()
    ingest_process.apply(changed)
    after = ingest_process.readings()
    assert after[("events_consumed", (("type", "track"),))] == now[("events_consumed", (("type", "track"),))] + 3
    assert after[("consumer_lag", (("partition", "7"), ("topic", "product.events")))] == 42.0
    assert ingest_process.changes(after, ingest_process.readings()) == []  # nothing new: nothing sent


def test_the_tick_goes_to_the_child_as_called():
    import queue

    q: queue.Queue = queue.Queue()
    remote = ingest_process.Remote(q)
    assert remote.report(1795000000000) is None  # the child writes its report to <app>-progress itself
    remote.tick([0, 2], 1795000000000)
    assert q.get_nowait() == ([0, 2], 1795000000000)
