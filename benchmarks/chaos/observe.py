"""What the chaos run sees: the output topics (read_committed), a sales rep answering handoffs, the
alert endpoint, the workers' memory."""
from __future__ import annotations

import hashlib
import heapq
import json
import threading
import time
import urllib.request
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from confluent_kafka import Consumer, Producer

from detectors.timefmt import iso, parse_ms


class Observer(threading.Thread):
    """Reads pql.handoffs, pql.signals and the DLQ from the start, read_committed: each CloudEvent's
    count, type, event time and when it was first seen; new handoffs go to `on_handoff`."""

    def __init__(self, kafka: str, topics: list[str], dlq: str, on_handoff):
        super().__init__(daemon=True)
        self.kafka, self.topics, self.dlq_topic, self.on_handoff = kafka, topics, dlq, on_handoff
        self.counts: Counter = Counter()
        self.first: dict[str, float] = {}      # id -> wall clock first seen
        self.kind: dict[str, str] = {}
        self.time: dict[str, float] = {}       # id -> the event's `time`, seconds
        self.docs: dict[str, bytes] = {}       # id -> the CloudEvent as first seen
        self.subject: dict[str, str] = {}      # id -> its account
        self.dlq: dict[tuple, str] = {}        # (topic, partition, offset) of a rejected input -> reason
        self.dlq_values: dict[bytes, str] = {}  # digest of a rejected record's (kept) bytes -> reason
        self.dlq_records = 0
        self.running = True

    def run(self) -> None:
        c = Consumer({"bootstrap.servers": self.kafka, "group.id": f"chaos-observer-{time.time_ns()}",
                      "auto.offset.reset": "earliest", "isolation.level": "read_committed",
                      "enable.auto.commit": False})
        c.subscribe([*self.topics, self.dlq_topic])
        try:
            while self.running:
                for m in c.consume(1000, timeout=0.2):
                    if m.error() is None:
                        self._seen(m)
        finally:
            c.close()

    def _seen(self, m) -> None:
        if m.topic() == self.dlq_topic:  # at-least-once: a rejected input may be there twice
            h = {k: v.decode(errors="replace") for k, v in m.headers() or []}
            where = (h.get("pql.error.topic"), h.get("pql.error.partition"), h.get("pql.error.offset"))
            self.dlq[where] = self.dlq_values[digest(m.value())] = h.get("pql.error.reason", "?")
            self.dlq_records += 1
            return
        doc = json.loads(m.value())
        i = doc["id"]
        self.counts[i] += 1
        if i not in self.first:
            self.first[i], self.kind[i], self.time[i] = time.time(), doc["type"], parse_ms(doc["time"]) / 1000
            self.docs[i] = m.value()
            self.subject[i] = doc.get("subject", "")
            if doc["type"] == "pql.handoff":
                self.on_handoff(doc)

    def write(self, path: Path) -> None:
        """Every CloudEvent seen, with its count and when it was first seen (for a closer look)."""
        with open(path, "wb") as f:
            for i, raw in self.docs.items():
                f.write(b'{"count":%d,"seen":%.3f,"event":%s}\n' % (self.counts[i], self.first[i], raw))

    def ids(self, kind: str) -> set[str]:
        return {i for i, k in self.kind.items() if k == kind}


def digest(value: bytes | None) -> bytes:
    return hashlib.blake2b(value or b"", digest_size=16).digest()


def answers(handoff_id: str) -> str | None:
    """The rep's answer, a pure function of the handoff id: accept a third, reject a third, let a
    third breach its SLA."""
    return [None, "accepted", "rejected"][int(handoff_id[:8], 16) % 3]


class Responder(threading.Thread):
    """A sales rep: answers a handoff `after` seconds past its qualifying event, on sales.responses."""

    def __init__(self, kafka: str, topic: str, after: float):
        super().__init__(daemon=True)
        self.topic, self.after = topic, after
        self.producer = Producer({"bootstrap.servers": kafka, "enable.idempotence": True, "linger.ms": 5})
        self.due: list[tuple[float, str, dict]] = []
        self.sent: list[dict] = []
        self.lock = threading.Lock()
        self.running = True

    def on_handoff(self, doc: dict) -> None:
        status = answers(doc["id"])
        if status is None or doc["data"].get("backfill"):
            return
        at = parse_ms(doc["time"]) / 1000 + self.after
        answer = {"handoff_id": doc["id"], "account_id": doc["data"]["account_id"], "status": status,
                  "by": "chaos-rep"}
        if status == "rejected":
            answer["reason"] = "bad_timing"
        with self.lock:
            heapq.heappush(self.due, (at, doc["id"], answer))

    def run(self) -> None:
        while self.running:
            with self.lock:
                ready = []
                while self.due and self.due[0][0] <= time.time():
                    ready.append(heapq.heappop(self.due))
            for _, _, answer in ready:
                answer["timestamp"] = iso(int(time.time() * 1000))
                self.producer.produce(self.topic, json.dumps(answer).encode(), key=answer["account_id"].encode())
                self.sent.append(answer)
            self.producer.poll(0.1)
        self.producer.flush(60)

    def write(self, path: Path) -> None:
        path.write_text("".join(json.dumps(a) + "\n" for a in self.sent))


class Endpoint:
    """The alert webhook: `mode` "ok" (200), "500", or "hang" (holds each request until the mode changes).
    Records when each event id was first delivered (answered 200)."""

    def __init__(self):
        self.mode = "ok"
        self.delivered: dict[str, float] = {}
        self.requests = Counter()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                endpoint.requests[endpoint.mode] += 1
                hung = endpoint.mode == "hang"
                while endpoint.mode == "hang":
                    time.sleep(0.2)
                if hung or endpoint.mode == "500":  # the sender gave up on a hung request long ago
                    self.send_response(500)
                else:
                    endpoint.delivered.setdefault(self.headers.get("X-PQL-Event-Id", "?"), time.time())
                    self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.mode = "ok"
        self.server.shutdown()


def rss_mib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def ready(port: int) -> bool:
    """A worker's /ready answers 200."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2):
            return True
    except OSError:
        return False
