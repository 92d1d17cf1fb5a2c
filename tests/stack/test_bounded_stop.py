"""A stop is bounded (issue 24): SIGTERM, then the broker goes away; the worker still exits within
PQL_SHUTDOWN_TIMEOUT (plus the time the stop takes to notice), with code 0 when its graceful stop
finished or 1 when the timeout cut it short. Its own Kafka (ports 28092/28093/28094, below the
ephemeral range, 32768-60999 here, which any client connection may hold: a fresh-clone run found
47092 'Address already in use' once, session 21), stopped here."""
import os
import signal
import subprocess
import time

import pytest

from conftest import ROOT
from live import Env

PORT = 28092
TIMEOUT = 10


@pytest.fixture
def own_kafka(redis_url):
    env = {**os.environ, "PQL_KAFKA_PORT": str(PORT), "PQL_KAFKA_CONTROLLER_PORT": str(PORT + 1),
           "PQL_REDIS_PORT": str(PORT + 2), "PQL_STACK_DIR": str(ROOT / ".stack" / "stop-test"),
           "PQL_KAFKA_HEAP": "512m"}

    def stack(cmd: str) -> None:
        res = subprocess.run([str(ROOT / "deploy/stack.sh"), cmd], env=env, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr

    stack("down")
    stack("up")
    try:
        yield f"127.0.0.1:{PORT}", lambda: stack("down-kafka")
    finally:
        stack("down")


def test_sigterm_then_the_broker_goes_away_the_worker_still_exits_in_time(own_kafka, redis_url, unique, tmp_path):
    kafka, stop_kafka = own_kafka
    env = Env(kafka, redis_url, unique, tmp_path, partitions=64)
    env.vars["PQL_SHUTDOWN_TIMEOUT"] = str(TIMEOUT)
    worker = env.start_worker()
    env.wait_ready(worker, timeout=180)
    worker.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    time.sleep(1)  # (issue 24 measured the hang with the broker stopping a second after the signal)
    stop_kafka()  # the broker goes away while the worker stops (as in a node drain)
    try:
        code = worker.wait(TIMEOUT + 30)
    except subprocess.TimeoutExpired:
        worker.kill()
        pytest.fail(f"the worker was still stopping {time.monotonic() - signalled:.0f} s after SIGTERM")
    took = time.monotonic() - signalled
    log = open(worker.log_path).read()
    assert took <= TIMEOUT + 15, took
    assert code == 0 or (code == 1 and "did not stop within PQL_SHUTDOWN_TIMEOUT" in log), (code, log[-2000:])
