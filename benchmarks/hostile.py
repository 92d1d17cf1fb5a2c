"""Hostile input, live: good traffic mixed with hostile records on product.events, sales.responses
and crm.lifecycle, through one `pql worker` (its own Kafka and Redis, as in the chaos run).

    python -m benchmarks.hostile [--hostile 100000] [--good 50000] [--seed 1]

Checks: the worker stays up; the good events give the handoffs `pql replay` gives for them alone;
every hostile record that must be rejected is in pql.events.dlq with the reason expected for it
(matched by topic, partition and offset); the worker's memory. Prints the table for
benchmarks/RELIABILITY.md.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

from confluent_kafka import Producer

from benchmarks.chaos import observe
from streams.worker import dlq
from benchmarks.chaos.expect import replay
from benchmarks.chaos.faults import ROOT, Stack
from streams.produce import produce
from streams.tools.simulate import Simulator, key_of

GOOD = {"type": "track", "event": "Invite Sent", "messageId": "h", "timestamp": "2026-11-20T10:00:00Z",
        "userId": "hostile-u", "context": {"groupId": "hostile-acct"}, "properties": {"invitee_email": "a@b.c"}}
MB = 1_000_000


def doc(**changes) -> bytes:
    d = {**GOOD, **changes}
    return json.dumps({k: v for k, v in d.items() if v is not ...}).encode()


def event_kinds(rng: random.Random):
    """(kind, expected DLQ reason or None when the record is valid, make(i) -> bytes)."""
    good = doc()
    return [
        ("invalid JSON", "not_json", lambda i: rng.choice([b'{"type":"track",', b"]", b'{"a":}', b"\xff\xfe\x00",
                                                          b"", b"null null", b"{'single': 'quotes'}"])),
        ("truncated line", "not_json", lambda i: good[:rng.randrange(1, len(good) - 1)]),
        ("0.95 MB line", "too_large", lambda i: doc(messageId=f"big{i}", properties={"blob": "x" * 950_000})),
        ("huge property map (200 KB)", "too_large",
         lambda i: doc(messageId=f"map{i}", properties={f"k{n}": n for n in range(20_000)})),
        ("property map under the limit (50 KB)", None,
         lambda i: doc(event="Feature Used", messageId=f"okmap{i}", properties={f"k{n}": n for n in range(4_000)})),
        ("deep nesting (5,000 levels)", "not_json",
         lambda i: doc(messageId=f"deep{i}", properties={"d": "DEEP"}).replace(b'"DEEP"', b"[" * 5000 + b"]" * 5000)),
        ("NaN / Infinity", "not_json",
         lambda i: doc(messageId=f"nan{i}", properties={"used": 1, "limit": 1}).replace(b'"used": 1', b'"used": NaN')),
        ("lone surrogate", "not_json", lambda i: doc(messageId=f"sur{i}").replace(b"hostile-u", b"\\ud800x")),
        ("not an object", "not_object", lambda i: rng.choice([b"[1, 2]", b'"text"', b"42", b"true"])),
        ("unknown type", "unknown_type", lambda i: doc(type=rng.choice(["trak", "batch", "TRACK"]))),
        ("missing field", "missing_field",
         lambda i: doc(**{rng.choice(["type", "messageId", "timestamp", "event"]): ...})),
        ("wrong type in a field", "invalid_field",
         lambda i: doc(**rng.choice([{"userId": {"a": 1}}, {"context": "x"}, {"properties": [1]},
                                     {"event": {"e": 1}}, {"messageId": [1]}, {"anonymousId": [None]}]))),
        ("timestamp out of range or unparsable", "bad_timestamp",
         lambda i: doc(timestamp=rng.choice(["0001-01-01T00:00:00Z", "9999-12-31T00:00:00Z",
                                             "1969-12-31T23:59:59Z", 1e30, True, "last tuesday", {}]))),
        ("tab or control character in an id", "invalid_field",
         lambda i: rng.choice([doc(type="group", event=..., properties=..., groupId="acme\tcorp", traits={}),
                               doc(userId="u\u0001x", context={}),
                               doc(context={"groupId": "a\nb"})])),
        ("group/identify storm on one user", None,
         lambda i: doc(type=rng.choice(["group", "identify"]), event=..., properties=..., context={},
                       messageId=f"storm{i}", userId="storm-user", groupId=f"storm-acct-{i % 500}",
                       traits={"name": f"storm {i}", "employees": i})),
        ("duplicate messageId, another body", None,  # one account's invites, never 3 distinct: no handoff
         lambda i: doc(messageId=f"dup{i % 1000}", context={"groupId": "dup-acct"},
                       properties={"invitee_email": "same@dup.example", "n": i})),
    ]


def response_kinds(rng: random.Random):
    ok = {"handoff_id": "0" * 36, "account_id": "acct-000001", "status": "accepted", "timestamp": "2026-11-20T10:00:00Z"}

    def resp(**changes) -> bytes:
        d = {**ok, **changes}
        return json.dumps({k: v for k, v in d.items() if v is not ...}).encode()

    return [
        ("response: invalid JSON", "bad_response", lambda i: rng.choice([b"{", b"", b"\xff"])),
        ("response: bad status or reason", "bad_response",
         lambda i: rng.choice([resp(status="maybe"), resp(status="rejected"), resp(status="rejected", reason="other"),
                               resp(handoff_id=...), resp(timestamp="yesterday")])),
        ("response: unknown handoff", "unknown_handoff", lambda i: resp(handoff_id=f"nope-{i}")),
        ("response: 0.5 MB note", "too_large", lambda i: resp(note="n" * 500_000)),
    ]


def crm_kinds(rng: random.Random):
    return [
        ("CRM: invalid record", "bad_crm_record",
         lambda i: rng.choice([b"{", b"[]", json.dumps({"account_id": "", "stage": "MQL"}).encode(),
                               json.dumps({"account_id": "a", "stage": "Wizard"}).encode(),
                               json.dumps({"account_id": "a", "stage": "MQL", "owner": "o" * 100_000}).encode()])),
    ]


class Sent:
    """Where each hostile record landed (topic, partition, offset) and what reason it should get."""

    def __init__(self):
        self.expected: dict[tuple[str, str, str], tuple[str, str | None, bytes]] = {}
        self.failed = Counter()

    def callback(self, kind: str, reason: str | None, raw: bytes):
        def done(err, msg):
            if err is not None:
                self.failed[kind] += 1
            else:
                where = (msg.topic(), str(msg.partition()), str(msg.offset()))
                self.expected[where] = (kind, reason, observe.digest(raw[:dlq.KEEP]))
        return done

    def verdict(self, obs, where) -> str | None:
        """The reason the DLQ gave this record: found by where it was read, else by its bytes (a
        rejection made after routing, such as unknown_handoff, names the <app>-accounts envelope)."""
        return obs.dlq.get(where) or obs.dlq_values.get(self.expected[where][2])


def send(kafka: str, prefix: str, good: list[bytes], hostile: list[tuple[str, str, str | None, bytes]],
         seed: int, sent: Sent) -> float:
    """Hostile records at random places among the good ones, which keep their order; returns seconds
    taken."""
    p = Producer({"bootstrap.servers": kafka, "linger.ms": 5, "message.max.bytes": 2 * MB,
                  "queue.buffering.max.messages": 1_000_000, "queue.buffering.max.kbytes": 1_048_576})
    slots = set(random.Random(seed).sample(range(len(good) + len(hostile)), len(hostile)))
    g, h = iter(range(len(good))), iter(range(len(hostile)))
    order = [("h", next(h)) if n in slots else ("g", next(g)) for n in range(len(good) + len(hostile))]
    started = time.time()
    for n, (what, i) in enumerate(order):
        if what == "g":
            produce(p, prefix + "product.events", good[i], key=key_of(good[i]))
        else:
            topic, kind, reason, raw = hostile[i]
            produce(p, prefix + topic, raw, on_delivery=sent.callback(kind, reason, raw))
        if n % 1000 == 0:
            p.poll(0)
    p.flush(300)
    return time.time() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hostile", type=int, default=100_000)
    ap.add_argument("--good", type=int, default=50_000)
    ap.add_argument("--accounts", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--kafka-port", type=int, default=49092)
    ap.add_argument("--redis-port", type=int, default=46379)
    ap.add_argument("--web-port", type=int, default=46166)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    work = Path(tempfile.mkdtemp(prefix="hostile-", dir=ROOT / "benchmarks/out"))
    good = list(Simulator(accounts=a.accounts, seed=a.seed, bad_rate=0).events(a.good))
    (work / "good.jsonl").write_bytes(b"\n".join(good) + b"\n")
    rules = ROOT / "examples/rules.yaml"
    expected, _ = replay(work / "good.jsonl", rules)
    want = {i for i, (k, _, _) in expected.items() if k == "pql.handoff"}

    kinds = [("product.events", *k) for k in event_kinds(rng)] + \
            [("sales.responses", *k) for k in response_kinds(rng)] + [("crm.lifecycle", *k) for k in crm_kinds(rng)]
    weights = {"0.95 MB line": 0.004, "huge property map (200 KB)": 0.018, "property map under the limit (50 KB)": 0.036,
               "response: 0.5 MB note": 0.002}  # about 20, 100, 200 and 10 of 100,000
    hostile = []
    for i in range(a.hostile):
        topic, kind, reason, make = rng.choices(kinds, [weights.get(k[1], 1.0) for k in kinds])[0]
        hostile.append((topic, kind, reason, make(i)))

    stack = Stack(a.kafka_port, a.redis_port, ROOT / ".stack/chaos")
    stack.up()
    tag = f"hostile{a.seed}-{int(time.time())}"
    prefix = f"{tag}."
    env = {**os.environ, "PQL_KAFKA_BOOTSTRAP": stack.kafka, "PQL_REDIS_URL": stack.redis_url,
           "PQL_REDIS_PREFIX": f"{tag}:", "PQL_APP_ID": tag, "PQL_TOPIC_PREFIX": prefix, "PQL_RULES": str(rules),
           "PQL_WEB_PORT": str(a.web_port), "PQL_LOG_LEVEL": "info", "PQL_DATA_DIR": str(work / "data")}
    with open(work / "worker.log", "wb") as log:
        worker = subprocess.Popen([sys.executable, "-m", "streams.tools.cli", "worker"], cwd=ROOT, env=env,
                                  stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 90
        while not observe.ready(a.web_port) and time.time() < deadline:
            time.sleep(0.5)
        obs = observe.Observer(stack.kafka, [prefix + "pql.handoffs"], prefix + "pql.events.dlq", lambda d: None)
        obs.start()
        rss, sampling = [], True

        def sample():
            while sampling:
                mib = observe.rss_mib(worker.pid)
                if mib:
                    rss.append(mib)
                time.sleep(1)
        threading.Thread(target=sample, daemon=True).start()
        sent = Sent()
        took = send(stack.kafka, prefix, good, hostile, a.seed, sent)
        rejecting = [w for w, (_, r, _) in sent.expected.items() if r]
        end = time.time() + 300
        while time.time() < end and worker.poll() is None:
            if want <= set(obs.first) and all(sent.verdict(obs, w) for w in rejecting):
                break
            time.sleep(1)
        time.sleep(5)
        sampling = False
        print(report(sent, obs, want, worker, rss, took, a, len(good)))
    finally:
        if worker.poll() is None:
            worker.terminate()
            worker.wait(60)
        stack.down()


def report(sent: Sent, obs, want: set[str], worker, rss: list[float], took: float, a, n_good: int) -> str:
    per = defaultdict(lambda: [0, 0, Counter(), 0])  # kind -> sent, as expected, other reasons, not in DLQ
    for where, (kind, reason, _) in sent.expected.items():
        got = sent.verdict(obs, where)
        row = per[(kind, reason)]
        row[0] += 1
        if got == reason:  # None == None: a valid record that stayed out of the DLQ
            row[1] += 1
        elif got:
            row[2][got] += 1
        else:
            row[3] += 1
    lines = ["| hostile record | expected | sent | as expected | DLQ, other reason | not in DLQ |",
             "|---|---|---|---|---|---|"]
    for (kind, reason), (n, ok, other, none) in sorted(per.items()):
        others = ", ".join(f"{c:,} {r}" for r, c in other.items()) or "0"
        lines.append(f"| {kind} | {reason or 'valid: stays out of the DLQ'} | {n:,} | {ok:,} | {others} | "
                     f"{none if reason else '-'} |")
    seen = obs.ids("pql.handoff")
    dup = sum(1 for i in seen if obs.counts[i] > 1)
    lines += ["", f"- good events: {n_good:,}; handoffs expected (replay of the good events alone): {len(want):,}; "
              f"seen: {len(seen & want):,}; missing: {len(want - seen):,}; unexpected: {len(seen - want):,}; "
              f"duplicated: {dup:,}",
              f"- worker: {'alive' if worker.poll() is None else f'EXITED ({worker.returncode})'}; RSS "
              f"{(rss or [0])[0]:.0f} MiB at start, max {max(rss or [0]):.0f} MiB, {(rss or [0])[-1]:.0f} MiB at the end",
              f"- sent in {took:.1f} s; records the producer could not send: {dict(sent.failed) or 0}; "
              f"DLQ records: {obs.dlq_records:,} for {len(obs.dlq):,} distinct inputs"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
