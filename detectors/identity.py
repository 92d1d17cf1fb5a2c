"""Identity: which account an event belongs to.

The account is ``context.groupId`` on the event, else the account of the user's latest ``group``
call (by event time; ties go to the later arrival). Users are keyed ``u:<userId>`` or
``a:<anonymousId>``; a link is ``[account_id, event ms]``.
"""
from __future__ import annotations

from typing import Any, Mapping

from schemas.events import Group

Link = list  # [account_id, ms]


def user_keys(event: Any) -> list[str]:
    keys = []
    if event.userId:
        keys.append("u:" + event.userId)
    if event.anonymousId:
        keys.append("a:" + event.anonymousId)
    return keys


def resolve(event: Any, links: Mapping[str, Link]) -> str | None:
    """The event's account, or None when it cannot be tied to one (unattributed)."""
    if isinstance(event, Group):
        return event.groupId
    gid = event.group_id
    if gid:
        return gid
    for key in user_keys(event):
        link = links.get(key)
        if link:
            return link[0]
    return None


def link(event: Group, current: Link | None) -> Link | None:
    """The user's new link after this group call, or None when an earlier-known later call wins."""
    if current is not None and current[1] > event.ms:
        return None
    return [event.groupId, event.ms]


SKIP, UNATTRIBUTED = "skip", "unattributed"


def route(event: Any, links: dict[str, Link], relevant) -> tuple[str | None, str | None, list[tuple[str, Link]]]:
    """Shared by `pql replay` and the live ingest, so both attribute events identically.

    Updates `links` from a group call. Returns (account, why_not, new_links): account is the
    account to hand the event to, else why_not is SKIP (nothing a rule can use) or UNATTRIBUTED
    (a rule would use it, but no account is known).
    """
    if isinstance(event, Group):
        changed = []
        for key in user_keys(event):
            new = link(event, links.get(key))
            if new is not None:
                links[key] = new
                changed.append((key, new))
        return event.groupId, None, changed
    if event.type not in ("track", "page", "screen") or not relevant(event):
        return None, SKIP, []
    account = resolve(event, links)
    return (account, None, []) if account is not None else (None, UNATTRIBUTED, [])
