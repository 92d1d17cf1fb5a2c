"""State contract: what the engine keeps per account and per user (Faust table values; JSON in the
changelogs).

Times are integer milliseconds since the epoch. A *position* is ``(ms, messageId)``: events are
ordered by event time, ties broken by messageId (see docs/semantics.md). ``hits`` rows are
``[ms, messageId, event, distinct_key, props]`` in position order: ``distinct_key`` is a short hash
(never the raw value, which may be an e-mail address) and ``props`` holds only the fields a rule's
``where`` or ``ratio`` names. The rows are also the dedupe memory (detectors/engine.py ``_insert``).
Older changelogs may hold a ``seen`` map: it is ignored.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Evidence(BaseModel):
    model_config = ConfigDict(frozen=True)

    messageId: str
    event: str
    timestamp: str
    properties: dict[str, Any] = Field(default_factory=dict)


class Reach(BaseModel):
    at: int                      # reach time (event time, ms)
    message_id: str              # the event that reached it
    evidence: list[Evidence]


class Handoff(BaseModel):
    """One handoff and what sales made of it (the SLA clock's subject)."""

    id: str
    lane: str = "pql"
    at: int                                  # handed off (event time of the qualifying event)
    since: int | None = None                 # earlier start of its episode, found late (cooldown counts from it)
    due: int                                 # SLA due
    status: str = "open"                     # open | accepted | rejected | converted
    status_at: int | None = None             # time of the latest response
    breached: bool = False
    muted: list[Any] | None = None           # [ms, messageId] of the suppression published after it; later ones are not

    @property
    def start(self) -> int:
        return self.at if self.since is None else self.since


class Sales(BaseModel):
    """The account's way through sales (detectors/sales.py)."""

    stage: str | None = None                 # latest stage (schemas/cloudevents.py Stage)
    stages: dict[str, int] = Field(default_factory=dict)              # stage -> time of its latest transition
    handoffs: list[Handoff] = Field(default_factory=list)             # the most recent handoffs, oldest first


class AccountState(BaseModel):
    account_id: str
    traits: dict[str, Any] = Field(default_factory=dict)              # group traits merged from calls older than `calls`
    calls: list[list[Any]] = Field(default_factory=list)              # recent group calls [ms, messageId, traits], by position
    newest: int = 0                          # newest event time seen (an event older than newest - lateness - hold is too late)
    pruned_at: int = 0                       # `newest` at the last expiry sweep
    hits: dict[str, list[list[Any]]] = Field(default_factory=dict)    # milestone -> its matching events, by position
    reach: dict[str, list[list[Any]]] = Field(default_factory=dict)   # milestone -> positions [ms, messageId] it holds at
    anchor: dict[str, Reach] = Field(default_factory=dict)            # milestone -> latest reach before `reach` (evidence kept)
    unfit: list[list[Any]] = Field(default_factory=list)              # positions suppressed not_fit (a late group call re-checks them)
    waiting: list[list[Any]] = Field(default_factory=list)            # qualified positions not yet decided (rules `settle`)
    expect: dict[str, list[Any]] = Field(default_factory=dict)        # group call messageId -> [ms, slots pending, slots marked]
    defs: dict[str, str] = Field(default_factory=dict)                # milestone -> signature of the definition its hits and reaches follow
    sales: Sales | None = None               # from the first qualification on (most accounts never qualify)


class UserState(BaseModel):
    """Identity of one user key (``u:<userId>`` or ``a:<anonymousId>``), see detectors/identity.py."""

    key: str
    links: list[list[Any]] = Field(default_factory=list)              # [ms, account] of the user's group calls, by time
    alias: str | None = None                 # an anonymous key joined to a user key: its events are that user's
    alias_at: int | None = None              # event time of the earliest join (events older than it - hold stay held)
    held: list[list[Any]] = Field(default_factory=list)               # [ms, messageId, event JSON] awaiting an account
    newest: int = 0                          # newest event time seen for this key
