"""Phase 2 of `detect` (streams/worker/publish.py): every write of an envelope goes into its source
partition's transaction, and memory follows only what went in. A fake transaction records sends."""
import asyncio
import json
from types import SimpleNamespace

from detectors.engine import Engine
from helpers import at, rules, track
from streams.config import Settings
from streams.topics import Topics
from streams.worker import envelope
from streams.worker.detect import Detect
from streams.worker.eos import PartitionMoved
from streams.worker.publish import Publisher
from streams.worker.tables import Tables

RULES = rules({"invites": {"event": "Invite Sent", "count": 3, "within": "7d", "points": 60}})
TOPICS = Topics.of(Settings())


class NoMql:
    async def get(self, account):
        return None, 0.0


class Tx:
    def __init__(self, move_at: int | None = None):
        self.sent, self.early, self.move_at, self.frozen, self.values = [], [], move_at, False, []

    async def send_all(self, sends, source, opens=True):
        for topic, key, value, headers, partition in sends:
            if self.move_at is not None and len(self.sent) == self.move_at:
                raise PartitionMoved()
            self.sent.append((topic, key, partition, source))
            self.values.append(value)

    def commit_soon(self, partition):
        self.early.append(partition)

    def catching_up(self, behind, interval):
        self.behind = (behind, interval)


def setup(tx):
    tables = Tables(*(SimpleNamespace(data={}) for _ in range(3)), app_id="app")
    detector = Detect(Engine(RULES), TOPICS, tables.accounts.data, tables.clocks.data, NoMql(),
                      users=tables.users.data, partitions=4)
    return tables, detector, Publisher(tx, TOPICS, tables, detector)


def qualifying_envelope(account: str) -> bytes:
    docs = [track("Invite Sent", at(hours=h), account=account) for h in (1, 2, 3)]
    (b,) = envelope.pack_all([(account, json.dumps(d).encode()) for d in docs])
    return b


def test_every_write_goes_into_the_source_partitions_transaction():
    tx = Tx()
    tables, detector, pub = setup(tx)
    p = envelope.partition_of("acme", 4)
    result = asyncio.run(detector.process(qualifying_envelope("acme"), p))
    assert asyncio.run(pub.publish(result, p, offset=41))
    assert TOPICS.handoffs in [s[0] for s in tx.sent]
    assert not any(s[0].endswith("-changelog") for s in tx.sent)  # table writes wait for the commit
    asyncio.run(pub.flush(None))
    topics = [s[0] for s in tx.sent]
    assert "app-accounts-changelog" in topics and "app-clocks-changelog" in topics
    assert all(partition == p and source == p for _, _, partition, source in tx.sent)
    assert json.loads(tables.accounts.data["acme"])["account_id"] == "acme"
    assert json.loads(tables.clocks.data[str(p)])  # the handoff's SLA clock
    assert pub.processed == {p: 42} and tx.early == [p]  # a handoff: commit this partition now


def test_a_key_written_by_several_envelopes_goes_to_its_changelog_once_per_commit_with_its_last_value():
    tx = Tx()
    tables, detector, pub = setup(tx)
    p = envelope.partition_of("acme", 4)
    for offset, hours in enumerate((1, 2, 3)):
        (body,) = envelope.pack_all([("acme", json.dumps(track("Page Viewed", at(hours=hours), account="acme")).encode())])
        assert asyncio.run(pub.publish(asyncio.run(detector.process(body, p)), p, offset))
    other = (p + 1) % 4
    asyncio.run(pub.flush({other}))  # a commit of another partition sends nothing of p's
    assert tx.sent == []
    asyncio.run(pub.flush({p}))
    written = [(s[0], s[1]) for s in tx.sent]
    assert written.count(("app-accounts-changelog", '"acme"')) == 1
    (value,) = [v for (t, k, _, _), v in zip(tx.sent, tx.values) if k == '"acme"']
    assert value == tables.accounts.data["acme"]  # the last value, as memory has it
    asyncio.run(pub.flush(None))  # sent once: nothing held any more
    assert len(tx.sent) == len(written)


def test_a_partition_given_up_leaves_no_trace_of_its_transaction():
    tx = Tx()
    tables, detector, pub = setup(tx)
    p = envelope.partition_of("acme", 4)
    assert asyncio.run(pub.publish(asyncio.run(detector.process(qualifying_envelope("acme"), p)), p, 0))
    assert p in pub.opened and p in pub.unsent
    pub.forget([q for q in range(4) if q != p])
    assert p not in pub.opened and p not in pub.unsent


def test_a_rollback_drops_the_table_writes_held_for_the_commit():
    tx = Tx()
    tx.app = SimpleNamespace(tables=SimpleNamespace(recovery=SimpleNamespace(revoke=lambda tp: None)))
    tables, detector, pub = setup(tx)
    p = envelope.partition_of("acme", 4)
    assert asyncio.run(pub.publish(asyncio.run(detector.process(qualifying_envelope("acme"), p)), p, 0))
    pub.rollback({p})
    asyncio.run(pub.flush(None))
    assert not any(s[0].endswith("-changelog") for s in tx.sent)


def test_writes_held_or_lost_to_a_move_are_named_for_the_rollback():
    """Publisher.held: partitions whose values in memory are not all in their transaction; a rebalance
    rolls them back (eos.Transactions.on_revoked)."""
    tx = Tx()
    tx.app = SimpleNamespace(tables=SimpleNamespace(recovery=SimpleNamespace(revoke=lambda tp: None)))
    tables, detector, pub = setup(tx)
    p = envelope.partition_of("acme", 4)
    assert asyncio.run(pub.publish(asyncio.run(detector.process(qualifying_envelope("acme"), p)), p, 0))
    assert pub.held() == {p}
    tx.move_at = len(tx.sent)  # the partition moves before its commit: the held writes are not sent
    asyncio.run(pub.flush(None))
    assert pub.unsent == {} and pub.held() == {p}
    pub.rollback({p})
    assert pub.held() == set() and "acme" not in tables.accounts.data


def test_nothing_is_published_while_a_rebalance_is_under_way():
    tx = Tx()
    tx.frozen = True
    tables, detector, pub = setup(tx)
    p = envelope.partition_of("acme", 4)
    assert not asyncio.run(pub.publish(asyncio.run(detector.process(qualifying_envelope("acme"), p)), p, 0))
    assert tables.accounts.data == {} and pub.unsent == {} and tx.sent == []


def test_a_partition_that_moves_mid_envelope_leaves_memory_untouched():
    tx = Tx(move_at=1)
    tables, detector, pub = setup(tx)
    p = envelope.partition_of("acme", 4)
    result = asyncio.run(detector.process(qualifying_envelope("acme"), p))
    assert not asyncio.run(pub.publish(result, p, offset=7))
    assert tables.accounts.data == {} and tables.clocks.data == {}
    assert pub.processed == {} and tx.early == [] and detector.parsed == {}


def test_lines_for_another_partition_are_forwarded_in_this_transaction_once_per_commit():
    """Identity's lines for another partition wait for the commit like table writes: two envelopes'
    lines for the same partition go as one envelope, in their order, into the source's transaction."""
    tx = Tx()
    tables, detector, pub = setup(tx)
    p = envelope.partition_of("acme", 4)
    other = (p + 1) % 4
    assert asyncio.run(pub.publish(asyncio.run(detector.process(qualifying_envelope("acme"), other)), other, 0))
    (body,) = envelope.pack_all([("acme", json.dumps(track("Page Viewed", at(hours=9), account="acme")).encode())])
    assert asyncio.run(pub.publish(asyncio.run(detector.process(body, other)), other, 1))
    assert not any(s[0] == TOPICS.accounts for s in tx.sent)  # not before the commit
    asyncio.run(pub.flush({other}))
    forwarded = [(s, v) for s, v in zip(tx.sent, tx.values) if s[0] == TOPICS.accounts]
    assert [(s[0], s[2], s[3]) for s, _ in forwarded] == [(TOPICS.accounts, p, other)]
    lines = list(envelope.unpack(forwarded[0][1]))
    assert len(lines) > 1 and json.loads(lines[-1][2])["event"] == "Page Viewed"  # the later envelope's last
    assert tables.accounts.data == {}
    asyncio.run(pub.flush(None))  # sent once
    assert len([s for s in tx.sent if s[0] == TOPICS.accounts]) == 1


def test_a_rollback_puts_memory_back_to_the_log_for_those_partitions_only():
    """Publisher.rollback (a rebalance aborts an open transaction): values and recovery offsets of the
    partition go; the others stay."""
    revoked = []
    tx = Tx()
    tx.app = SimpleNamespace(tables=SimpleNamespace(recovery=SimpleNamespace(revoke=revoked.append)))
    tables, detector, pub = setup(tx)
    accounts = {envelope.partition_of(a, 4): a for a in ("acme", "globex", "initech", "hooli", "umbrella")}
    (p, a), (q, b) = list(accounts.items())[:2]
    for part, account in ((p, a), (q, b)):
        assert asyncio.run(pub.publish(asyncio.run(detector.process(qualifying_envelope(account), part)), part, 1))
    for part in (p, q):  # what the partitions were told (the barrier) is ahead of their committed offsets
        asyncio.run(detector.process(next(envelope.pack_all([envelope.told(envelope.INPUT, 0, 5, 5)])), part))
    pub.rollback({p})
    assert p not in detector.heard.views and q in detector.heard.views
    assert a not in tables.accounts.data and b in tables.accounts.data
    assert str(p) not in tables.clocks.data and str(q) in tables.clocks.data
    assert {(tp.topic, tp.partition) for tp in revoked} == {(f"app-{t}-changelog", p) for t in ("accounts", "users", "clocks")}
    assert p not in pub.processed and q in pub.processed and p not in detector.stream


def test_a_line_without_an_account_is_keyed_by_its_users_group_call_in_the_file():
    import io
    import json

    from streams.tools.publish import user_accounts
    from streams.tools.simulate import key_of

    lines = [json.dumps(d).encode() for d in (
        {"type": "track", "event": "X", "userId": "u1", "messageId": "a"},
        {"type": "group", "groupId": "acme", "userId": "u1", "anonymousId": "n1", "messageId": "b"},
        {"type": "track", "event": "X", "anonymousId": "n1", "messageId": "c"},
        {"type": "track", "event": "X", "userId": "u2", "messageId": "d"})]
    users = user_accounts(io.BytesIO(b"\n".join(lines)))
    assert [key_of(x, users) for x in lines] == [b"acme", b"acme", b"acme", None]
    assert [key_of(x) for x in lines] == [None, b"acme", None, None]  # without the map: as before
