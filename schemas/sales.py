"""Sales-side contracts: what sales sends back (`sales.responses`) and the stage events we publish.

A response: ``{"handoff_id", "account_id", "status", "reason", "note", "by", "timestamp"}``.
``status`` is accepted, rejected or converted; a rejection needs a ``reason`` from REASONS, and
``other`` needs a ``note``. What we publish about them is schemas/cloudevents.py StageData.
"""
from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from schemas.events import EPOCH, LATEST, once, to_ms

Reason = Literal["not_icp", "duplicate", "bad_data", "student_or_research", "competitor", "no_budget",
                 "bad_timing", "other"]
REASONS = get_args(Reason)
Text = Annotated[str, Field(min_length=1, max_length=200)]


class SalesResponse(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, ignored_types=(once,))

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

    @once
    def ms(self) -> int:
        return to_ms(self.timestamp)


def problem(err: ValidationError) -> str:
    """The first thing wrong with a record, as 'field: message' (a check across fields names its own)."""
    e = err.errors(include_url=False)[0]
    field = ".".join(str(x) for x in e["loc"])
    return f"{field + ': ' if field else ''}{e['msg'].removeprefix('Value error, ')}"
