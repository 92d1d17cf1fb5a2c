"""Locked-down infrastructure: Kafka with SASL (SCRAM-SHA-512) and Redis with a password.

The test Kafka has a SASL_PLAINTEXT listener (conftest: Kafka port + 2); a SCRAM user is created here
with the admin API. Redis with `requirepass` is started here on a free port. With the right
credentials the worker and the CLI work; with wrong ones each fails fast, naming the setting, and
no secret appears in any output, log, metric or dead letter.
"""
import json
import shutil
import subprocess
import time
import uuid

import pytest
from confluent_kafka.admin import AdminClient, ScramCredentialInfo, ScramMechanism, UserScramCredentialUpsertion

from conftest import SASL_PORT
from live import Env, free_port, read

PASSWORD = "kafka-" + uuid.uuid4().hex      # unique strings, so a leak is found by search
REDIS_PASSWORD = "redis-" + uuid.uuid4().hex


@pytest.fixture
def scram_user(kafka, unique):
    user = f"pql-{unique}"
    admin = AdminClient({"bootstrap.servers": kafka})
    cred = UserScramCredentialUpsertion(user, ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, 4096),
                                        PASSWORD.encode())
    for f in admin.alter_user_scram_credentials([cred]).values():
        f.result(timeout=30)
    time.sleep(1)  # the credential reaches the listener through the metadata log
    return user


@pytest.fixture
def locked_redis(tmp_path):
    port = free_port()
    proc = subprocess.Popen([shutil.which("redis-server"), "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                             "--appendonly", "no", "--requirepass", REDIS_PASSWORD, "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 10
    while subprocess.run(["redis-cli", "-p", str(port), "-a", REDIS_PASSWORD, "--no-auth-warning", "ping"],
                         capture_output=True, text=True).stdout.strip() != "PONG":
        assert time.time() < deadline, "redis-server with a password did not start"
        time.sleep(0.1)
    yield port
    proc.terminate()
    proc.wait(10)


def secure_env(kafka, unique, tmp_path, user, redis_port, password=PASSWORD, redis_password=REDIS_PASSWORD) -> Env:
    env = Env(f"127.0.0.1:{SASL_PORT}", f"redis://:{redis_password}@127.0.0.1:{redis_port}/0", unique, tmp_path)
    env.vars.update({"PQL_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "PQL_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
                     "PQL_KAFKA_SASL_USERNAME": user, "PQL_KAFKA_SASL_PASSWORD": password})
    return env


def events(account: str) -> list[str]:
    base = {"userId": f"{account}-u", "timestamp": "2026-11-24T09:00:00Z"}
    return [json.dumps({**base, "type": "group", "groupId": account, "messageId": f"{account}-g",
                        "traits": {"employees": 40}}),
            json.dumps({**base, "type": "track", "event": "Usage Recorded", "messageId": f"{account}-u",
                        "context": {"groupId": account}, "properties": {"used": 95, "limit": 100}}),
            "not json: goes to the DLQ"]


def test_worker_and_cli_with_sasl_and_a_redis_password(kafka, unique, tmp_path, scram_user, locked_redis):
    env = secure_env(kafka, unique, tmp_path, scram_user, locked_redis)
    try:
        assert env.pql("mql", "set", "acme", "--stage", "MQL", "--owner", "rep-7").returncode == 0
        got = env.pql("mql", "get", "acme")
        assert got.returncode == 0 and json.loads(got.stdout)["owner"] == "rep-7"
        w = env.start_worker()
        time.sleep(8)  # topics created by the worker, through the SASL listener
        f = tmp_path / "events.jsonl"
        f.write_text("\n".join(events("acme")) + "\n")
        sent = env.pql("publish", str(f))
        assert sent.returncode == 0, sent.stderr
        handoff = env.pql("tail", "pql.handoffs", "-n", "1", "--timeout", "60")
        assert handoff.returncode == 0 and handoff.stdout, handoff.stderr
        h = json.loads(handoff.stdout)
        assert h["data"]["owner"] == "rep-7" and h["data"]["precedence"] == "pql_supersedes_mql"  # read Redis
        answered = env.pql("respond", h["id"], "--accept", "--account", "acme")
        assert answered.returncode == 0, answered.stderr
        dlq = read(kafka, [env.topic("pql.events.dlq")], until=lambda m: len(m) >= 1, idle=0.5)
        metrics = env.metrics(w)
        env.stop_all()
        outputs = [sent.stdout, sent.stderr, handoff.stderr, answered.stdout, answered.stderr, metrics,
                   open(w.log_path).read(), *(json.dumps([(k, v.decode()) for k, v in m.headers()]) for m in dlq)]
        for secret in (PASSWORD, REDIS_PASSWORD):
            assert not any(secret in text for text in outputs)
    finally:
        env.stop_all()


def test_wrong_credentials_fail_fast_naming_the_setting(kafka, unique, tmp_path, scram_user, locked_redis):
    wrong = "wrong-" + uuid.uuid4().hex
    env = secure_env(kafka, unique, tmp_path, scram_user, locked_redis, password=wrong)
    f = tmp_path / "events.jsonl"
    f.write_text("\n".join(events("acme")) + "\n")
    for args in (["worker"], ["publish", str(f)], ["tail", "pql.handoffs"], ["respond", "h", "--accept", "--account", "a"]):
        started = time.time()
        res = env.pql(*args)
        assert res.returncode == 2, (args, res.stdout, res.stderr)
        assert time.time() - started < 30, args
        assert "PQL_KAFKA_SASL_PASSWORD" in res.stderr and wrong not in res.stderr + res.stdout, res.stderr
    env = secure_env(kafka, unique, tmp_path, scram_user, locked_redis, redis_password=wrong)
    for args in (["worker"], ["mql", "get", "acme"], ["mql", "set", "acme", "--stage", "MQL"]):
        res = env.pql(*args)
        assert res.returncode == 2 and "PQL_REDIS_URL" in res.stderr, (args, res.stderr)
        assert wrong not in res.stderr + res.stdout and "***" in res.stderr
