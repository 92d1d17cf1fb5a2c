"""Small builders for engine tests: rules from dicts, events from keyword arguments."""
from __future__ import annotations

import io
import json
from datetime import datetime, timedelta, timezone

from detectors.engine import Engine
from schemas.events import parse_event
from schemas.rules import Rules
from streams.tools.replay import replay

T0 = datetime(2026, 11, 1, tzinfo=timezone.utc)


def at(**delta) -> str:
    """ISO timestamp T0 + delta, e.g. at(days=7)."""
    return (T0 + timedelta(**delta)).isoformat().replace("+00:00", "Z")


def rules(milestones: dict, score: int = 60, window: str = "30d", **extra) -> Rules:
    return Rules.model_validate(
        {"version": "v1", "milestones": milestones, "qualify": {"score": score, "window": window}, **extra}
    )


_n = [0]


def track(event: str, ts: str, account: str | None = "acme", user: str = "u1", mid: str | None = None,
          **props) -> dict:
    _n[0] += 1
    doc = {"type": "track", "event": event, "timestamp": ts, "userId": user,
           "messageId": mid or f"m{_n[0]}", "properties": props}
    if account:
        doc["context"] = {"groupId": account}
    return doc


def group(account: str, ts: str, user: str = "u1", mid: str | None = None, **traits) -> dict:
    _n[0] += 1
    return {"type": "group", "groupId": account, "timestamp": ts, "userId": user,
            "messageId": mid or f"g{_n[0]}", "traits": traits}


def run(r: Rules, docs: list, mql: dict | None = None, milestones: bool = False):
    """Replay docs through the engine; returns (list of output dicts, summary, stderr text)."""
    out, err = io.StringIO(), io.StringIO()
    lines = [(d if isinstance(d, (bytes, str)) else json.dumps(d)) for d in docs]
    lines = [ln.encode() if isinstance(ln, str) else ln for ln in lines]
    summary = replay(lines, Engine(r), mql or {}, out, err, milestones=milestones)
    return [json.loads(x) for x in out.getvalue().splitlines()], summary, err.getvalue()


def kinds(outputs: list) -> list[str]:
    return [o["type"] for o in outputs]


def event(doc: dict):
    return parse_event(json.dumps(doc))


def verifier():
    """examples/verify_webhook.py's `verify`, the function webhook receivers copy."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples/verify_webhook.py"
    spec = importlib.util.spec_from_file_location("verify_webhook", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.verify


def export_by_account(lines: list[bytes]) -> list[bytes]:
    """The JSON-object lines as a warehouse export sorted by account, then time, lists them: a call
    without `context.groupId` sorts under its userId (the row has no account), so a user's events come
    apart from their account's."""
    docs = [(json.loads(x), x) for x in lines if x.startswith(b"{") and x.endswith(b"}")]

    def key(dx):
        d = dx[0]
        return str(d.get("groupId") or (d.get("context") or {}).get("groupId") or d.get("userId")), str(d.get("timestamp"))
    return [x for _, x in sorted(docs, key=key)]
