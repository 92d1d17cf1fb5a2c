"""A real Prometheus scrapes a real worker."""
import json
import subprocess
import time
import urllib.parse
import urllib.request

from live import ROOT, Env, free_port, publish, replay

PROM = ROOT / "deploy" / "prometheus"


def _query(port: int, expr: str) -> float | None:
    url = f"http://127.0.0.1:{port}/api/v1/query?query={urllib.parse.quote(expr)}"
    with urllib.request.urlopen(url, timeout=5) as r:
        res = json.loads(r.read())["data"]["result"]
    return float(res[0]["value"][1]) if res else None


def test_real_prometheus_scrapes_the_worker(promtools, kafka, redis_url, unique, tmp_path):
    env = Env(kafka, redis_url, unique, tmp_path)
    worker = env.start_worker()
    lines = [json.dumps({"type": "group", "groupId": f"obs-{i}", "userId": f"u{i}", "messageId": f"g{i}",
                         "timestamp": "2026-11-20T10:00:00Z", "traits": {"employees": 50}}).encode() for i in range(5)]
    lines += [json.dumps({"type": "track", "event": "Integration Connected", "messageId": f"t{i}",
                          "timestamp": "2026-11-20T11:00:00Z", "context": {"groupId": f"obs-{i}"},
                          "properties": {"integration": "hubspot"}}).encode() for i in range(5)]
    lines += [json.dumps({"type": "track", "event": "Usage Recorded", "messageId": f"u{i}",
                          "timestamp": "2026-11-20T12:00:00Z", "context": {"groupId": f"obs-{i}"},
                          "properties": {"used": 95, "limit": 100}}).encode() for i in range(3)]
    events = tmp_path / "events.jsonl"
    events.write_bytes(b"\n".join(lines) + b"\n")
    handoffs = sum('"pql.handoff"' in x for x in replay(env, events))
    assert handoffs == 3
    port = free_port()
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text((PROM / "local.yml").read_text().replace("127.0.0.1:6066", f"127.0.0.1:{worker.web_port}")
                   .replace("  - alerts.yml", f"  - {PROM / 'alerts.yml'}").replace("scrape_interval: 5s", "scrape_interval: 1s"))
    prom = subprocess.Popen(["prometheus", f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                            stderr=open(tmp_path / "prometheus.log", "w"))
    try:
        publish(kafka, env.topic("product.events"), lines)
        want = {"sum(pql_events_consumed_total)": len(lines), "sum(pql_handoffs_published_total)": handoffs,
                "sum(pql_events_consumed_total{type=\"group\"})": 5, "pql_rules_info": 1}
        got, deadline = {}, time.time() + 90
        while time.time() < deadline and got != want:
            time.sleep(1)
            try:
                got = {q: _query(port, q) for q in want}
            except OSError:
                continue
        assert got == want, f"Prometheus saw {got}"
        assert _query(port, 'up{job="pql-worker"}') == 1
    finally:
        prom.terminate()
        prom.wait(20)
        env.stop_all()
