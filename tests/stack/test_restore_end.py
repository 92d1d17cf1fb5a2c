"""A changelog partition a worker kept through a rebalance: Faust is told where it ends (its last
stable offset), so its recovery reads nothing again (streams/worker/restore.py, Restore.at_end)."""
from types import SimpleNamespace

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic
from faust.types import TP

from streams.worker.restore import Restore


def test_kept_partitions_are_told_their_last_stable_offset(kafka, unique):
    topic = f"t{unique}.app-accounts-changelog"
    admin = AdminClient({"bootstrap.servers": kafka})
    for f in admin.create_topics([NewTopic(topic, 2, 1)]).values():
        f.result(timeout=30)
    p = Producer({"bootstrap.servers": kafka, "transactional.id": f"t{unique}-restore"})
    p.init_transactions(30)

    def transaction(partition: int, n: int, commit: bool = True) -> None:
        p.begin_transaction()
        for i in range(n):
            p.produce(topic, key=b'"k%d"' % i, value=b"{}", partition=partition)
        p.flush(30)
        (p.commit_transaction if commit else p.abort_transaction)(30)

    transaction(0, 5)               # offsets 0-4, commit marker 5
    transaction(1, 3, commit=False)  # 0-2 aborted, abort marker 3
    transaction(1, 2)               # 4-5, commit marker 6
    p.begin_transaction()           # open: the last stable offset stays before it
    p.produce(topic, key=b'"open"', value=b"{}", partition=0)
    p.flush(30)

    table = SimpleNamespace(changelog_topic=SimpleNamespace(get_topic_name=lambda: topic), data=object())
    app = SimpleNamespace(conf=SimpleNamespace(id="app"))
    r = Restore(app, {"bootstrap.servers": kafka}, [table])
    r.at_end({TP(topic, 0), TP(topic, 1)})
    assert r.answer == {TP(topic, 0): 5, TP(topic, 1): 6}
    p.abort_transaction(30)
