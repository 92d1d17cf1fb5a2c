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


def test_the_livelock_check_walks_the_partitions_every_few_seconds():
    """eos.rare_livelock_check: four walks a second over every partition were most of an idle
    64-partition worker's Python time."""
    from streams.worker import eos

    class Fake:
        walks = 0

        async def verify_all_partitions_active(self):
            Fake.walks += 1

    eos.rare_livelock_check(Fake)
    c = Fake()

    async def ticks(n: int) -> None:
        for _ in range(n):
            await c.verify_all_partitions_active()

    asyncio.run(ticks(40))  # ten seconds of Faust's timer, at once
    assert Fake.walks == 1
    c._pql_verified -= eos.LIVELOCK_EVERY
    asyncio.run(ticks(1))
    assert Fake.walks == 2


def test_recovery_highwaters_come_from_the_broker_not_from_a_fetch():
    """Faust's own answer is None before a fetch (-> highwater -1 -> ConsistencyError); ours asks
    the broker (eos.broker_highwaters)."""
    from types import SimpleNamespace

    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    from streams.worker import eos

    tp = ("t-changelog", 0)

    async def end_offsets(partitions):
        return {p: 1758 for p in partitions}

    consumer = SimpleNamespace(last_stable_offset=lambda p: None, end_offsets=end_offsets)
    thread = SimpleNamespace(_ensure_consumer=lambda: consumer, consumer=SimpleNamespace(in_transaction=True))
    original = AIOKafkaConsumerThread._highwaters
    if not getattr(original, "_pql", False):  # Faust's: what a fresh assignment has not fetched is None
        assert asyncio.run(original(thread, [tp])) == {tp: None}
    eos.broker_highwaters()
    assert asyncio.run(AIOKafkaConsumerThread._highwaters(thread, [tp])) == {tp: 1758}


def test_consumer_instance_attributes_exist():
    from faust.transport.consumer import Consumer

    from streams.worker.eos import CONSUMER_ATTRIBUTES

    init = inspect.getsource(Consumer.__init__)
    for name in CONSUMER_ATTRIBUTES:
        assert f"self.{name} = " in init, f"faust Consumer no longer sets {name} (see streams/worker/eos.py)"


def test_a_gap_never_covers_the_message_that_revealed_it():
    """Reading 18 after 16: 17 is a gap, 18 is not done until processed (eos.exclusive_gaps)."""
    from collections import defaultdict

    from faust.transport.consumer import Consumer
    from intervaltree import IntervalTree

    from streams.worker import eos

    class Fake:
        _add_gap = Consumer._add_gap

        def __init__(self):
            self._committed_offset = defaultdict(lambda: None)
            self._gap = defaultdict(IntervalTree)

    eos.exclusive_gaps(Fake)
    c = Fake()
    asyncio.run(c._add_gap("tp", 17, 18))
    assert [(i.begin, i.end) for i in c._gap["tp"]] == [(17, 18)]  # 17 only (Faust's own: 17 and 18)


def test_a_seek_stops_a_batch_fetched_before_it():
    """The rest of a batch fetched before a seek is dropped and the partitions go back to their
    committed offsets (eos.no_batch_across_seeks)."""
    from faust.types import TP

    from streams.worker import eos

    class Fake:
        def __init__(self):
            self._gap, self._read_offset, self.seeks = {"p1": "gaps"}, {"p1": 22}, []

        async def getmany(self, timeout):
            for offset in (21, 22, 23, 24):
                yield "p1", offset

        async def perform_seek(self):
            self.seeks.append("committed")
            self._read_offset["p1"] = 13

        async def seek(self, tp, offset):
            self.seeks.append(offset)
            self._read_offset[tp] = offset

    eos.no_batch_across_seeks("accounts", Fake)

    async def drain(c, seek_after: int | None, tp=None) -> list:
        got = []
        async for _, offset in c.getmany(1.0):
            got.append(offset)
            if offset == seek_after:  # Faust's recovery (or eos.reread_skipped), mid-batch
                await (c.seek(tp, 13) if tp else c.perform_seek())
        return got

    c = Fake()
    assert asyncio.run(drain(c, None)) == [21, 22, 23, 24] and c.seeks == []
    assert asyncio.run(drain(c, 22)) == [21, 22]  # 23 and 24 came from before the seek
    assert c.seeks == ["committed", "committed"] and c._read_offset == {"p1": 13} and "p1" not in c._gap
    assert asyncio.run(drain(c, None)) == [21, 22, 23, 24]  # the next batch is the new epoch's
    assert asyncio.run(drain(c, 21, TP("accounts-changelog", 0))) == [21, 22, 23, 24]  # table recovery's seeks
    assert asyncio.run(drain(c, 21, TP("accounts", 1))) == [21] and c.seeks[-2:] == [13, "committed"]


def test_what_reached_the_stream_since_the_last_seek_is_known():
    """eos.read_to's second half: the last offset delivered to the agent since the partition's last
    seek (Faust's own `_read_offset` holds the seek's offset after a seek: a partition that had
    processed nothing looked busy for ever, and told the others nothing: the SIGKILL test)."""
    from types import SimpleNamespace

    from faust.types import TP

    from streams.worker import eos

    tp = TP("accounts", 0)

    class Fake:
        def __init__(self):
            self._gap, self._read_offset = {}, {}

        async def getmany(self, timeout):
            for offset in (5, 6):
                yield tp, SimpleNamespace(offset=offset)

        async def perform_seek(self):
            pass

        async def seek(self, partition, offset):
            self._read_offset[partition] = offset

    eos.no_batch_across_seeks("accounts", Fake)
    c = Fake()
    app = SimpleNamespace(consumer=c)

    async def drain():
        return [m.offset async for _, m in c.getmany(1.0)]

    assert eos.read_to(app, tp) == (None, None)
    assert asyncio.run(drain()) == [5, 6] and eos.read_to(app, tp)[1] == 6
    asyncio.run(c.seek(tp, 3))
    assert eos.read_to(app, tp)[1] is None and c._read_offset[tp] == 3


def test_a_position_counts_only_once_the_records_it_passed_are_known():
    """eos.noted_fetches: aiokafka advances the position as getmany returns a batch; until the
    batch is noted, and while its records have not all reached the stream, the partition is not
    read to its position (a tick took such a partition for idle: session 14)."""
    from types import SimpleNamespace

    from aiokafka.structs import TopicPartition
    from faust.types import TP

    from streams.worker import eos

    key, tp = TopicPartition("accounts", 0), TP("accounts", 0)
    state = SimpleNamespace(position=10, has_valid_position=True)

    class Kafka:  # aiokafka's consumer, as far as it is used
        def __init__(self):
            self._fetcher = SimpleNamespace(_subscriptions=SimpleNamespace(subscription=SimpleNamespace(
                assignment=SimpleNamespace(state_value=lambda k: state))))

        def assignment(self):
            return {key}

    class Thread:  # Faust's consumer thread, as far as it is used
        async def _fetch_records(self, consumer, active_partitions, timeout=None, max_records=None):
            state.position = 14  # records 10..13 returned
            return {key: [SimpleNamespace(offset=o) for o in range(10, 14)]}

    eos.noted_fetches("accounts", Thread)
    kafka = Kafka()
    app = SimpleNamespace(consumer=SimpleNamespace(_thread=SimpleNamespace(_ensure_consumer=lambda: kafka),
                                                   _pql_delivered={tp: 9}))
    assert eos.read_to(app, tp) == (None, 9)  # a position not noted yet is not trusted
    asyncio.run(Thread()._fetch_records(kafka, {key}, timeout=1.0))
    assert eos.read_to(app, tp) == (14, 13)  # handed up to 13: not idle until 13 is processed
    app.consumer._pql_delivered[tp] = 13
    assert eos.read_to(app, tp) == (14, 13)
    state.position = 15  # a getmany in progress moved it (a marker skipped, or records on their way)
    assert eos.read_to(app, tp)[0] is None


def test_a_rebalance_commits_first_and_rolls_back_what_it_could_not_commit():
    """eos.Transactions.on_revoked: commit; a partition whose transaction still holds sends goes back
    to the log (its open transaction is aborted when on_assigned starts fresh producers)."""
    from types import SimpleNamespace

    from streams.worker import eos

    def txn(sent: bool):
        return SimpleNamespace(is_in_transaction=lambda: True, _txn_partitions={"x"} if sent else set(),
                               _pending_txn_partitions=set())

    commits = []

    async def commit():
        commits.append(1)
        raise RuntimeError("coordinator not available")

    producers = {"app-1-0": SimpleNamespace(_txn_manager=txn(False)), "app-1-2": SimpleNamespace(_txn_manager=txn(True)),
                 "app-0-0": SimpleNamespace(_txn_manager=txn(True)), "other-1-3": SimpleNamespace(_txn_manager=txn(True))}
    app = SimpleNamespace(conf=SimpleNamespace(id="app"), assignor=SimpleNamespace(group_for_topic=lambda t: 1),
                          consumer=SimpleNamespace(commit=commit), producer=SimpleNamespace(_transaction_producers=producers))
    tx = eos.Transactions(app, "accounts")
    rolled = []
    tx.rollback = rolled.append
    asyncio.run(tx.on_revoked(None, set()))
    assert commits == [1] and rolled == [{2}] and tx.frozen  # nothing is published until the assignment (test_publish)
    app.assignor = SimpleNamespace(group_for_topic=lambda t: {}[t])  # before the first assignment
    assert tx.uncommitted() == set()


def test_topic_groups_of_an_earlier_assignment_are_remembered():
    """Chaos run, after a broker restart: an empty assignment, then Faust looked up the revoked
    changelog partitions' group in it (KeyError) and the worker crashed."""
    from faust.transport.consumer import TransactionManager

    from streams.worker.eos import remembered_topic_groups

    assert "_tps_to_transactional_ids(revoked)" in inspect.getsource(TransactionManager.on_rebalance)

    class Assignor:  # what Faust's PartitionAssignor does with topic groups
        def __init__(self):
            self._topic_groups = {}

        def on_assignment(self, assignment):
            self._topic_groups = dict(assignment)

        def group_for_topic(self, topic):
            return self._topic_groups[topic]

    remembered_topic_groups(Assignor)
    a = Assignor()
    a.on_assignment({"app-accounts": 0, "app-clocks-changelog": 0})
    a.on_assignment({})  # nothing assigned now
    assert a.group_for_topic("app-clocks-changelog") == 0
    a.on_assignment({"app-accounts": 1})
    assert a.group_for_topic("app-accounts") == 1 and a.group_for_topic("app-clocks-changelog") == 0
    with pytest.raises(KeyError):
        a.group_for_topic("never-assigned")


def test_an_envelopes_writes_go_out_as_one_batch_per_topic_partition_in_order():
    """Transactions.send_all: aiokafka batches (send_batch) into the source partition's producer; a
    value larger than a batch goes alone; only the first batch may begin a new transaction."""
    from types import SimpleNamespace

    from aiokafka.errors import IllegalOperation
    from aiokafka.producer.message_accumulator import BatchBuilder

    from streams.worker import eos

    class Producer:
        def __init__(self):
            self.batches, self.refuse = [], 0

        def create_batch(self):
            return BatchBuilder(1024, 0, is_transactional=1)

        async def send_batch(self, batch, topic, *, partition):
            if self.refuse:
                self.refuse -= 1
                raise IllegalOperation("Can't send messages while not in transaction")
            self.batches.append((topic, partition, batch.record_count()))

    producer, begun = Producer(), []

    async def begin(tid):
        begun.append(tid)

    app = SimpleNamespace(conf=SimpleNamespace(id="app"), assignor=SimpleNamespace(group_for_topic=lambda t: 1),
                          consumer=SimpleNamespace(assignment=lambda: {eos.TP("accounts", 0)}),
                          producer=SimpleNamespace(_transaction_producers={"app-1-0": producer}, _trn_locks={},
                                                   maybe_begin_transaction=begin))
    tx = eos.Transactions(app, "accounts")
    sends = [("out", "k", b"v" * 10, None, 0), ("changelog", "a", b"x" * 2000, None, 0),
             ("out", "k2", b"v", [("content-type", b"x")], 0), ("changelog", "b", b"y", None, 0),
             ("accounts", "", b"line", None, 3)]
    producer.refuse = 1  # the transaction was ended under us: the first batch begins a new one
    asyncio.run(tx.send_all(sends, source=0))
    assert begun == ["app-1-0"]
    assert producer.batches == [("out", 0, 2), ("changelog", 0, 1), ("changelog", 0, 1), ("accounts", 3, 1)]


def test_a_connection_closed_under_a_coordinator_lookup_is_retried():
    """aiokafka's sender made it fatal (the transactional producer died after a broker restart)."""
    from types import SimpleNamespace

    from aiokafka.errors import KafkaConnectionError
    from aiokafka.producer.sender import Sender

    from streams.worker import eos

    eos.coordinator_lookup_survives_a_closed_connection()
    answers = [KafkaConnectionError("Connection at 127.0.0.1:9092 closed"), 1]

    async def lookup(kind, key):
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def ready(node, group=None):
        return True

    async def refresh():
        return True

    sender = SimpleNamespace(_txn_manager=object(), _coordinators={}, _retry_backoff=0,
                             client=SimpleNamespace(coordinator_lookup=lookup, ready=ready, force_metadata_update=refresh))
    assert asyncio.run(Sender._find_coordinator(sender, 1, "tid")) == 1 and answers == []


def test_a_starting_client_waits_for_a_restarting_broker_then_gives_up():
    """aiokafka gave up at the first refused connection: a worker started during a broker restart exited."""
    from aiokafka.client import AIOKafkaClient
    from aiokafka.errors import KafkaConnectionError

    from streams.worker import eos

    eos.bootstrap_waits_for_the_broker()
    assert getattr(AIOKafkaClient.bootstrap, "_pql", False)
    tries = []

    async def bootstrap():
        tries.append(1)
        if len(tries) < 3:
            raise KafkaConnectionError("Unable to bootstrap from [('127.0.0.1', 9092)]")
        return "metadata"

    assert asyncio.run(eos.patiently(bootstrap, patience=5, pause=0.01)) == "metadata" and len(tries) == 3

    async def never():
        raise KafkaConnectionError("Unable to bootstrap")

    with pytest.raises(KafkaConnectionError):
        asyncio.run(eos.patiently(never, patience=0.05, pause=0.01))


def test_topic_creation_at_start_waits_for_a_node_that_is_down(monkeypatch):
    """Faust asked a node that had just died for the controller: a worker started then exited 1."""
    from aiokafka.errors import NodeNotReadyError
    from faust.transport.drivers.aiokafka import Transport

    from streams.worker import eos

    tries, refreshed = [], []

    async def create(self, owner, client, topic, partitions, replication, **kwargs):
        tries.append(topic)
        if len(tries) < 2:
            raise NodeNotReadyError("Attempt to send a request to node which is not ready (node id 3).")
        return "created"

    class Client:
        async def force_metadata_update(self):
            refreshed.append(1)

    monkeypatch.setattr(Transport, "_really_create_topic", create)
    eos.topic_creation_waits_for_a_node()
    patched = Transport._really_create_topic
    assert patched is not create and patched._pql
    assert asyncio.run(patched(None, None, Client(), "t", 4, 3)) == "created"
    assert tries == ["t", "t"] and refreshed == [1]
    monkeypatch.setattr(eos, "BOOTSTRAP_PATIENCE", 0.0)
    tries.clear()
    with pytest.raises(Exception, match="creating topic t: .*node id 3"):
        asyncio.run(patched(None, None, Client(), "t", 4, 3))


def test_a_stop_that_hangs_ends_after_the_shutdown_timeout():
    """eos.stop_within: the first SIGTERM/SIGINT handler call starts the clock; a stop still hanging
    then (here: Faust's own handler replaced by one that does nothing) exits with code 1."""
    import subprocess
    import sys
    import time

    script = """
import faust, logging, time
from streams.worker import eos
logging.basicConfig()
w = faust.Worker(faust.App("pql-stop-test"), loglevel="WARNING", quiet=True)
w._on_sigterm = lambda: None  # a graceful stop that never ends
eos.stop_within(w, 0.5)
w._on_sigterm()
w._on_sigterm()  # (a second signal does not restart the clock)
time.sleep(30)
"""
    started = time.monotonic()
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    took = time.monotonic() - started
    assert res.returncode == 1 and "did not stop within PQL_SHUTDOWN_TIMEOUT" in res.stderr
    assert took < 20


def test_partition_transactions_commit_side_by_side_and_a_failure_is_raised_after_all():
    """eos.concurrent_commits: Faust committed each partition's transaction in turn (three round
    trips each: issue 25 measured a 64-partition worker at a quarter of a 4-partition one)."""
    from types import SimpleNamespace

    from streams.worker import eos

    log, started = [], asyncio.Event()

    class Txn:
        def __init__(self, tid, fail=False):
            self.tid, self.fail = tid, fail

        async def send_offsets_to_transaction(self, offsets, group):
            log.append(("offsets", self.tid))
            if len([x for x in log if x[0] == "offsets"]) == 3:
                started.set()
            await started.wait()  # returns only once every partition has started: side by side

        async def commit_transaction(self):
            if self.fail:
                raise RuntimeError(f"{self.tid} lost")
            log.append(("commit", self.tid))

        async def begin_transaction(self):
            log.append(("begin", self.tid))

    producer = SimpleNamespace(_trn_locks={t: asyncio.Lock() for t in "abc"},
                               _transaction_producers={"a": Txn("a"), "b": Txn("b", fail=True), "c": Txn("c")})
    eos.concurrent_commits(producer)

    async def run():
        await asyncio.wait_for(producer.commit_transactions({t: {} for t in "abc"}, "g"), 2)

    try:
        asyncio.run(run())
        raise AssertionError("the failed commit must be raised")
    except RuntimeError as err:
        assert str(err) == "b lost"
    assert sorted(x for x in log if x[0] != "offsets") == [("begin", "a"), ("begin", "c"), ("commit", "a"), ("commit", "c")]


def test_faust_timer_commits_without_arguments():
    """guard_commits tells the timer's commits (spaced while catching up) by their bare call."""
    from faust.transport.consumer import Consumer

    src = inspect.getsource(Consumer._commit_handler.fun)  # (a mode ServiceTask)
    assert "await self.commit()" in src, "Faust's commit timer changed: review guard_commits' spacing"


def test_timer_commits_are_spaced_while_catching_up_and_others_never():
    from streams.worker.eos import CATCHUP_RECORDS, Transactions, guard_commits

    class Consumer:
        def __init__(self):
            self.calls = []

        async def commit(self, *args, **kwargs):
            self.calls.append(args or kwargs or "timer")
            return True

    async def run():
        c, tx = Consumer(), Transactions.__new__(Transactions)
        tx.spacing = 0.0
        guard_commits(c, asyncio.Lock(), spacing=lambda: tx.spacing)
        assert await c.commit() and await c.commit()  # caught up: every timer commit
        tx.catching_up(CATCHUP_RECORDS + 1, 60.0)
        assert await c.commit() is False  # the last one was just now
        assert await c.commit(topics={"t"})  # a commit of named partitions (an early handoff commit) goes
        tx.catching_up(CATCHUP_RECORDS, 60.0)
        assert await c.commit()
        return c.calls

    assert asyncio.run(run()) == ["timer", "timer", {"topics": {"t"}}, "timer"]


def test_a_backlog_spread_thin_over_many_partitions_counts_as_catching_up():
    """progress.records_behind: the owned partitions' unprocessed records in all; 64 partitions 10
    behind each are a backlog (the most of one, 10, was not: session 21)."""
    from streams.worker.eos import CATCHUP_RECORDS
    from streams.worker.progress import records_behind

    ends = {p: 110 for p in range(64)}
    done = {p: 100 for p in range(64)}
    assert records_behind(ends, done) == 640 > CATCHUP_RECORDS
    assert records_behind({1: 50, 2: 40, 3: 999}, {1: 60, 2: 10}) == 30  # ahead: 0; not processed here: left out


def test_an_aiokafka_client_keeps_the_topics_it_tracks_as_know_outputs_reads_them():
    """Transactions.know_outputs adds to `client._topics` (an empty set: every topic's metadata)."""
    from aiokafka.client import AIOKafkaClient

    async def made():
        return AIOKafkaClient(bootstrap_servers="127.0.0.1:1")._topics

    assert asyncio.run(made()) == set()


def _metadata(topics: dict[str, int], leader: int = 1):
    """A MetadataResponse (v1) of one broker and these topics' partition counts."""
    from aiokafka.protocol.metadata import MetadataResponse_v1

    return MetadataResponse_v1(brokers=[(leader, "127.0.0.1", 9092, None)], controller_id=leader, topics=[
        (0, t, False, [(0, p, leader, [leader], [leader]) for p in range(n)]) for t, n in topics.items()])


def test_fresh_producers_learn_every_output_topic_from_one_metadata_request():
    """eos.Transactions.know_outputs, at each assignment: aiokafka asked for metadata at each first
    send to a topic (~380 requests at 64 partitions, session 21); one request per producer still took
    256 partitions 9 s of decoding at start (session 23): one asks, the others adopt its answer. A
    failure is only logged."""
    from types import SimpleNamespace

    from aiokafka.cluster import ClusterMetadata
    from faust.types import TP

    from streams.worker import eos

    asked = {}

    def client(tid, fails):
        c = SimpleNamespace(_topics={"already"}, cluster=ClusterMetadata())

        def set_topics(topics):  # (as aiokafka's)
            asked[tid] = list(topics)
            c._topics = set(topics)
            fut = asyncio.get_running_loop().create_future()
            if fails:
                fut.set_exception(RuntimeError("broker gone"))
            else:
                c.cluster.update_metadata(_metadata({t: 3 for t in topics}))
                fut.set_result(True)
            return fut
        c.set_topics = set_topics
        return SimpleNamespace(client=c)

    for fails in (False, True):
        asked.clear()
        producers = {f"app-0-{p}": client(f"app-0-{p}", fails) for p in (2, 5, 7)}
        producers["app-0-7"].client._topics = {"only-7"}
        app = SimpleNamespace(conf=SimpleNamespace(id="app"), assignor=SimpleNamespace(group_for_topic=lambda t: 0),
                              producer=SimpleNamespace(_transaction_producers=producers))
        tx = eos.Transactions(app, "accounts")
        tx.outputs = ["accounts", "app-users-changelog"]
        asyncio.run(tx.know_outputs(["app-0-2", "app-0-5", "app-0-7", "app-0-9"]))
        everything = ["accounts", "already", "app-users-changelog", "only-7"]
        assert asked == {"app-0-2": everything}, "one metadata request, for every producer's topics"
        for tid, p in producers.items():
            if fails:
                assert p.client.cluster.partitions_for_topic("accounts") is None
            else:
                assert p.client._topics == set(everything)
                assert p.client.cluster.partitions_for_topic("app-users-changelog") == {0, 1, 2}
                assert p.client.cluster.leader_for_partition(TP("only-7", 2)) == 1
                assert p.client.cluster.broker_metadata(1).port == 9092


def test_an_adopted_cluster_metadata_has_everything_an_update_sets():
    """eos.adopt_metadata copies what aiokafka's update_metadata replaces: a client that takes another's
    answer is as if it had read it itself (an attribute added by a later aiokafka fails here)."""
    from aiokafka.cluster import ClusterMetadata

    from streams.worker import eos

    read, adopted = ClusterMetadata(), ClusterMetadata()
    blank = dict(vars(read))
    read.update_metadata(_metadata({"a": 4, "b": 2}))
    eos.adopt_metadata(adopted, read)
    changed = {k for k, v in vars(read).items() if v is not blank.get(k)}
    assert changed, "update_metadata set nothing?"
    for k in changed:
        assert vars(adopted)[k] == vars(read)[k], k
    assert adopted.topics() == {"a", "b"}


def test_a_rebalance_makes_anew_only_the_producers_it_did_not_make():
    """eos.Transactions.on_assigned: a producer there before the rebalance may be fenced (Faust reuses
    it) and is made anew; one Faust made in this rebalance (after on_revoked) is kept, unless it is
    not in a transaction. A 256-partition start made each of its producers twice (session 23)."""
    from types import SimpleNamespace

    from faust.types import TP

    from streams.worker import eos

    made = []

    def producer(in_txn=True):
        txn = SimpleNamespace(is_in_transaction=lambda: in_txn, _txn_partitions=set(), _pending_txn_partitions=set())
        return SimpleNamespace(_txn_manager=txn, client=SimpleNamespace(_topics=set()))

    producers = {"app-0-1": producer(), "app-0-2": producer()}

    async def stop(tid):
        producers.pop(tid, None)

    async def begin(tid):
        made.append(tid)
        producers[tid] = producer()

    async def commit(*args, **kwargs):
        return True

    app = SimpleNamespace(conf=SimpleNamespace(id="app"), assignor=SimpleNamespace(group_for_topic=lambda t: 0),
                          consumer=SimpleNamespace(commit=commit),
                          producer=SimpleNamespace(stop_transaction=stop, begin_transaction=begin,
                                                   _transaction_producers=producers))
    tx = eos.Transactions(app, "accounts")
    asyncio.run(tx.on_revoked(None, set()))
    producers["app-0-3"] = producer()  # Faust's, made in this rebalance
    producers["app-0-4"] = producer(in_txn=False)  # Faust's, but its begin failed
    asyncio.run(tx.on_assigned(None, {TP("accounts", p) for p in (1, 2, 3, 4, 5)}))
    assert sorted(made) == ["app-0-1", "app-0-2", "app-0-4", "app-0-5"]
    made.clear()
    asyncio.run(tx.on_assigned(None, {TP("accounts", p) for p in (1, 2, 3, 4, 5)}))
    assert made == [], "no rebalance began (no revocation): every producer is this assignment's"


def test_partition_producers_start_side_by_side():
    """eos.concurrent_starts: Faust started each partition's producer in turn (2.6 s at 256)."""
    from types import SimpleNamespace

    from streams.worker import eos

    running, most = [0], [0]

    async def begin(tid):
        running[0] += 1
        most[0] = max(most[0], running[0])
        await asyncio.sleep(0.01)
        running[0] -= 1

    class Manager:
        async def _start_transactions(self, tids):
            raise AssertionError("replaced")

    eos.concurrent_starts(Manager)
    m = Manager()
    m.producer = SimpleNamespace(maybe_begin_transaction=begin)
    asyncio.run(m._start_transactions([str(i) for i in range(100)]))
    assert most[0] == eos.STARTS_AT_ONCE


def test_a_commit_sends_the_table_writes_of_the_partitions_it_commits_first():
    from faust.types import TP

    from streams.worker.eos import guard_commits

    class Consumer:
        def __init__(self):
            self.calls = []

        async def commit(self, *args, **kwargs):
            self.calls.append("commit")
            return True

    async def run():
        c, flushed = Consumer(), []

        async def flush(partitions):
            flushed.append(partitions)
            c.calls.append("flush")

        guard_commits(c, asyncio.Lock(), flush=flush, source="src")
        await c.commit()  # the timer: every partition
        await c.commit(topics={TP("src", 3), TP("other", 1)})  # an early commit of one partition
        await c.commit(start_new_transaction=False)  # Faust's stop
        await c.commit({"src"})  # topic names: every partition
        return c.calls, flushed

    calls, flushed = asyncio.run(run())
    assert calls == ["flush", "commit"] * 4
    assert flushed == [None, {3}, None, None]


def test_handoffs_of_several_partitions_share_one_early_commit():
    """eos.Transactions.commit_soon: partitions with handoffs close together commit in one call (their
    transactions side by side), and one that comes while that commit runs gets the next."""
    from types import SimpleNamespace

    from faust.types import TP

    from streams.worker import eos

    calls = []

    async def commit(topics):
        calls.append(sorted(topics))
        if len(calls) == 1:
            tx.commit_soon(9)  # a handoff published while the first commit runs
        await asyncio.sleep(0)

    tx = eos.Transactions(SimpleNamespace(consumer=SimpleNamespace(commit=commit)), "accounts")

    async def run():
        for p in (3, 1, 3, 7):
            tx.commit_soon(p)
        while tx.soon_task is not None:
            await asyncio.sleep(0.001)

    asyncio.run(run())
    assert calls == [[TP("accounts", 1), TP("accounts", 3), TP("accounts", 7)], [TP("accounts", 9)]]
    assert not tx.soon


def test_the_owned_partitions_are_asked_of_faust_once_per_rebalance():
    """eos.Transactions.owned (the ingest tier's pacing asks every 2 ms): Faust's assignment() once,
    then again only after an assignment."""
    from types import SimpleNamespace

    from faust.types import TP

    from streams.worker import eos

    asked = []
    assignment = {TP("accounts", 1), TP("accounts", 4), TP("accounts-changelog", 2)}

    def current():
        asked.append(1)
        return set(assignment)

    async def nothing(tid):
        return None

    app = SimpleNamespace(consumer=SimpleNamespace(assignment=current), conf=SimpleNamespace(id="app"),
                          assignor=SimpleNamespace(group_for_topic=lambda t: 0),
                          producer=SimpleNamespace(stop_transaction=nothing, begin_transaction=nothing,
                                                   _transaction_producers={}))
    tx = eos.Transactions(app, "accounts")
    assert tx.owned() == {1, 4} and tx.owned() == {1, 4} and len(asked) == 1
    assignment.add(TP("accounts", 7))
    asyncio.run(tx.on_assigned(None, {TP("accounts", 7)}))
    assert tx.owned() == {1, 4, 7} and len(asked) == 2


def test_a_rebalance_commits_even_while_catching_up_and_rolls_back_writes_not_in_a_transaction():
    """A worker catching up spaces its timer's commits (`catching_up`); the commit before a rebalance
    must not be skipped for it, and a partition whose writes never reached its transaction (held, or
    lost to a move) is rolled back like one whose transaction failed."""
    from types import SimpleNamespace

    from streams.worker import eos

    commits = []

    async def commit(*args, **kwargs):
        commits.append(1)
        return True

    consumer = SimpleNamespace(commit=commit)
    app = SimpleNamespace(conf=SimpleNamespace(id="app"), assignor=SimpleNamespace(group_for_topic=lambda t: 1),
                          consumer=consumer, producer=SimpleNamespace(_transaction_producers={}))
    tx = eos.Transactions(app, "accounts")
    eos.guard_commits(consumer, tx.lock, spacing=lambda: tx.spacing)
    tx.catching_up(10_000, 30.0)
    assert asyncio.run(consumer.commit()) is True and commits == [1]
    assert asyncio.run(consumer.commit()) is False and commits == [1]  # the timer's next one: spaced
    rolled = []
    tx.rollback, tx.held = rolled.append, lambda: {3}
    asyncio.run(tx.on_revoked(None, set()))
    assert commits == [1, 1] and rolled == [{3}]


def test_a_rollback_makes_a_rocksdb_store_read_its_changelog_from_the_start(tmp_path):
    """Faust's RocksDB store remembers how far it read each changelog partition; after our rollback
    dropped the partition's values, recovery must not go on from there (eos.forget_persisted_offsets)."""
    pytest.importorskip("rocksdict")
    import faust
    from faust.types import TP

    from streams.worker import eos

    app = faust.App("pql-test-rocks", store="rocksdb://", datadir=str(tmp_path))
    table = app.Table("t", partitions=2, value_type=bytes)
    store = table.data
    tp0, tp1 = (TP("pql-test-rocks-t-changelog", p) for p in (0, 1))
    store.set_persisted_offset(tp0, 41)
    store.set_persisted_offset(tp1, 7)
    eos.forget_persisted_offsets(store, {0})
    assert store.persisted_offset(tp0) is None and store.persisted_offset(tp1) == 7
    eos.forget_persisted_offsets({}, {0})  # a memory store's data: nothing to do


def test_fetches_wait_briefly_while_a_rebalance_runs_and_as_faust_set_them_after():
    """Recovery's offsets requests queue behind a fetch on the consumer's connection
    (eos.quick_fetches_while_rebalancing): fetches wait 100 ms from a rebalance's start to its end."""
    import aiokafka
    import aiokafka.consumer.fetcher as fetcher
    import faust.transport.drivers.aiokafka as driver

    from streams.config import Settings
    from streams.worker import eos
    from streams.worker.app import make_app

    assert "fetch_max_wait_ms=1500" in inspect.getsource(driver.AIOKafkaConsumerThread._create_worker_consumer)
    assert "self._fetch_max_wait_ms," in inspect.getsource(fetcher.Fetcher._get_actions_per_node), (
        "aiokafka's Fetcher no longer reads _fetch_max_wait_ms per request: review quick_fetches_while_rebalancing")
    app = make_app(Settings(app_id="fetch-wait", kafka_bootstrap="127.0.0.1:1"))
    eos.quick_fetches_while_rebalancing(app)
    eos.quick_fetches_while_rebalancing(app)  # twice: once

    async def rebalance():
        consumer = aiokafka.AIOKafkaConsumer(bootstrap_servers="127.0.0.1:1", fetch_max_wait_ms=1500)
        consumer._fetcher = type("Fetcher", (), {"_fetch_max_wait_ms": 1500})()
        app.consumer._thread._consumer = consumer
        app.on_rebalance_start()
        during = (consumer._fetch_max_wait_ms, consumer._fetcher._fetch_max_wait_ms, app.rebalancing)
        app.on_rebalance_end()
        return during, (consumer._fetch_max_wait_ms, consumer._fetcher._fetch_max_wait_ms, app.rebalancing)

    assert asyncio.run(rebalance()) == ((100, 100, True), (1500, 1500, False))


def test_no_idle_second_at_stop():
    """mode's worker ran its loop a last second before closing it (eos.no_idle_second): the code
    replaced is still what it was, and ours ends at once."""
    import mode.worker

    from streams.worker import eos

    eos.no_idle_second()
    eos.no_idle_second()  # twice: once
    assert "asyncio.sleep(1.0)" in inspect.getsource(mode.worker.Worker._sentinel_task.replaced)

    async def run():
        started = asyncio.get_running_loop().time()
        await mode.worker.Worker._sentinel_task(None)
        return asyncio.get_running_loop().time() - started

    assert asyncio.run(run()) < 0.5


def test_a_source_partition_assigned_without_its_changelogs_stops_the_worker(monkeypatch):
    """eos.tables_follow_sources: at "Worker ready", <app>-accounts partition 3 without its tables'
    changelog partitions means tables not recovered: exit 70 rather than decide on them."""
    from types import SimpleNamespace

    from faust.types import TP

    from streams.worker import eos

    exits, ended = [], []
    monkeypatch.setattr(eos.os, "_exit", exits.append)
    assignment = {TP("app-accounts", 1), TP("app-accounts-changelog", 1), TP("app-users-changelog", 1)}
    app = SimpleNamespace(on_rebalance_end=lambda: ended.append(1),
                          consumer=SimpleNamespace(assignment=lambda: assignment))
    eos.tables_follow_sources(app, "app-accounts", ["app-accounts-changelog", "app-users-changelog"])
    app.on_rebalance_end()
    assert ended == [1] and exits == []
    assignment.add(TP("app-accounts", 3))  # its changelog partitions missing
    app.on_rebalance_end()
    assert exits == [70]


def test_producers_retry_soon_and_refresh_their_metadata_rarely():
    """eos.short_retries and eos.rare_metadata_refresh reach every producer Faust makes (through
    `_settings_extra`, which `_new_producer` spreads into aiokafka's keyword arguments)."""
    from types import SimpleNamespace

    from aiokafka import AIOKafkaProducer
    from faust.transport.drivers.aiokafka import Producer

    from streams.worker import eos

    assert "**self._settings_extra()" in inspect.getsource(Producer._new_producer)
    producer = SimpleNamespace(_settings_extra=lambda: {"acks": "all"})
    eos.short_retries(producer)
    eos.rare_metadata_refresh(producer)
    settings = producer._settings_extra()
    assert settings == {"acks": "all", "retry_backoff_ms": 20, "metadata_max_age_ms": eos.PRODUCER_METADATA_MAX_AGE_MS}
    assert set(settings) <= set(inspect.signature(AIOKafkaProducer).parameters)


def test_the_fetch_loop_wakes_on_its_own_only_as_often_as_a_fetch_waits():
    """eos.fetch_wait: aiokafka's fetch loop woke every 0.2 s to look at every assigned partition
    (1,281 at 256 partitions); it waits on everything it reacts to, its timeout is a fallback."""
    from types import SimpleNamespace

    from aiokafka.consumer.fetcher import Fetcher

    from streams.worker import eos

    assert "backoff = self._fetcher_timeout" in inspect.getsource(Fetcher._get_actions_per_node)
    loop = inspect.getsource(Fetcher._fetch_requests_routine)
    assert "self._wait_consume_future, assignment.unassign_future" in loop and "resume_futures" in loop
    fetcher = SimpleNamespace(_fetch_max_wait_ms=1500, _fetcher_timeout=0.2)
    consumer = SimpleNamespace(_fetch_max_wait_ms=1500, _fetcher=fetcher)
    app = SimpleNamespace(consumer=SimpleNamespace(_thread=SimpleNamespace(_consumer=consumer)))
    eos.fetch_wait(app, eos.REBALANCE_FETCH_WAIT_MS)
    assert (fetcher._fetch_max_wait_ms, fetcher._fetcher_timeout) == (100, 0.1)
    eos.fetch_wait(app, eos.FAUST_FETCH_WAIT_MS)
    assert (fetcher._fetch_max_wait_ms, fetcher._fetcher_timeout) == (1500, 1.5)
