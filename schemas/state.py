"""State contract: what the engine keeps per account (a Faust table value; JSON in the changelog).

Times are integer milliseconds since the epoch. ``hits`` rows are
``[ms, messageId, event, distinct_key, props]``: ``distinct_key`` is a short hash (never the raw
value, which may be an e-mail address) and ``props`` holds only the fields a rule's ``where`` or
``ratio`` names.
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
    at: int                      # latest reach time (event time, ms)
    message_id: str              # the event that reached it
    evidence: list[Evidence]


class Handoff(BaseModel):
    """One handoff and what sales made of it (the SLA clock's subject)."""

    id: str
    lane: str = "pql"
    at: int                                  # handed off (event time of the qualifying event)
    due: int                                 # SLA due
    status: str = "open"                     # open | accepted | rejected | converted
    status_at: int | None = None             # time of the latest response
    breached: bool = False


class Sales(BaseModel):
    """The account's way through sales (detectors/sales.py)."""

    stage: str | None = None                 # latest stage (schemas/cloudevents.py Stage)
    stages: dict[str, int] = Field(default_factory=dict)              # stage -> time of its latest transition
    handoffs: list[Handoff] = Field(default_factory=list)             # the most recent handoffs, oldest first


class AccountState(BaseModel):
    account_id: str
    traits: dict[str, Any] = Field(default_factory=dict)              # merged group traits, latest call wins per trait
    traits_at: int | None = None             # event time of the group call the traits came from
    newest: int = 0                          # newest event time applied
    pruned_at: int = 0                       # `newest` at the last expiry sweep
    seen: dict[str, int] = Field(default_factory=dict)                # messageId -> event time, for dedupe
    hits: dict[str, list[list[Any]]] = Field(default_factory=dict)    # milestone -> matching events kept for its window
    reached: dict[str, Reach] = Field(default_factory=dict)           # milestone -> latest reach
    sales: Sales | None = None               # from the first qualification on (most accounts never qualify)
