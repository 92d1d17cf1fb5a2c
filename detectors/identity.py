"""Identity: which account an event belongs to, whatever order events arrive in. Pure.

An event's account is its ``context.groupId``; else the account of its user's group call: the
latest call at or before the event (event time), else the earliest call at most ``hold`` after it
(users often act before the app sends ``group``). Until such a call is known, the event is *held*
under its user key. User keys are ``u:<userId>``, else ``a:<anonymousId>``. An ``identify`` that
carries both ids, or an ``alias`` (``previousId`` -> ``userId``), joins ``a:<id>`` to ``u:<userId>``:
the anonymous key's held events and group calls move to the user key, and its later events follow.

The work is expressed as *lines*, each for one key, so the live worker can run each on the
partition that owns the key (streams/worker/detect.py) and `pql replay` can run them in one loop:

    (EVENT, account, event)         apply to the account (detectors/engine.py)
    (USER, user_key, event)         attribute through the user's links, or hold
    (LINK, user_key, (account, ms, call))  the user made a group call; call = [messageId, slot] (slot
                                    "u" for its userId, "a" for its anonymousId), None when a join moves it
    (JOIN, anonymous_key, (user_key, ms))  the anonymous key is that user
    (MARK, account, (messageId, slot, ms))  that user key of the group call has released what it held

A group call reaches its account at once and its user keys in LINK lines; the events those hold come
later. Each LINK line of a call ends in a MARK to the account, so the account knows when all of them
are in (engine: ``expect``) before it decides. Marks are matched by slot, not counted: the ingest
tier may send a line twice (at-least-once), and a repeat must neither stall nor release early.
"""
from __future__ import annotations

from bisect import insort
from collections import deque
from typing import Any, Callable

from schemas.events import Alias, Group, Identify, parse_event
from schemas.state import UserState

EVENT, USER, LINK, JOIN, MARK = "e", "u", "l", "j", "m"
SKIP, UNATTRIBUTED = "skip", "unattributed"
MAX_LINKS = 8     # group calls remembered per user (a user in more accounts keeps the latest)
MAX_HELD = 1000   # events held per user key; older ones are dropped as unattributed

Line = tuple[str, str, Any]


def user_key(event: Any) -> str | None:
    if event.userId:
        return "u:" + event.userId
    if event.anonymousId:
        return "a:" + event.anonymousId
    return None


def user_keys(event: Any) -> list[str]:
    keys = []
    if event.userId:
        keys.append("u:" + event.userId)
    if event.anonymousId:
        keys.append("a:" + event.anonymousId)
    return keys


def dispatch(event: Any, relevant: Callable[[Any], bool]) -> tuple[list[Line], str | None]:
    """The first lines for one valid input event, and why there are none (SKIP or UNATTRIBUTED)."""
    if isinstance(event, Group):
        return [(EVENT, event.groupId, event)] + [(LINK, k, (event.groupId, event.ms, [event.messageId, k[0]]))
                                                  for k in user_keys(event)], None
    if isinstance(event, Identify):
        if event.userId and event.anonymousId:
            return [(JOIN, "a:" + event.anonymousId, ("u:" + event.userId, event.ms))], None
        return [], SKIP
    if isinstance(event, Alias):
        if event.userId and event.previousId and event.previousId != event.userId:
            return [(JOIN, "a:" + event.previousId, ("u:" + event.userId, event.ms))], None
        return [], SKIP
    if event.type not in ("track", "page", "screen") or not relevant(event):
        return [], SKIP
    if event.group_id:
        return [(EVENT, event.group_id, event)], None
    key = user_key(event)
    if key is None:
        return [], UNATTRIBUTED
    return [(USER, key, event)], None


def resolve(links: list[list[Any]], ms: int, hold: int) -> str | None:
    """The account of the latest link at or before `ms`, else of the earliest within `hold` after it."""
    best = None
    for t, account in links:
        if t <= ms:
            best = account
        else:
            return best if best is not None or t > ms + hold else account
    return best


def collect(into: dict, kind: str, key: str, arg: Any) -> None:
    """An EVENT or MARK line into `into`, {account: ([events], [marks])}: what the account runs together."""
    into.setdefault(key, ([], []))[kind == MARK].append(arg)


class Users:
    """Runs USER, LINK and JOIN lines on user states; returns the lines they lead to.

    `raw(event)` gives the bytes a held event is kept as, `parse(raw)` the event back. Dropped
    counts the held events that could no longer be attributed (expired or over MAX_HELD)."""

    def __init__(self, hold: int, bound: int, raw: Callable[[Any], str] = lambda e: e.model_dump_json(by_alias=True),
                 parse: Callable[[str], Any] = parse_event):
        self.hold, self.bound, self.raw, self.parse = hold, bound, raw, parse

    def run_all(self, lines: list[Line], user: Callable[[str], UserState], into: dict,
                away: Callable[[str], bool] | None = None, forward: Callable[[Line], None] | None = None
                ) -> tuple[int, int]:
        """Run lines, and the lines they lead to, to the end, in order. EVENT and MARK lines collect
        in `into` as {account: ([events], [marks])}; the others run on `user(key)`. A line whose key
        is `away` (another partition owns it) goes to `forward` instead. Returns (USER lines held,
        held events dropped as unattributed). `pql replay` and the live `detect` both run this."""
        work, held, dropped = deque(lines), 0, 0
        while work:
            line = work.popleft()
            kind, key, arg = line
            if away is not None and away(key):
                forward(line)
            elif kind in (EVENT, MARK):
                collect(into, kind, key, arg)
            else:
                more, lost = self.run(user(key), kind, arg)
                held += kind == USER and not more
                dropped += lost
                work.extend(more)
        return held, dropped

    def run(self, u: UserState, kind: str, arg: Any) -> tuple[list[Line], int]:
        """One USER, LINK or JOIN line on its key's state: (lines it leads to, held events dropped)."""
        if kind == USER:
            return self.user(u, arg)
        if kind == LINK:
            return self.link(u, *arg)
        return self.join(u, *arg), 0

    def user(self, u: UserState, event: Any) -> tuple[list[Line], int]:
        self._saw(u, event.ms)
        if u.alias is not None and event.ms >= u.alias_at - self.hold:
            return [(USER, u.alias, event)], 0
        account = resolve(u.links, event.ms, self.hold)
        if account is not None:
            return [(EVENT, account, event)], 0
        if all(h[1] != event.messageId for h in u.held):
            insort(u.held, [event.ms, event.messageId, self.raw(event)], key=lambda h: (h[0], h[1]))
        return [], self._expire(u)

    def link(self, u: UserState, account: str, ms: int, call: list | None = None) -> tuple[list[Line], int]:
        self._saw(u, ms)
        if u.alias is not None:
            return [(LINK, u.alias, (account, ms, call))], 0
        if [ms, account] not in u.links:
            insort(u.links, [ms, account])
            del u.links[:-MAX_LINKS]
        out, kept = [], []
        for h in u.held:
            account_of = resolve(u.links, h[0], self.hold)
            if account_of is None:
                kept.append(h)
            else:
                out.append((EVENT, account_of, self.parse(h[2])))
        if len(kept) != len(u.held):
            u.held = kept
        if call is not None:
            out.append((MARK, account, (call[0], call[1], ms)))
        return out, self._expire(u)

    def join(self, u: UserState, target: str, ms: int) -> list[Line]:
        """The anonymous key is `target` from `ms` on: its group calls, and its held events from
        `hold` before the earliest join on, move there. (Older ones stay held: an earlier join may
        still arrive.)"""
        self._saw(u, ms)
        if u.key == target:
            return []
        if u.alias != target:
            u.alias, u.alias_at = target, ms
        elif ms < u.alias_at:
            u.alias_at = ms
        else:
            return []
        out: list[Line] = [(LINK, target, (account, t, None)) for t, account in u.links]
        lo = u.alias_at - self.hold
        out += [(USER, target, self.parse(h[2])) for h in u.held if h[0] >= lo]
        u.links, u.held = [], [h for h in u.held if h[0] < lo]
        return out

    def _saw(self, u: UserState, ms: int) -> None:
        if ms > u.newest:
            u.newest = ms

    def _expire(self, u: UserState) -> int:
        """Drop held events no group call can attribute any more (it would be too late), and the
        oldest beyond MAX_HELD. Returns how many were dropped."""
        before = len(u.held)
        if not before:
            return 0
        cut = u.newest - self.bound
        u.held = [h for h in u.held if h[0] >= cut][-MAX_HELD:]
        return before - len(u.held)
