"""Alerts: every pql.handoff and every pql.sla_breached, to Slack and/or a signed JSON webhook.

A task of its own in the worker, with its own consumer group (`<app>-alerts`, read_committed), so a
slow endpoint never stalls detection. Per record and channel: up to PQL_ALERT_ATTEMPTS attempts with
backoff (PQL_ALERT_TIMEOUT each); still failing, the record goes to `pql.alerts.retry` and is tried
again PQL_ALERT_RETRY_DELAY later, as often as it takes. An endpoint that refuses the request (a 4xx
other than 408/429) will not change its mind: that alert goes to the DLQ with the reason. Offsets are
committed only once every record of a batch is delivered or parked, so nothing is dropped.

Every request carries `X-PQL-Event-Id` (the CloudEvent id): after a crash or a rebalance an alert can
be sent again, and receivers dedupe on it. The webhook's body is the CloudEvent itself, signed with
PQL_WEBHOOK_SECRET at each attempt: `X-PQL-Webhook-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256
of "<t>." + body>` (examples/verify_webhook.py verifies it), and, deprecated, the body-only
`X-PQL-Signature: sha256=<hex HMAC-SHA256 of the body>`, which a captured request can replay.

Handoffs are also indexed in Redis (handoff id -> account), so `pql respond ID` needs no account.
A backfill handoff (`data.backfill`: its qualifying event was older than PQL_ALERT_MAX_AGE when it
was decided, e.g. the first run over days of history) is indexed but not alerted.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from dataclasses import dataclass

from detectors.timefmt import iso, parse_ms
from schemas.rules import Rules
from streams.mqlstore import AsyncMqlStore
from streams.topics import Topics
from streams.worker import dlq, metrics
from streams.worker.ingest import fatal
from streams.worker.kafka import partitions_named, poll

log = logging.getLogger("pql.alerts")
BREACH = b'"type":"pql.sla_breached"'
DELIVERED, PARKED, REFUSED = "delivered", "parked", "refused"
POLL = 0.5  # s a poll waits for a first message (a message ends it at once): an idle task wakes twice a second
INDEX_WAIT = 2.0  # seconds an alert waits for the handoff index while Redis is unreachable


def signature(body: bytes, secret: str) -> str:
    """The deprecated body-only signature (X-PQL-Signature): kept for receivers that check it."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def timed_signature(body: bytes, secret: str, t: int) -> str:
    """X-PQL-Webhook-Signature: the timestamp is signed with the body, so a request cannot be replayed
    outside the receiver's tolerance."""
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def select(msgs: list, handoffs_topic: str) -> tuple[list[dict], list]:
    """The handoffs among `msgs` (to index for `pql respond`), and the messages to alert: handoffs
    that are not a backfill (qualifying event older than PQL_ALERT_MAX_AGE) and SLA breaches."""
    handoffs, todo = [], []
    for m in msgs:
        if m.topic() == handoffs_topic:
            h = json.loads(m.value())
            handoffs.append(h)
            if not h.get("data", {}).get("backfill"):
                todo.append(m)
        elif BREACH in (m.value() or b""):
            todo.append(m)
    return handoffs, todo


def _when(text: str | None) -> str:
    return f"{iso(parse_ms(text))[:16].replace('T', ' ')} UTC" if text else "-"


def _span(ms: float) -> str:
    s = ms / 1000
    for unit, size in (("day", 86400), ("hour", 3600), ("min", 60)):
        if s >= size:
            n = round(s / size)
            return f"{n} {unit}{'s' if n != 1 and unit != 'min' else ''}"
    return f"{s:.0f} s"


def evidence_words(evidence: list[dict]) -> str:
    """'4 × Invite Sent in 3 days; integration: salesforce' from a milestone's evidence rows."""
    if not evidence:
        return ""
    names: dict[str, int] = {}
    for e in evidence:
        names[e["event"]] = names.get(e["event"], 0) + 1
    times = [parse_ms(e["timestamp"]) for e in evidence]
    parts = [" → ".join(names) if len(names) > 1 else
             (f"{len(evidence)} × {evidence[0]['event']}" if len(evidence) > 1 else evidence[0]["event"])]
    if len(evidence) > 1 and max(times) > min(times):
        parts[0] += f" in {_span(max(times) - min(times))}"
    shown: dict[str, list] = {}
    for e in evidence:
        for path, v in e.get("properties", {}).items():
            vals = shown.setdefault(path.rsplit(".", 1)[-1], [])
            if v not in vals:
                vals.append(v)
    parts += [f"{k}: {', '.join(map(str, v[:5]))}" for k, v in shown.items()]
    return "; ".join(parts)


def slack_message(ce: dict, describe: dict[str, str]) -> dict:
    """Slack incoming-webhook payload a rep can act on."""
    d = ce["data"]
    account = f"*{d.get('account_name') or d['account_id']}* (`{d['account_id']}`)"
    if ce["type"] == "pql.sla_breached":
        text = (f":alarm_clock: SLA breached: the handoff of {account} got no answer by {_when(d['sla_due_at'])} "
                f"(handed off {_when(d['handed_off_at'])}). Handoff `{d['handoff_id']}`.")
        return {"text": text, "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": text}}]}
    owner = d.get("owner") or "unassigned"
    mql = d.get("mql")
    context = (f"MQL stage {mql['stage']}" + (f", owner {mql['owner']}" if mql.get("owner") else "")
               + (" (PQL takes over the open MQL)" if d.get("precedence") == "pql_supersedes_mql" else "")
               if mql else "no MQL on record")
    lines = [f"• {describe.get(m, m)} ({evidence_words(d['evidence'].get(m, []))})" for m in d["milestones"]]
    text = (f":rocket: New PQL: {account}, score {d['score']}/{d['threshold']}. Owner: {owner}. "
            f"Respond by {_when(d['sla_due_at'])}.")
    body = "\n".join([text, *lines, f"CRM: {context}.", f"Handoff `{ce['id']}`: "
                      f"`pql respond {ce['id']} --accept` or `--reject REASON`"])
    return {"text": text, "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": body}}]}


@dataclass(frozen=True)
class Channel:
    name: str
    url: str
    secret: str | None = None

    def request(self, raw: bytes, ce: dict, describe: dict[str, str]) -> tuple[bytes, dict]:
        headers = {"X-PQL-Event-Id": ce["id"], "X-PQL-Event-Type": ce["type"]}
        if self.name == "slack":
            body = json.dumps(slack_message(ce, describe)).encode()
            return body, {**headers, "Content-Type": "application/json"}
        headers["Content-Type"] = "application/cloudevents+json"
        headers["X-PQL-Signature"] = signature(raw, self.secret or "")
        return raw, headers

    def signed(self, body: bytes, headers: dict, now: float) -> dict:
        """The headers of one attempt: webhook requests get a signature with this attempt's time."""
        if self.name == "slack":
            return headers
        return {**headers, "X-PQL-Webhook-Signature": timed_signature(body, self.secret or "", int(now))}


class ConsumerGone(Exception):
    """A consumer of the alerts task can no longer work (librdkafka's fatal error): the task makes
    its clients anew (Task.run) and re-reads what it had not committed."""


class Refused(Exception):
    """The endpoint refused the request for good (a 4xx other than 408/429)."""


class Alerts:
    def __init__(self, settings, topics: Topics, rules: Rules, index: AsyncMqlStore):
        from confluent_kafka import Consumer, Producer

        s = settings
        self.s, self.topics, self.index = s, topics, index
        self.describe = {mid: m.description or mid for mid, m in rules.milestones.items()}
        self.channels = [Channel("slack", s.slack_webhook_url)] if s.slack_webhook_url else []
        if s.webhook_url:
            self.channels.append(Channel("webhook", s.webhook_url, s.webhook_secret))
        conf = s.confluent()
        common = {**conf, "enable.auto.commit": False, "auto.offset.reset": "earliest",
                  # range, as the ingest tier: with cooperative-sticky, a static member restarted under
                  # its PQL_INSTANCE_ID was often assigned nothing, and its partitions stayed with no
                  # consumer until a later rebalance (parked alerts waited minutes: cluster chaos)
                  "isolation.level": "read_committed", "partition.assignment.strategy": "range",
                  "session.timeout.ms": int(s.session_timeout * 1000),
                  # a fetch with nothing to return waits up to 500 ms on the broker; a commit marker ends
                  # it at once (2-14 ms from commit to delivery with 5 s, session 20). 50 ms cost an idle
                  # worker at 256 partitions ~2 % of a core in librdkafka's threads (three consumers).
                  "fetch.wait.max.ms": 500}

        def member(group: str) -> dict:  # static membership with PQL_INSTANCE_ID: a restarted worker
            # takes its partitions back, and the others' deliveries do not stop for a rebalance
            return {"group.id": f"{s.app_id}-{group}",
                    **({"group.instance.id": f"{s.instance_id}-{group}"} if s.instance_id else {})}

        self.consumer = Consumer({**common, **member("alerts")})
        self.retries = Consumer({**common, **member("alerts-retry"), "max.poll.interval.ms": 600_000})
        # the handoff index for `pql respond`, kept apart so that slow deliveries never delay it
        self.handoffs = Consumer({**common, **member("index")})
        self.producer = Producer({**conf, "enable.idempotence": True, "linger.ms": 5})
        self.running = True
        self.session = None
        self.limit = asyncio.Semaphore(16)

    async def run(self) -> None:
        import aiohttp

        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.s.alert_timeout))
        names = ", ".join(c.name for c in self.channels) or "none (handoffs are only indexed)"
        log.info("alerts: channels %s", names)
        for c, topics, group in ((self.consumer, [self.topics.handoffs, self.topics.signals], "alerts"),
                                 (self.retries, [self.topics.alerts_retry], "alerts-retry"),
                                 (self.handoffs, [self.topics.handoffs], "index")):
            c.subscribe(topics, on_assign=lambda _, tps, g=group: log.info("alerts: %s assigned %s", g, partitions_named(tps)),
                        on_revoke=lambda _, tps, g=group: log.info("alerts: %s revoked %s", g, partitions_named(tps)))
        loops = [asyncio.ensure_future(x) for x in (self._main(), self._retry_loop(), self._index_loop(), self._watch())]
        try:  # the first loop to end (a failure, or the stop) ends the others before their consumers close
            done, _ = await asyncio.wait(loops, return_when=asyncio.FIRST_COMPLETED)
            for loop in done:
                loop.result()
        finally:
            for loop in loops:
                loop.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
            await asyncio.sleep(POLL + 0.1)  # a poll running in a thread (POLL s at most) ends before its consumer closes
            await self.session.close()
            for c in (self.consumer, self.retries, self.handoffs):
                c.close()
            self.producer.flush(10)

    async def _watch(self) -> None:
        """Say so when a consumer of the task has lag that has not moved for STALL seconds, with where
        the task waits (parked alerts of two retry partitions waited for minutes: cluster chaos seed 2)."""
        from streams.worker.monitor import STALL, Unmoved, waits

        still = Unmoved()
        while self.running:
            await asyncio.sleep(STALL / 3)
            for name, c in (("alerts", self.consumer), ("alerts-retry", self.retries), ("index", self.handoffs)):
                try:  # in a thread: get_watermark_offsets waits while the consumer's poll runs in another
                    lag = await asyncio.get_running_loop().run_in_executor(None, _lag, c)
                except Exception:  # no statistics yet, or the consumer is being made anew
                    continue
                now = time.monotonic()
                if (waited := still.seconds(name, lag, now, moving=not lag)) >= STALL:
                    log.warning("alerts: %s has not moved for %.0f s (partition: (position, end) %s); where our "
                                "tasks wait: %s", name, waited, lag, waits())
                    still.again(name, now)

    async def _poll(self, consumer, n: int) -> list:
        msgs = await poll(consumer, n, POLL)
        for m in msgs:
            if m.error() is not None and fatal(m.error()):  # a static member fenced after a node loss
                raise ConsumerGone(f"alerts: fatal Kafka consumer error: {m.error()}")
        return [m for m in msgs if m.error() is None]

    async def _main(self) -> None:
        while self.running:
            msgs = await self._poll(self.consumer, 500)
            if not msgs:
                continue
            handoffs, todo = select(msgs, self.topics.handoffs)
            if handoffs:
                await self._index_first(handoffs)
            await asyncio.gather(*(self._first(m, c) for m in todo for c in self.channels))
            await self._flush()
            await self._commit(self.consumer)

    async def _index_first(self, handoffs: list[dict]) -> None:
        """Index before alerting, so that `pql respond ID` finds what the rep was sent; but for at most
        INDEX_WAIT s: while Redis is down an alert goes out without it (it names the account, and
        `_index_loop` writes the index once Redis is back). Waiting held alerts for a whole outage."""
        try:
            await asyncio.wait_for(self.index.index_handoffs([(h["id"], h["subject"]) for h in handoffs]), INDEX_WAIT)
        except asyncio.TimeoutError:
            log.warning("alerts: Redis unreachable for %.0f s; alerting %d handoffs before they are indexed "
                        "(`pql respond` needs --account until Redis is back)", INDEX_WAIT, len(handoffs))

    async def _index_loop(self) -> None:
        """handoff id -> account in Redis as soon as a handoff is readable, committed once written: every
        handoff is indexed, Redis outages included (`_main` also indexes each one before its alert)."""
        while self.running:
            msgs = await self._poll(self.handoffs, 500)
            if msgs:
                handoffs = [json.loads(m.value()) for m in msgs]
                await self.index.index_handoffs([(h["id"], h["subject"]) for h in handoffs])
                await self._commit(self.handoffs)

    async def _first(self, m, channel: Channel) -> None:
        """A fresh alert: deliver, or park it on the retry topic, or dead-letter it."""
        outcome, detail = await self.deliver(channel, m.value())
        if outcome == PARKED:
            self._park(m.value(), channel.name, 1)
        elif outcome == REFUSED:
            self._dead(m, channel.name, detail)

    async def _retry_loop(self) -> None:
        """Parked alerts, each when its due time comes; those due together are sent together (after an
        outage, hundreds are due within seconds of each other: one by one, they took minutes)."""
        while self.running:
            msgs = await self._poll(self.retries, 100)
            due: list = []
            for m in msgs:
                wait = _due(m) / 1000 - time.time()
                if wait > 0 and due:  # send what is due before waiting for the next
                    await self._retry(due)
                    due = []
                while wait > 0 and self.running:
                    await asyncio.sleep(min(wait, 0.5))
                    wait = _due(m) / 1000 - time.time()
                if not self.running:
                    return
                due.append(m)
            if due:
                await self._retry(due)

    async def _retry(self, msgs: list) -> None:
        """Deliver these parked alerts together; then their offsets are committed."""
        by_name = {c.name: c for c in self.channels}

        async def one(m) -> None:
            h = {k: v.decode() for k, v in (m.headers() or [])}
            channel = by_name.get(h.get("pql.alert.channel", ""))
            if channel is None:  # that channel is no longer configured: say so, keep the record
                self._dead(m, h.get("pql.alert.channel", "?"), "channel not configured any more")
                return
            outcome, detail = await self.deliver(channel, m.value())
            if outcome == PARKED:
                self._park(m.value(), channel.name, int(h.get("pql.alert.round", "1")) + 1)
            elif outcome == REFUSED:
                self._dead(m, channel.name, detail)

        from confluent_kafka import TopicPartition

        await asyncio.gather(*(one(m) for m in msgs))
        await self._flush()
        last = {(m.topic(), m.partition()): m.offset() for m in msgs}  # (in offset order per partition)
        await self._commit(self.retries, offsets=[TopicPartition(t, p, o + 1) for (t, p), o in last.items()])

    async def deliver(self, channel: Channel, raw: bytes) -> tuple[str, str]:
        """Up to PQL_ALERT_ATTEMPTS attempts with backoff. (outcome, detail of the last failure)."""
        ce = json.loads(raw)
        body, headers = channel.request(raw, ce, self.describe)
        started, detail, delay = time.perf_counter(), "", 0.2
        async with self.limit:
            for attempt in range(1, self.s.alert_attempts + 1):
                try:
                    await self._post(channel, body, channel.signed(body, headers, time.time()))
                    metrics.alerts_sent.labels(channel.name).inc()
                    metrics.alert_seconds.labels(channel.name).observe(time.perf_counter() - started)
                    return DELIVERED, ""
                except Refused as err:
                    metrics.alerts_failed.labels(channel.name).inc()
                    log.warning("alert %s to %s refused: %s", ce["id"], channel.name, err)
                    return REFUSED, str(err)
                except Exception as err:  # timeouts, connection errors, 5xx, 408, 429
                    metrics.alerts_failed.labels(channel.name).inc()
                    detail = f"{type(err).__name__}: {err}"[:300]
                    if attempt < self.s.alert_attempts:
                        await asyncio.sleep(delay)
                        delay = min(delay * 3, 5.0)
        log.warning("alert %s to %s failed %d times (%s); parked on %s", ce["id"], channel.name,
                    self.s.alert_attempts, detail, self.topics.alerts_retry)
        return PARKED, detail

    async def _post(self, channel: Channel, body: bytes, headers: dict) -> None:
        async with self.session.post(channel.url, data=body, headers=headers) as resp:
            if resp.status < 300:
                return
            text = (await resp.text())[:200]
            if 400 <= resp.status < 500 and resp.status not in (408, 429):
                raise Refused(f"HTTP {resp.status}: {text}")
            raise RuntimeError(f"HTTP {resp.status}: {text}")

    async def _commit(self, consumer, **kw) -> None:
        """Commit and wait for the broker, in a thread: the event loop (detection) never waits on it."""
        from confluent_kafka import KafkaException

        try:
            await asyncio.get_running_loop().run_in_executor(None, lambda: consumer.commit(asynchronous=False, **kw))
        except KafkaException as err:  # e.g. a rebalance moved the partitions: their new owner resends
            if fatal(err.args[0]):
                raise ConsumerGone(f"alerts: fatal Kafka consumer error: {err}") from None
            log.info("alerts: offsets not committed (%s); those alerts may be sent again (X-PQL-Event-Id)", err)

    def _park(self, raw: bytes, channel: str, rnd: int) -> None:
        metrics.alerts_deferred.labels(channel).inc()
        due = int((time.time() + self.s.alert_retry_delay) * 1000)
        key = json.loads(raw)["id"].encode()
        self.producer.produce(self.topics.alerts_retry, raw, key=key, headers=[
            ("pql.alert.channel", channel.encode()), ("pql.alert.round", str(rnd).encode()),
            ("pql.alert.due", str(due).encode())], on_delivery=self._acked)

    def _dead(self, m, channel: str, detail: str) -> None:
        metrics.events_invalid.labels("alert_refused").inc()
        value, headers = dlq.record(m.value(), m.topic(), m.partition(), m.offset(), "alert_refused",
                                    f"{channel}: {detail}")
        self.producer.produce(self.topics.dlq, value, key=m.key(), headers=headers, on_delivery=self._acked)

    def _acked(self, err, msg) -> None:
        if err is not None:
            raise RuntimeError(f"alerts could not write to {msg.topic()}: {err}")

    async def _flush(self) -> None:
        while self.producer.flush(0) > 0:
            await asyncio.sleep(0.005)


class Task:
    """The worker's alerts task. A failing alert path must not stop detection: it is restarted, and
    re-reads what it had not committed."""

    def __init__(self, settings, topics: Topics, rules: Rules, index: AsyncMqlStore):
        self.args = settings, topics, rules, index

    async def run(self) -> None:
        while True:
            try:
                await Alerts(*self.args).run()
                return
            except asyncio.CancelledError:
                raise
            except ConsumerGone as err:
                log.error("%s; making the alerts task's clients anew", err)
                metrics.clients_recreated.inc()
                await asyncio.sleep(1)
            except Exception:
                log.exception("alerts task failed; restarting it in 5 s")
                await asyncio.sleep(5)


def _due(m) -> int:
    """When a parked alert is due (ms), from its `pql.alert.due` header."""
    for k, v in m.headers() or []:
        if k == "pql.alert.due":
            return int(v.decode())
    return 0


def _lag(c) -> dict[int, tuple[int, int]]:
    """partition -> (position, end) of the consumer's partitions with lag (ends as of the last fetch)."""
    lag = {}
    for tp in c.position(c.assignment()):
        _, high = c.get_watermark_offsets(tp, cached=True)
        if tp.offset >= 0 and high > tp.offset:
            lag[tp.partition] = (tp.offset, high)
    return lag
