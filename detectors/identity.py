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
