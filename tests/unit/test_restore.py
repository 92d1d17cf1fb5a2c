"""The bulk changelog read (streams/worker/restore.py): it fills the memory or RocksDB store exactly
as Faust's own recovery would, and reads a partition again whenever Faust may have let go of its keys.
The read itself against a real Kafka is proved by tests/stack/test_exactly_once.py (SIGKILLs)."""
import json
from types import SimpleNamespace

import pytest

from faust.types import TP
from faust.types.tuples import Message

from streams.config import Settings
from streams.worker.app import make_app
from streams.worker.restore import Restore
from streams.worker.tables import Tables


class Raw:
    """A confluent-kafka message as the bulk read sees it."""

    def __init__(self, topic, partition, offset, key, value):
        self._t, self._p, self._o, self._k, self._v = topic, partition, offset, key, value

    def topic(self): return self._t
    def partition(self): return self._p
    def offset(self): return self._o
    def key(self): return self._k
    def value(self): return self._v


RECORDS = [(0, json.dumps("acct-1").encode(), b'{"account_id":"acct-1","newest":1}'),
           (1, json.dumps("acct-2").encode(), b'{"account_id":"acct-2"}'),
           (2, json.dumps("acct-1").encode(), b'{"account_id":"acct-1","newest":2}'),
           (3, json.dumps("acct-2").encode(), None)]  # a tombstone


def faust_applies(faust_app, table, topic: str, records) -> None:
    """Faust's own recovery step: these records of partition 3 through the store's apply_changelog_batch."""
    schema = table.changelog_topic.schema
    events = []
    for offset, key, value in records:
        m = Message(topic, 3, offset, 0.0, 0, {}, key, value, None)
        events.append(SimpleNamespace(key=schema.loads_key(faust_app, m), value=schema.loads_value(faust_app, m),
                                      message=m))
    table.data.apply_changelog_batch(events, to_key=table._to_key, to_value=table._to_value)


def test_a_changelog_record_lands_in_the_store_as_faust_puts_it_there():
    app = make_app(Settings(app_id="restore-test", kafka_bootstrap="127.0.0.1:1"))
    tables = Tables.create(app, 4)
    topic = tables.changelog("accounts")
    records = RECORDS
    ours = Restore(app, {}, [tables.accounts])
    for offset, key, value in records:
        ours._apply(tables.accounts, Raw(topic, 3, offset, key, value))
    mine = (dict(tables.accounts.data.data), dict(tables.accounts.data._key_partition))

    faust_app = make_app(Settings(app_id="restore-test-2", kafka_bootstrap="127.0.0.1:1"))
    faust_tables = Tables.create(faust_app, 4)
    table = faust_tables.accounts
    faust_applies(faust_app, table, topic, records)
    assert mine == (dict(table.data.data), dict(table.data._key_partition))
    assert mine[0] == {"acct-1": b'{"account_id":"acct-1","newest":2}'}


def fake_app(actives):
    revoked = []
    recovery = SimpleNamespace(revoke=revoked.append)
    table = SimpleNamespace(changelog_topic=SimpleNamespace(get_topic_name=lambda: "t"), data=object())
    app = SimpleNamespace(conf=SimpleNamespace(id="a"), consumer_generation_id=1, tables=SimpleNamespace(recovery=recovery),
                          assignor=SimpleNamespace(assigned_actives=lambda: set(actives)))
    return app, table, revoked


def test_each_assignment_reads_what_it_does_not_hold_and_faust_goes_on_from_there():
    actives = {TP("t", 0), TP("t", 1)}
    app, table, revoked = fake_app(actives)
    r = Restore(app, {}, [table])
    r.install()
    reads = []

    def read(tps):
        reads.append(set(tps))
        for tp in tps:
            r.held.add(tp)
            r.answer[tp] = 41
    r.read = read

    assert r.persisted_offset(TP("t", 0)) == 41 and r.persisted_offset(TP("t", 1)) == 41
    assert reads == [actives]
    assert r.persisted_offset(TP("t", 0)) is None  # asked again: Faust knows where it is

    app.consumer_generation_id = 2  # a rebalance keeps both: nothing to read, Faust goes on
    assert r.persisted_offset(TP("t", 0)) is None and reads == [actives]

    app.tables.recovery.revoke(TP("t", 1))  # our rollback, or Faust revoking it
    assert revoked == [TP("t", 1)]
    app.consumer_generation_id = 3
    assert r.persisted_offset(TP("t", 1)) == 41 and reads[-1] == {TP("t", 1)}

    actives.discard(TP("t", 0))  # partition 0 leaves as an active (a standby now, say) ...
    app.consumer_generation_id = 4
    assert r.persisted_offset(TP("t", 1)) is None
    actives.add(TP("t", 0))  # ... and comes back: its keys may be gone, so it is read again
    app.consumer_generation_id = 5
    assert r.persisted_offset(TP("t", 0)) == 41 and reads[-1] == {TP("t", 0)}


def test_a_rocksdb_partition_is_emptied_then_filled_as_faust_fills_it(tmp_path):
    """With rocksdb:// the bulk read writes the changelog's raw bytes into the partition's database,
    after dropping whatever it held (values of an aborted transaction, say), and records the offset."""
    pytest.importorskip("rocksdict")
    from streams.worker import restore

    def rocks_tables(name):
        app = make_app(Settings(app_id=name, kafka_bootstrap="127.0.0.1:1", store="rocksdb://", data_dir=tmp_path / name))
        return app, Tables.create(app, 4)

    app, tables = rocks_tables("rocks-ours")
    store, topic = tables.accounts.data, tables.changelog("accounts")
    stale = store._db_for_partition(3)
    stale.put(json.dumps("acct-9").encode(), b'{"account_id":"acct-9","aborted":true}')
    other = store._db_for_partition(1)
    other.put(json.dumps("acct-5").encode(), b'{"account_id":"acct-5"}')
    records = RECORDS
    ours = Restore(app, {}, [tables.accounts])
    restore.empty(store, 3)
    for offset, key, value in records:
        ours._apply(tables.accounts, Raw(topic, 3, offset, key, value))
    mine = dict(store._db_for_partition(3).items())

    faust_app, faust_tables = rocks_tables("rocks-faust")
    table = faust_tables.accounts
    faust_applies(faust_app, table, topic, records)
    theirs = {k: v for k, v in table.data._db_for_partition(3).items() if k != table.data.offset_key}
    assert mine == theirs == {json.dumps("acct-1").encode(): b'{"account_id":"acct-1","newest":2}'}
    assert dict(store._db_for_partition(1).items()) == {json.dumps("acct-5").encode(): b'{"account_id":"acct-5"}'}


def test_a_rocksdb_store_answers_from_the_bulk_read_then_from_its_own_offset(tmp_path):
    pytest.importorskip("rocksdict")
    app = make_app(Settings(app_id="rocks-answers", kafka_bootstrap="127.0.0.1:1", store="rocksdb://", data_dir=tmp_path))
    tables = Tables.create(app, 4)
    store = tables.accounts.data
    tp = TP(tables.changelog("accounts"), 2)
    r = Restore(app, {}, [tables.accounts])
    r.install()
    r.generation = app.consumer_generation_id  # (no assignment to read here)
    r.answer[tp] = 17
    store.set_persisted_offset(tp, 9)
    assert store.persisted_offset(tp) == 17  # the bulk read's answer, once
    assert store.persisted_offset(tp) == 9   # then what the store keeps
