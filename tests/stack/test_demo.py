"""The demo (`make demo`'s program) runs end to end on the real stack and shows live handoffs."""
import os
import subprocess
import sys

from live import ROOT, free_port


def test_demo_prints_live_handoffs(kafka, redis_url):
    env = {**os.environ, "PQL_KAFKA_BOOTSTRAP": kafka, "PQL_REDIS_URL": redis_url, "PQL_DEMO_SECONDS": "10",
           "PQL_DEMO_RATE": "400", "PQL_WEB_PORT": str(free_port())}
    res = subprocess.run([sys.executable, "-m", "streams.tools.demo"], env=env, capture_output=True, text=True, cwd=ROOT,
                         timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr
    rows = [ln for ln in res.stdout.splitlines() if " pql_only " in ln or " pql_supersedes_mql " in ln]
    assert rows, res.stdout
    assert "summary:" in res.stdout and "event-to-handoff latency" in res.stdout
    handed = int(res.stdout.split("summary: ")[1].split(" handoffs")[0])
    assert handed == len(rows) > 0
    # the sales side: simulated answers and breaches show up as they happen, alerts reach the stand-in
    assert "sales: " in res.stdout and "alerts delivered to the local Slack stand-in" in res.stdout
    shown = [ln for ln in res.stdout.splitlines() if "accepted by" in ln or "rejected by" in ln
             or "SLA BREACHED" in ln]
    assert shown, res.stdout
    alerted = int(res.stdout.split("Slack stand-in: ")[1].split(" handoffs")[0])
    assert alerted == handed
