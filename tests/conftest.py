"""Shared fixtures. tests/unit/ needs no services; tests/stack/ gets a real Kafka and a real Redis.

The test stack runs on its own ports (PQL_TEST_KAFKA_PORT=29092, PQL_TEST_REDIS_PORT=26379) and
data dir (.stack/test), so it never touches a demo stack. It is started once per session if it is
not running, and stopped at the end if this session started it (PQL_TEST_KEEP_STACK=1 keeps it).
Each test gets unique topic names, app ids and Redis key prefixes.
"""
from __future__ import annotations

import os
import socket
import subprocess
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
KAFKA_PORT = int(os.environ.get("PQL_TEST_KAFKA_PORT", "29092"))
REDIS_PORT = int(os.environ.get("PQL_TEST_REDIS_PORT", "26379"))
SASL_PORT = KAFKA_PORT + 2  # the test Kafka's SASL_PLAINTEXT (SCRAM-SHA-512) listener
STACK_DIR = ROOT / ".stack" / "test"


def _stack(cmd: str) -> None:
    env = {
        **os.environ,
        "PQL_KAFKA_PORT": str(KAFKA_PORT),
        "PQL_KAFKA_CONTROLLER_PORT": str(KAFKA_PORT + 1),
        "PQL_KAFKA_SASL_PORT": str(SASL_PORT),
        "PQL_REDIS_PORT": str(REDIS_PORT),
        "PQL_STACK_DIR": str(STACK_DIR),
        "PQL_KAFKA_HEAP": "768m",
    }
    res = subprocess.run([str(ROOT / "deploy" / "stack.sh"), cmd], env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"deploy/stack.sh {cmd} failed:\n{res.stderr}")


def _running() -> bool:
    return (STACK_DIR / "kafka" / "kafka.pid").exists() and (STACK_DIR / "redis" / "redis.pid").exists() and all(
        _port_open(p) for p in (KAFKA_PORT, REDIS_PORT, SASL_PORT)
    )


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="session")
def promtools():
    """prometheus and promtool on PATH (deploy/stack.sh tools fetches them)."""
    res = subprocess.run([str(ROOT / "deploy/stack.sh"), "tools"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


@pytest.fixture(scope="session")
def stack():
    """A running real Kafka + Redis; yields (bootstrap, redis_url)."""
    started = False
    if not _running():
        _stack("down")  # e.g. a kept stack from before the SASL listener
        _stack("up")
        started = True
    yield f"127.0.0.1:{KAFKA_PORT}", f"redis://127.0.0.1:{REDIS_PORT}/0"
    if started and os.environ.get("PQL_TEST_KEEP_STACK") != "1":
        _stack("down")


@pytest.fixture(scope="session")
def kafka(stack) -> str:
    return stack[0]


@pytest.fixture(scope="session")
def redis_url(stack) -> str:
    return stack[1]


@pytest.fixture
def unique() -> str:
    """A short id to suffix topics, app ids and key prefixes with."""
    return uuid.uuid4().hex[:10]


@pytest.fixture
def make_topics(kafka):
    """make_topics(name, ..., partitions=N): create topics on the real broker."""
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": kafka})

    def make(*names: str, partitions: int = 1) -> None:
        futures = admin.create_topics([NewTopic(n, partitions, 1) for n in names], operation_timeout=30)
        for f in futures.values():
            f.result(timeout=30)

    return make


def pytest_collection_modifyitems(items):
    """Everything under tests/stack/ needs the stack (and nothing under tests/unit/ may ask for it)."""
    for item in items:
        needs = {"stack", "kafka", "redis_url", "make_topics"} & set(getattr(item, "fixturenames", ()))
        if "stack" in Path(str(item.fspath)).parent.name:
            item.add_marker("stack")
        elif needs:
            raise pytest.UsageError(f"{item.nodeid} uses {sorted(needs)}: it belongs in tests/stack/")
