"""Synthetic product-usage traffic: Segment events for N accounts, deterministic for a seed.

The mix: every account sends a `group` call and everyday noise (page views, features used); some
accounts invite teammates, some approach a plan limit, some complete the activation workflow, some
connect an integration. Most never qualify. A few events are sent twice, a few are malformed, and
some track calls carry no `context.groupId` (they resolve through the user's group call). With
`late_group`, that share of accounts send no `context.groupId` at all and their users' group calls
come only after their first few events (sign up, invite, then the app calls `group`).
"""
from __future__ import annotations

import json
import random
import time
from datetime import datetime, timezone
from typing import Iterator

from detectors.timefmt import iso

WORDS = ["Acme", "Globex", "Initech", "Umbrella", "Hooli", "Stark", "Wayne", "Wonka", "Tyrell", "Soylent",
         "Cyberdyne", "Aperture", "Vandelay", "Pied Piper", "Massive", "Dunder", "Oscorp", "Gringotts"]
NOISE = ["Feature Used", "Dashboard Viewed", "Report Exported", "Search Performed", "Settings Updated"]
ACTIVATION = ["Source Connected", "Job Run", "Results Viewed"]
GROWING = 0.1  # share of accounts whose team grows (seat growth)
INTEGRATIONS = ["salesforce", "hubspot", "slack", "github", "jira"]
# persona -> share of accounts
PERSONAS = [("browser", 0.55), ("inviter", 0.12), ("limit", 0.10), ("activator", 0.10), ("integrator", 0.08),
            ("champion", 0.05)]


def _persona(rng: random.Random) -> str:
    x, acc = rng.random(), 0.0
    for name, share in PERSONAS:
        acc += share
        if x < acc:
            return name
    return PERSONAS[0][0]


START = datetime(2026, 11, 16, tzinfo=timezone.utc)  # the default history's first day


def start_by_now(span_ms: int, now: datetime | None = None) -> datetime:
    """START, or, when a history of `span_ms` from START would reach past now, the start that ends it
    at the start of today (UTC): a history in the future waits for the wall clock (issue 23)."""
    now = now or datetime.now(timezone.utc)
    if START.timestamp() * 1000 + span_ms <= now.timestamp() * 1000:
        return START
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    return datetime.fromtimestamp((today.timestamp() * 1000 - span_ms) // 1000, timezone.utc)


class Simulator:
    def __init__(self, accounts: int = 1000, seed: int = 7, start: datetime | None = None,
                 span_ms: int = 7 * 86_400_000, dup_rate: float = 0.01, bad_rate: float = 0.005,
                 live: bool = False, late_group: float = 0.0):
        self.rng = random.Random(seed)
        late = random.Random(seed + 1)  # its own stream: late_group=0 leaves the events as they were
        self.late = [late.random() < late_group for _ in range(accounts)]
        seats = random.Random(seed + 2)  # accounts whose team grows: more people sign in over time
        self.growing = [seats.random() < GROWING for _ in range(accounts)]
        self.n = accounts
        self.start = int((start or START).timestamp() * 1000)
        self.span = span_ms
        self.dup_rate, self.bad_rate = dup_rate, bad_rate
        self.personas = [_persona(self.rng) for _ in range(accounts)]
        self.progress = [0] * accounts  # per-account step in its story
        self.seq = 0
        self.prefix = f"s{seed}-"  # messageIds differ between seeds
        self.live = live  # stamp events with the wall clock (for live demos and latency runs)

    def account(self, i: int) -> str:
        return f"acct-{i:06d}"

    def _doc(self, i: int, ms: int, user: int, kind: str, **fields) -> dict:
        self.seq += 1
        doc = {"type": kind, "messageId": f"{self.prefix}{self.seq:09d}", "timestamp": iso(ms),
               "userId": f"{self.account(i)}-u{user}", **fields}
        return doc

    def _track(self, i: int, ms: int, event: str, **props) -> dict:
        user = self.rng.randrange(self.team(i))
        doc = self._doc(i, ms, user, "track", event=event, properties=props)
        if self.rng.random() < 0.9 and not self.late[i]:  # the rest resolve through the user's group call
            doc["context"] = {"groupId": self.account(i), "library": {"name": "pql-simulate"}}
        return doc

    def team(self, i: int) -> int:
        """People active in account i now: two; a growing account adds one every few steps, up to 9."""
        return 2 + min(7, self.progress[i] // 4) if self.growing[i] else 2

    def _group(self, i: int, ms: int, user: int) -> dict:
        r = random.Random(i)  # traits are stable per account
        return self._doc(i, ms, user, "group", groupId=self.account(i), traits={
            "name": f"{r.choice(WORDS)} {i}", "employees": r.choice([2, 5, 8, 12, 25, 60, 150, 800]),
            "plan": r.choice(["free", "trial", "trial", "team"]), "industry": r.choice(["saas", "retail", "fintech"])})

    def _story(self, i: int, ms: int) -> dict:
        persona, step = self.personas[i], self.progress[i]
        self.progress[i] += 1
        rng = self.rng
        first = 3 if self.late[i] else 0  # the story step of the first group call
        if first <= step < first + 2:  # one per user
            return self._group(i, ms, step - first)
        if persona in ("inviter", "champion") and rng.random() < 0.15:
            return self._track(i, ms, "Invite Sent", invitee_email=f"teammate{rng.randrange(6)}@{self.account(i)}.example",
                               role=rng.choice(["member", "admin"]))
        if persona in ("limit", "champion") and rng.random() < 0.1:
            return self._track(i, ms, "Usage Recorded", used=rng.randrange(20, 101), limit=100,
                               metric="events")
        if persona in ("activator", "champion") and rng.random() < 0.12:
            return self._track(i, ms, ACTIVATION[step % 3], source=rng.choice(["postgres", "s3", "bigquery"]))
        if persona in ("integrator", "champion") and rng.random() < 0.05:
            return self._track(i, ms, "Integration Connected", integration=rng.choice(INTEGRATIONS))
        if self.growing[i] and rng.random() < 0.3:
            return self._track(i, ms, "Signed In")
        if rng.random() < 0.01:  # an anonymous visitor no group call ties to an account
            self.seq += 1
            return {"type": "track", "event": rng.choice(NOISE + ["Invite Sent"]), "messageId": f"{self.prefix}{self.seq:09d}",
                    "timestamp": iso(ms), "anonymousId": f"anon-{rng.randrange(10**6)}", "properties": {}}
        if rng.random() < 0.4:
            doc = self._doc(i, ms, rng.randrange(2), "page", name=rng.choice(["Home", "Docs", "Pricing", "Billing"]),
                            context={"groupId": self.account(i)}, properties={"path": "/"})
            if self.late[i]:
                del doc["context"]
            return doc
        return self._track(i, ms, rng.choice(NOISE), feature=rng.choice(["charts", "alerts", "sql", "api"]))

    def events(self, count: int) -> Iterator[bytes]:
        """`count` lines (JSON, one event each, plus the odd duplicate or malformed line)."""
        rng = self.rng
        last: bytes | None = None
        for k in range(count):
            ms = int(time.time() * 1000) if self.live else self.start + (self.span * k) // max(count, 1)
            r = rng.random()
            if last is not None and r < self.dup_rate:
                yield last  # an exact redelivery
                continue
            if r > 1 - self.bad_rate:
                yield rng.choice([b'{"type":"track","event":"Job Run"', b'{"type":"track","event":"x","messageId":"m"}',
                                  b'{"type":"nope","messageId":"m","timestamp":"2026-11-20T00:00:00Z"}',
                                  b'{"type":"track","event":"x","messageId":"m","timestamp":"last tuesday"}'])
                continue
            i = min(int(rng.paretovariate(1.2)) - 1, self.n - 1) if rng.random() < 0.3 else rng.randrange(self.n)
            last = json.dumps(self._story(i, ms), separators=(",", ":")).encode()
            yield last


def key_of(line: bytes, users: dict[str, bytes] | None = None) -> bytes | None:
    """Kafka key for a line: the account when the event names one, else (with `users`, userId or
    anonymousId -> account: streams/tools/publish.user_accounts) the account of its user."""
    try:
        doc = json.loads(line)
        gid = doc.get("groupId") if doc.get("type") == "group" else (doc.get("context") or {}).get("groupId")
        if gid:
            return str(gid).encode()
        who = doc.get("userId") or doc.get("anonymousId")
        return users.get(who) if users and isinstance(who, str) else None
    except (ValueError, AttributeError, RecursionError):  # RecursionError: nesting too deep for json
        return None
