"""Alert delivery outcomes and message contents, against a local HTTP server (no Kafka needed)."""
import asyncio
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import aiohttp
import pytest

from schemas.rules import load_rules
from streams.worker.alerts import DELIVERED, PARKED, REFUSED, Alerts, evidence_words, signature, slack_message
from streams.config import DEFAULT_RULES, Settings
from helpers import verifier
from streams.topics import Topics



@pytest.fixture
def server():
    hits = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            hits.append(self.path)
            status = {"/bad": 400, "/down": 503, "/ok": 204}[self.path]
            self.send_response(status)
            self.end_headers()

        def log_message(self, *args):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", hits
    srv.shutdown()


HANDOFF = {"id": "h-1", "type": "pql.handoff", "subject": "acme", "data": {
    "account_id": "acme", "account_name": "Acme", "score": 80, "threshold": 60, "owner": "rep-7",
    "sla_due_at": "2026-11-23T11:00:00.000Z", "precedence": "pql_supersedes_mql",
    "mql": {"stage": "MQL", "owner": "rep-7"}, "milestones": ["team_invites", "crm_integration"],
    "evidence": {
        "team_invites": [{"messageId": f"m{i}", "event": "Invite Sent", "timestamp": f"2026-11-2{i}T10:00:00.000Z",
                          "properties": {}} for i in range(1, 5)],
        "crm_integration": [{"messageId": "m9", "event": "Integration Connected", "timestamp": "2026-11-23T10:00:00.000Z",
                             "properties": {"properties.integration": "salesforce"}}]}}}


def deliver(url: str, path: str, attempts: int = 3) -> str:
    s = Settings(kafka_bootstrap="127.0.0.1:1", webhook_url=url + path, webhook_secret="k", alert_attempts=attempts)
    alerts = Alerts(s, Topics.of(s), load_rules(DEFAULT_RULES), index=None)

    async def go():
        alerts.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2))
        try:
            return (await alerts.deliver(alerts.channels[0], json.dumps(HANDOFF).encode()))[0]
        finally:
            await alerts.session.close()

    try:
        return asyncio.run(go())
    finally:
        for c in (alerts.consumer, alerts.retries):
            c.close()


def test_a_refusal_is_not_retried(server):
    url, hits = server
    assert deliver(url, "/bad") == REFUSED and hits == ["/bad"]


def test_an_endpoint_that_stays_down_gets_every_attempt_then_the_alert_is_parked(server):
    url, hits = server
    assert deliver(url, "/down", attempts=3) == PARKED and hits == ["/down"] * 3


def test_any_2xx_is_delivered(server):
    url, hits = server
    assert deliver(url, "/ok") == DELIVERED and hits == ["/ok"]


def test_slack_message_reads_like_a_lead_for_a_rep():
    describe = {"team_invites": "Invited three distinct teammates within 7 days"}
    text = slack_message(HANDOFF, describe)["blocks"][0]["text"]["text"]
    assert "*Acme* (`acme`)" in text and "score 80/60" in text and "Owner: rep-7" in text
    assert "Invited three distinct teammates within 7 days (4 × Invite Sent in 3 days)" in text
    assert "crm_integration (Integration Connected; integration: salesforce)" in text
    assert "MQL stage MQL, owner rep-7 (PQL takes over the open MQL)" in text
    assert "Respond by 2026-11-23 11:00 UTC" in text and "pql respond h-1 --accept" in text


def test_evidence_words_and_signature():
    assert evidence_words([]) == ""
    assert signature(b"body", "k") == "sha256=" + hmac.new(b"k", b"body", "sha256").hexdigest()



def test_the_shipped_verifier_accepts_our_signature_and_refuses_replays_and_forgeries():
    from streams.worker.alerts import Channel

    verify = verifier()
    channel = Channel("webhook", "http://x", "s3cret")
    body, headers = channel.request(b'{"id":"e1","type":"pql.handoff"}', {"id": "e1", "type": "pql.handoff"}, {})
    sent = channel.signed(body, headers, now=1_800_000_000.4)["X-PQL-Webhook-Signature"]
    assert sent.startswith("t=1800000000,v1=")
    assert verify(body, sent, "s3cret", now=1_800_000_100)
    assert not verify(body, sent, "s3cret", now=1_800_000_301)        # replayed after the tolerance
    assert not verify(body, sent, "s3cret", now=1_799_999_699)        # or stamped in the future
    assert not verify(body + b" ", sent, "s3cret", now=1_800_000_000)  # body changed
    assert not verify(body, sent, "other", now=1_800_000_000)          # wrong secret
    forged = sent.replace("t=1800000000", "t=1800000200")               # fresher stamp, old MAC
    assert not verify(body, forged, "s3cret", now=1_800_000_200)
    assert not verify(body, "garbage", "s3cret") and not verify(body, "t=x,v1=00", "s3cret")
    rotated = f"{sent},v1={'0' * 64}"                                   # two signatures during a rotation
    assert verify(body, rotated, "s3cret", now=1_800_000_000)


def test_backfill_handoffs_are_indexed_not_alerted():
    from streams.worker.alerts import select

    class Msg:
        def __init__(self, topic, doc):
            self._topic, self._value = topic, json.dumps(doc, separators=(",", ":")).encode()

        def topic(self):
            return self._topic

        def value(self):
            return self._value

    fresh = Msg("h", {"id": "1", "subject": "a", "type": "pql.handoff", "data": {"backfill": False}})
    old = Msg("h", {"id": "2", "subject": "b", "type": "pql.handoff", "data": {"backfill": True}})
    breach = Msg("s", {"id": "3", "subject": "a", "type": "pql.sla_breached", "data": {}})
    stage = Msg("s", {"id": "4", "subject": "a", "type": "pql.stage", "data": {}})
    handoffs, todo = select([fresh, old, breach, stage], "h")
    assert [h["id"] for h in handoffs] == ["1", "2"] and todo == [fresh, breach]


def test_parked_alerts_due_together_are_sent_together_and_committed_per_partition():
    """After an outage hundreds of parked alerts fall due within seconds: they go out together, each
    not before its due time, and the retry topic's offsets are committed per partition."""
    import time as clock

    s = Settings(kafka_bootstrap="127.0.0.1:1", webhook_url="http://127.0.0.1:1/hook", webhook_secret="k")
    alerts = Alerts(s, Topics.of(s), load_rules(DEFAULT_RULES), index=None)
    now = int(clock.time() * 1000)

    class Msg:
        def __init__(self, partition, offset, due):
            self.p, self.o, self.due = partition, offset, due

        def topic(self):
            return "pql.alerts.retry"

        def partition(self):
            return self.p

        def offset(self):
            return self.o

        def value(self):
            return json.dumps({**HANDOFF, "id": f"h-{self.p}-{self.o}"}).encode()

        def headers(self):
            return [("pql.alert.channel", b"webhook"), ("pql.alert.round", b"1"),
                    ("pql.alert.due", str(self.due).encode())]

        def error(self):
            return None

    batch = [Msg(p, o, now - 1000) for o in range(20) for p in (0, 1)] + [Msg(0, 20, now + 400)]
    sent, commits = {}, []

    async def deliver(channel, raw):
        await asyncio.sleep(0.2)  # a slow endpoint: 41 one by one would take 8 s
        sent[json.loads(raw)["id"]] = clock.time() * 1000
        return DELIVERED, ""

    async def poll(consumer, n):
        alerts.running = bool(polls.pop()) if polls else False
        return batch if alerts.running else []

    async def flush():
        pass

    async def commit(consumer, **kw):
        commits.append(sorted((tp.partition, tp.offset) for tp in kw["offsets"]))

    polls = [1]
    alerts.deliver, alerts._poll, alerts._flush, alerts._commit = deliver, poll, flush, commit
    started = clock.time()
    try:
        asyncio.run(alerts._retry_loop())
    finally:
        for c in (alerts.consumer, alerts.retries, alerts.handoffs):
            c.close()
    assert len(sent) == 41 and clock.time() - started < 2.0
    assert sent["h-0-20"] >= now + 400  # not before its due time
    assert commits == [[(0, 20), (1, 20)], [(0, 21)]]


def test_an_alert_waits_for_the_handoff_index_only_briefly_while_redis_is_down(monkeypatch, caplog):
    """A Redis outage held every alert until Redis came back (chaos: 165 s after the endpoint recovered)."""
    import streams.worker.alerts as alerts_module

    class Down:
        def __init__(self):
            self.calls = 0

        async def index_handoffs(self, pairs):
            self.calls += 1
            await asyncio.sleep(3600)  # retrying for as long as Redis is down

    monkeypatch.setattr(alerts_module, "INDEX_WAIT", 0.05)
    s = Settings(kafka_bootstrap="127.0.0.1:1", webhook_url="http://127.0.0.1:1/hook", webhook_secret="k")
    index = Down()
    alerts = Alerts(s, Topics.of(s), load_rules(DEFAULT_RULES), index=index)
    started = time.perf_counter()
    asyncio.run(alerts._index_first([HANDOFF]))
    assert time.perf_counter() - started < 1.0 and index.calls == 1
    assert "alerting 1 handoffs before they are indexed" in caplog.text


def test_a_fenced_alerts_consumer_is_made_anew_not_left_silent():
    """A static member fenced after a node loss got only error messages for ever: alerts stopped."""
    from confluent_kafka import KafkaError

    from streams.worker.alerts import ConsumerGone

    class Msg:
        def __init__(self, err):
            self.err = err

        def error(self):
            return self.err

    class Fenced:
        def consume(self, n, timeout):
            return [Msg(KafkaError(KafkaError._FATAL, "Static consumer fenced by other consumer with same "
                                   "group.instance.id"))]

    class Transient(Fenced):
        def consume(self, n, timeout):
            return [Msg(KafkaError(KafkaError._TRANSPORT, "broker down")), Msg(None)]

    s = Settings(kafka_bootstrap="127.0.0.1:1", webhook_url="http://127.0.0.1:1/hook", webhook_secret="k")
    alerts = Alerts(s, Topics.of(s), load_rules(DEFAULT_RULES), index=None)
    with pytest.raises(ConsumerGone, match="fatal Kafka consumer error.*fenced"):
        asyncio.run(alerts._poll(Fenced(), 10))
    assert len(asyncio.run(alerts._poll(Transient(), 10))) == 1  # a transient error is skipped


def test_a_retry_consumer_whose_lag_does_not_move_is_reported(monkeypatch, caplog):
    from confluent_kafka import TopicPartition

    import streams.worker.monitor as monitor

    class Stuck:
        def assignment(self):
            return [TopicPartition("pql.alerts.retry", 0)]

        def position(self, tps):
            return [TopicPartition(tp.topic, tp.partition, 40) for tp in tps]

        def get_watermark_offsets(self, tp, cached=False):
            return 0, 43

    class Moving(Stuck):
        def __init__(self):
            self.at = 0

        def position(self, tps):
            self.at += 1
            return [TopicPartition(tp.topic, tp.partition, self.at) for tp in tps]

    monkeypatch.setattr(monitor, "STALL", 0.3)
    s = Settings(kafka_bootstrap="127.0.0.1:1", webhook_url="http://127.0.0.1:1/hook", webhook_secret="k")
    alerts = Alerts(s, Topics.of(s), load_rules(DEFAULT_RULES), index=None)
    for c in (alerts.consumer, alerts.retries, alerts.handoffs):
        c.close()
    alerts.consumer, alerts.retries, alerts.handoffs = Moving(), Stuck(), Moving()

    async def run():
        async def stop():
            await asyncio.sleep(1.0)
            alerts.running = False
        await asyncio.gather(alerts._watch(), stop())

    asyncio.run(run())
    said = [r.message for r in caplog.records if "has not moved" in r.message]
    assert said and all(m.startswith("alerts: alerts-retry has not moved") for m in said)
    assert "{0: (40, 43)}" in said[0] and "where our tasks wait" in said[0]


def test_a_failing_loop_stops_the_others_before_the_consumers_close():
    """gather left the other loops running on consumers `run` then closed (librdkafka may crash)."""
    from streams.worker.alerts import ConsumerGone

    s = Settings(kafka_bootstrap="127.0.0.1:1", webhook_url="http://127.0.0.1:1/hook", webhook_secret="k")
    alerts = Alerts(s, Topics.of(s), load_rules(DEFAULT_RULES), index=None)
    events = []

    class Fake:
        def subscribe(self, topics, **kw):
            pass

        def close(self):
            events.append("closed")

    for c in (alerts.consumer, alerts.retries, alerts.handoffs):
        c.close()
    alerts.consumer, alerts.retries, alerts.handoffs = Fake(), Fake(), Fake()

    async def fails():
        await asyncio.sleep(0.05)
        raise ConsumerGone("alerts: fatal Kafka consumer error: fenced")

    async def forever():
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            events.append("stopped")
            raise

    alerts._main, alerts._retry_loop, alerts._index_loop, alerts._watch = fails, forever, forever, forever
    started = time.perf_counter()
    with pytest.raises(ConsumerGone):
        asyncio.run(alerts.run())
    assert time.perf_counter() - started < 2
    assert events == ["stopped"] * 3 + ["closed"] * 3
