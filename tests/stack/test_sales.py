"""The sales side on the real stack: alerts to a local HTTP server, SLA clocks, responses."""
import hashlib
import hmac
import json
import threading
import time
from collections import Counter, defaultdict
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from helpers import verifier
from live import Env, free_port, kill9, publish, read, replay

SECRET = "s3cret"
RULES = """
version: "sales-1"
sla: {pql: %s}
fit: {traits: {employees: {gte: 10}}}
milestones:
  usage_limit:
    description: Used at least 80%% of a plan limit
    event: Usage Recorded
    ratio: {of: properties.used, to: properties.limit, at_least: 0.8}
    points: 60
qualify: {score: 60, window: 30d}
"""


class Endpoint:
    """Slack (/slack) and the webhook (/hook). Fails the first attempts of every alert: 2 for most
    (the in-process retries absorb them), 4 for every third (it must go through the retry topic),
    and the first attempt of every fifth answers after the client's timeout."""

    def __init__(self):
        self.requests = []          # (path, headers, body, status)
        self.attempts = Counter()
        self.lock = threading.Lock()
        self.port = free_port()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                eid = self.headers.get("X-PQL-Event-Id", "")
                with endpoint.lock:
                    endpoint.attempts[(self.path, eid)] += 1
                    n = endpoint.attempts[(self.path, eid)]
                bucket = int(hashlib.sha1(eid.encode()).hexdigest(), 16)
                fails = 4 if bucket % 3 == 0 else 2
                if n == 1 and bucket % 5 == 0:
                    time.sleep(1.5)  # longer than PQL_ALERT_TIMEOUT
                status = 503 if n <= fails else 200
                with endpoint.lock:
                    endpoint.requests.append((self.path, dict(self.headers), body, status))
                self.send_response(status)
                self.end_headers()
                self.wfile.write(b"ok" if status == 200 else b"try later")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def delivered(self, path: str) -> Counter:
        with self.lock:
            return Counter(h["X-PQL-Event-Id"] for p, h, _, s in self.requests if p == path and s == 200)

    def bodies(self, path: str) -> list:
        with self.lock:
            return [(h, b) for p, h, b, s in self.requests if p == path and s == 200]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


def now_iso(offset: float = 0.0) -> str:
    return datetime.fromtimestamp(time.time() + offset, timezone.utc).isoformat().replace("+00:00", "Z")


def qualifying(accounts: list[str], offset: float = 0.0) -> list[bytes]:
    out = []
    for a in accounts:
        base = {"userId": f"{a}-u", "timestamp": now_iso(offset)}
        out.append(json.dumps({**base, "type": "group", "groupId": a, "messageId": f"{a}-g",
                               "traits": {"name": f"Company {a}", "employees": 40}}).encode())
        out.append(json.dumps({**base, "type": "track", "event": "Usage Recorded", "messageId": f"{a}-u",
                               "context": {"groupId": a}, "properties": {"used": 95, "limit": 100}}).encode())
    return out


@pytest.fixture
def endpoint():
    e = Endpoint()
    yield e
    e.server.shutdown()


def make_env(kafka, redis_url, unique, tmp_path, sla: str) -> Env:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES % sla)
    return Env(kafka, redis_url, unique, tmp_path, rules=rules)


def worker_vars(endpoint: Endpoint) -> dict:
    return {"PQL_SLACK_WEBHOOK_URL": endpoint.url("/slack"), "PQL_WEBHOOK_URL": endpoint.url("/hook"),
            "PQL_WEBHOOK_SECRET": SECRET, "PQL_ALERT_TIMEOUT": "1", "PQL_ALERT_ATTEMPTS": "3",
            "PQL_ALERT_RETRY_DELAY": "1"}


def signals(env: Env, until, idle: float = 1.0, timeout: float = 90.0) -> list[dict]:
    msgs = read(env.kafka, [env.topic("pql.signals")], until=lambda m: until([json.loads(x.value()) for x in m]),
                idle=idle, timeout=timeout)
    return [json.loads(m.value()) for m in msgs]


def wait_for(check, timeout: float = 60.0, what: str = "condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def handed_off(env: Env, endpoint: Endpoint, n: int):
    """A worker, and n accounts that qualify: (the worker, {account: handoff id})."""
    w = env.start_worker(**worker_vars(endpoint))
    accounts = [f"acct-{i}" for i in range(n)]
    publish(env.kafka, env.topic("product.events"), qualifying(accounts))
    handoffs = {json.loads(m.value())["subject"]: json.loads(m.value())["id"] for m in
                read(env.kafka, [env.topic("pql.handoffs")], until=lambda m: len(m) >= n, idle=0.5)}
    assert sorted(handoffs) == accounts  # one handoff each
    return w, handoffs


def test_alerts_responses_and_sla_breaches(kafka, redis_url, unique, tmp_path, endpoint):
    env = make_env(kafka, redis_url, unique, tmp_path, sla="15s")
    try:
        w, handoffs = handed_off(env, endpoint, 6)

        # Responses: the CLI finds the account in Redis (indexed by the alerts task) or takes --account.
        ok = wait_for(lambda: env.pql("respond", handoffs["acct-0"], "--accept", "--by", "rep-1").returncode == 0,
                      what="pql respond to find the handoff in Redis")
        assert ok
        assert env.pql("respond", handoffs["acct-1"], "--reject", "not_icp", "--account", "acct-1").returncode == 0
        assert env.pql("respond", handoffs["acct-2"], "--accept").returncode == 0
        assert env.pql("respond", handoffs["acct-2"], "--convert").returncode == 0
        bad = env.pql("respond", handoffs["acct-3"], "--reject", "too_pricey")
        assert bad.returncode == 2 and "reason" in bad.stderr
        # a foreign producer's bad response goes to the DLQ, with the field named
        junk = json.dumps({"handoff_id": handoffs["acct-3"], "account_id": "acct-3", "status": "rejected",
                           "reason": "too_pricey", "timestamp": now_iso()}).encode()
        publish(env.kafka, env.topic("sales.responses"), [junk])

        # acct-3..5 get no answer in time: one breach each, stamped with the due time.
        got = signals(env, until=lambda s: sum(x["type"] == "pql.sla_breached" for x in s) >= 3, idle=4.0)
        breaches = [x for x in got if x["type"] == "pql.sla_breached"]
        assert sorted(x["subject"] for x in breaches) == ["acct-3", "acct-4", "acct-5"]
        assert all(x["time"] == x["data"]["sla_due_at"] for x in breaches)
        stages = defaultdict(list)
        for x in got:
            if x["type"] == "pql.stage":
                stages[x["subject"]].append(x["data"]["stage"])
        assert stages["acct-0"] == ["qualified", "handed_off", "accepted"]
        assert stages["acct-1"] == ["qualified", "handed_off", "rejected"]
        assert stages["acct-2"] == ["qualified", "handed_off", "accepted", "converted"]
        rejected = next(x for x in got if x["type"] == "pql.stage" and x["data"]["stage"] == "rejected")
        assert rejected["data"]["reason"] == "not_icp"

        # A late acceptance after the breach is still recorded.
        assert env.pql("respond", handoffs["acct-3"], "--accept").returncode == 0
        late = signals(env, until=lambda s: any(x["subject"] == "acct-3" and x["type"] == "pql.stage"
                                                and x["data"]["stage"] == "accepted" for x in s))
        accepted = [x for x in late if x["subject"] == "acct-3" and x["type"] == "pql.stage"
                    and x["data"]["stage"] == "accepted"]
        assert len(accepted) == 1 and accepted[0]["data"]["late"] is True

        dlq = read(env.kafka, [env.topic("pql.events.dlq")], until=lambda m: len(m) >= 1)
        h = dict(dlq[0].headers())
        assert dlq[0].value() == junk and h["pql.error.reason"] == b"bad_response"
        assert h["pql.error.detail"].decode().startswith("reason:")

        # Every handoff and every breach: exactly one delivered alert per channel, despite the failures.
        alert_ids = set(handoffs.values()) | {x["id"] for x in breaches}
        for path in ("/slack", "/hook"):
            wait_for(lambda: set(endpoint.delivered(path)) >= alert_ids, timeout=60, what=f"alerts on {path}")
        time.sleep(2)
        for path in ("/slack", "/hook"):
            assert endpoint.delivered(path) == Counter({i: 1 for i in alert_ids}), path
        assert max(endpoint.attempts.values()) >= 5  # some went through the retry topic
        verify = verifier()
        for headers, body in endpoint.bodies("/hook"):
            want = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
            assert headers["X-PQL-Signature"] == want
            assert verify(body, headers["X-PQL-Webhook-Signature"], SECRET)
            assert json.loads(body)["id"] == headers["X-PQL-Event-Id"]
        slack = {h["X-PQL-Event-Id"]: json.loads(b)["text"] for h, b in endpoint.bodies("/slack")}
        text = slack[handoffs["acct-4"]]
        assert "Company acct-4" in text and "acct-4" in text and "score 60/60" in text
        blocks = [json.loads(b)["blocks"][0]["text"]["text"] for h, b in endpoint.bodies("/slack")
                  if h["X-PQL-Event-Id"] == handoffs["acct-4"]][0]
        assert "Used at least 80% of a plan limit" in blocks and "used: 95" in blocks

        m = env.metrics(w)
        assert 'pql_sla_breaches_total{lane="pql"} 3.0' in m
        assert 'pql_rejections_total{reason="not_icp"} 1.0' in m
        assert 'pql_time_to_accept_seconds_count{lane="pql"} 3.0' in m
        assert f'pql_alerts_sent_total{{channel="webhook"}} {float(len(alert_ids))}' in m
        assert 'pql_alerts_deferred_total{channel="slack"}' in m

        # The backtest predicts all of it: the same events and responses, exported from the topics,
        # replayed with --responses give the worker's handoffs, stage events and breaches, byte for byte.
        def export(name: str, n: int) -> Path:
            path = tmp_path / f"{name}.jsonl"
            msgs = read(env.kafka, [env.topic(name)], until=lambda m: len(m) >= n, idle=0.5)
            path.write_bytes(b"".join(x.value() + b"\n" for x in msgs))
            return path

        events, answers = export("product.events", 12), export("sales.responses", 6)
        kinds = ("pql.handoff", "pql.stage", "pql.sla_breached")
        wanted = 6 + 12 + 5 + 3  # handoffs; qualified and handed_off; the 5 answers; breaches
        live = [m.value().decode() for m in read(
            env.kafka, [env.topic("pql.handoffs"), env.topic("pql.signals")], idle=1.0,
            until=lambda m: sum(json.loads(x.value())["type"] in kinds for x in m) >= wanted)
            if json.loads(m.value())["type"] in kinds]
        backtest = [x for x in replay(env, events, rules=tmp_path / "rules.yaml", milestones=True, now=now_iso(),
                                      responses=answers) if json.loads(x)["type"] in kinds]
        assert len(live) == wanted and sorted(live) == sorted(backtest)
    finally:
        env.stop_all()


def test_sla_clocks_survive_restarts_and_breach_once(kafka, redis_url, unique, tmp_path, endpoint):
    # 30 s: the answer must be timed before acct-0's due time even on a loaded CI machine, where the
    # worker's start, the four handoffs and the CLI's start took 12 s (a true breach, CI at f068830)
    env = make_env(kafka, redis_url, unique, tmp_path, sla="30s")
    try:
        w, ids = handed_off(env, endpoint, 4)
        assert env.pql("respond", ids["acct-0"], "--accept", "--account", "acct-0").returncode == 0
        time.sleep(2)  # the clocks (and the acceptance) are committed with their transactions
        kill9(w)  # before any clock runs out: the next worker must find them in the table
        w = env.start_worker(**worker_vars(endpoint))
        got = signals(env, until=lambda s: sum(x["type"] == "pql.sla_breached" for x in s) >= 3, idle=3.0)
        assert sorted(x["subject"] for x in got if x["type"] == "pql.sla_breached") == ["acct-1", "acct-2", "acct-3"]
        kill9(w)  # after the breaches: a restart must not breach again
        w = env.start_worker(**worker_vars(endpoint))
        env.wait_ready(w)
        time.sleep(4)  # four ticks of the recovered clocks
        got = signals(env, until=lambda s: True, idle=1.0)
        breaches = Counter(x["id"] for x in got if x["type"] == "pql.sla_breached")
        assert len(breaches) == 3 and set(breaches.values()) == {1}
        for path in ("/slack", "/hook"):  # receivers dedupe on X-PQL-Event-Id: one alert per id delivered
            want = set(ids.values()) | set(breaches)
            wait_for(lambda: set(endpoint.delivered(path)) >= want, timeout=60, what=f"alerts on {path}")
    finally:
        env.stop_all()


def test_a_backlog_is_published_flagged_without_alerts_or_clocks(kafka, redis_url, unique, tmp_path, endpoint):
    """A first start over events days old: their handoffs are backfill (no alert, no SLA clock), a
    fresh one in the same backlog is alerted and breaches; `pql replay --processed-at` predicts it."""
    env = make_env(kafka, redis_url, unique, tmp_path, sla="5s")
    try:
        old = [f"old-{i}" for i in range(3)]
        env.create_topic("product.events", 1)
        publish(env.kafka, env.topic("product.events"), qualifying(old, offset=-3 * 86400) + qualifying(["fresh"]))
        w = env.start_worker(**worker_vars(endpoint))
        live = read(env.kafka, [env.topic("pql.handoffs")], until=lambda m: len(m) >= 4, idle=0.5)
        handoffs = {json.loads(m.value())["subject"]: json.loads(m.value()) for m in live}
        assert {a: h["data"]["backfill"] for a, h in handoffs.items()} == {**{a: True for a in old}, "fresh": False}
        fresh = handoffs["fresh"]["id"]
        got = signals(env, until=lambda s: any(x["type"] == "pql.sla_breached" for x in s), idle=8.0)
        assert [x["subject"] for x in got if x["type"] == "pql.sla_breached"] == ["fresh"]  # old ones have no clock
        breach = next(x["id"] for x in got if x["type"] == "pql.sla_breached")
        for path in ("/slack", "/hook"):
            wait_for(lambda: set(endpoint.delivered(path)) >= {fresh, breach}, timeout=60, what=f"alerts on {path}")
        time.sleep(2)
        for path in ("/slack", "/hook"):
            assert set(endpoint.delivered(path)) == {fresh, breach}, path
        assert "pql_handoffs_backfill_total 3.0" in env.metrics(w)
        events = tmp_path / "events.jsonl"
        events.write_bytes(b"".join(m.value() + b"\n" for m in read(env.kafka, [env.topic("product.events")],
                                                                      until=lambda m: len(m) >= 8, idle=0.5)))
        res = env.pql("replay", str(events), "--rules", str(tmp_path / "rules.yaml"), "--processed-at", "now")
        assert res.returncode == 0, res.stderr
        assert sorted(res.stdout.splitlines()) == sorted(m.value().decode() for m in live)
        assert "handoffs:        4 (3 backfill)" in res.stderr
    finally:
        env.stop_all()
