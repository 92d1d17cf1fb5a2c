"""A generated history with a known difference between two rule files (tests of `pql backtest`)."""
import json

from detectors.engine import Engine
from helpers import at, rules, track
from streams.tools import backtest as bt

INVITES = {"event": "Invite Sent", "distinct": "properties.invitee_email", "count": 3, "within": "7d", "points": 60}
CRM = {"event": "Integration Connected", "where": {"properties.integration": {"in": ["salesforce", "hubspot"]}},
       "points": 60}
CURRENT = rules({"invites": INVITES, "crm": CRM})
# the candidate: two invites are enough, HubSpot no longer counts
CANDIDATE = rules({"invites": {**INVITES, "count": 2},
                   "crm": {**CRM, "where": {"properties.integration": {"in": ["salesforce"]}}}}).model_copy(
    update={"version": "v2"})


def invites(account: str, day: int, n: int) -> list[dict]:
    return [track("Invite Sent", at(days=day, hours=h), account, invitee_email=f"{h}@{account}.io") for h in range(n)]


def history() -> list[bytes]:
    docs = []
    for a in ("a1", "a2", "a3"):          # 2026-W45: three invites, both hand off
        docs += invites(a, 1, 3)
    for b in ("b1", "b2"):                # 2026-W46: two invites, only the candidate hands off
        docs += invites(b, 8, 2)
    docs.append(track("Integration Connected", at(days=15), "c1", integration="hubspot"))     # W47: only current
    docs.append(track("Integration Connected", at(days=15), "d1", integration="salesforce"))  # W47: both
    return [json.dumps(d).encode() for d in docs]


def backtest(responses=(), period=(None, None)) -> dict:
    return bt.run(history(), ("current.yaml", CURRENT), ("candidate.yaml", CANDIDATE), Engine, {}, list(responses), period)
