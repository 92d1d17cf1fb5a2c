"""Metrics, Prometheus config and alert rules, Grafana dashboard (tests/stack/test_prometheus.py scrapes a
real worker)."""
import json
import re
import subprocess
from pathlib import Path

from streams.worker import metrics

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "deploy" / "prometheus"


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


def test_no_created_series():
    metrics.events_consumed.labels("track").inc()
    metrics.mql_lookup.observe(0.001)
    text = metrics.render().decode()
    assert "pql_events_consumed_total" in text and "_created" not in text


def test_a_quiet_worker_does_not_build_debug_records():
    """At warn, Faust's spinner would set the root logger to DEBUG (a record per aiokafka send)."""
    import logging

    import faust

    from streams.worker.app import make_worker

    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        make_worker(faust.App("pql-logging-test"), "WARNING")._setup_logging()
        assert not logging.getLogger("aiokafka.producer.producer").isEnabledFor(logging.DEBUG)
    finally:
        root.setLevel(level)
        root.handlers[:] = handlers
