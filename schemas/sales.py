"""Sales-side contracts: what sales sends back (`sales.responses`) and the stage events we publish.

A response: ``{"handoff_id", "account_id", "status", "reason", "note", "by", "timestamp"}``.
``status`` is accepted, rejected or converted; a rejection needs a ``reason`` from REASONS, and
``other`` needs a ``note``. What we publish about them is schemas/cloudevents.py StageData.
"""
from __future__ import annotations

from datetime import datetime
from functools import cached_property
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.events import EPOCH, LATEST, ONE_MS, UTC

REASONS = ("not_icp", "duplicate", "bad_data", "student_or_research", "competitor", "no_budget", "bad_timing",
           "other")
Reason = Literal["not_icp", "duplicate", "bad_data", "student_or_research", "competitor", "no_budget",
                 "bad_timing", "other"]
STATUSES = ("accepted", "rejected", "converted")
# Every transition an account goes through; each is one stage event on pql.signals.
STAGES = ("qualified", "handed_off", "accepted", "rejected", "converted", "sla_breached")
Text = Annotated[str, Field(min_length=1, max_length=200)]


class SalesResponse(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    handoff_id: Text
    account_id: Text
    status: Literal["accepted", "rejected", "converted"]
    reason: Reason | None = None
    note: Annotated[str, Field(max_length=2000)] | None = None
    by: Annotated[str, Field(max_length=200)] | None = None
    timestamp: Annotated[datetime, Field(ge=EPOCH, lt=LATEST)]

    @model_validator(mode="after")
    def _reason(self) -> "SalesResponse":
        if self.status == "rejected" and self.reason is None:
            raise ValueError(f"reason: a rejection needs a reason, one of {', '.join(REASONS)}")
        if self.reason == "other" and not (self.note or "").strip():
            raise ValueError("note: reason 'other' needs a note")
        return self

    @cached_property
    def ms(self) -> int:
        ts = self.timestamp if self.timestamp.tzinfo else self.timestamp.replace(tzinfo=UTC)
        return (ts - EPOCH) // ONE_MS
