"""Metrics, Prometheus config and alert rules, Grafana dashboard; a real Prometheus scrapes a real worker."""
import json
import re
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from live import Env, free_port, publish, replay
from streams import metrics

ROOT = Path(__file__).resolve().parent.parent
PROM = ROOT / "deploy" / "prometheus"


@pytest.fixture(scope="session")
def promtools():
    res = subprocess.run([str(ROOT / "deploy/stack.sh"), "tools"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def exported() -> set[str]:
    """Names Prometheus sees, derived from the metric families (labelled ones have no samples yet)."""
    names = set()
    for family in metrics.REGISTRY.collect():
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}.get(family.type, [""])
        names.update(family.name + suffix for suffix in suffixes)
    return names


def test_metric_names_follow_the_conventions():
    for family in metrics.REGISTRY.collect():
        assert family.name.startswith("pql_"), family.name
        if family.type == "histogram":
            assert family.name.endswith("_seconds"), family.name
        labels = {label for s in family.samples for label in s.labels}
        assert not labels & {"account", "account_id", "user", "user_id", "email"}, family.name


def test_promtool_accepts_config_and_rules(promtools):
    for cfg in ("prometheus.yml", "local.yml"):
        res = subprocess.run(["promtool", "check", "config", str(PROM / cfg)], capture_output=True, text=True)
        assert res.returncode == 0, res.stdout + res.stderr
    res = subprocess.run(["promtool", "check", "rules", str(PROM / "alerts.yml")], capture_output=True, text=True)
    assert res.returncode == 0 and "SUCCESS" in res.stdout, res.stdout + res.stderr


def test_dashboard_queries_name_exported_metrics():
    dash = json.loads((ROOT / "deploy/grafana/dashboards/pql-pipeline.json").read_text())
    names = exported()
    assert len(dash["panels"]) >= 8
    for panel in dash["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            used = set(re.findall(r"\bpql_[a-z_]+", target["expr"]))
            assert used, target["expr"]
            for name in used:
                assert name in names, f"{panel['title']}: {name} is not exported"
    shown = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
    for wanted in ("pql_events_consumed_total", "pql_consumer_lag", "pql_event_to_handoff_seconds_bucket",
                   "pql_handoffs_suppressed_total", 'stage="accepted"', 'stage="converted"',
                   "pql_sla_breaches_total", "pql_rejections_total", "pql_alerts_sent_total"):
        assert wanted in shown, f"the dashboard shows nothing of {wanted}"


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
