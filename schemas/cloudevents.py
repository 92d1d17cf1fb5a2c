"""Output contract: CloudEvents 1.0, structured JSON mode, one event per line.

``to_json`` is the one serializer: compact, field order fixed by these models, so the same
decision is the same bytes in `pql replay` and in the live worker.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from schemas.state import Evidence

SOURCE = "urn:pql-pipeline:detectors"
HANDOFF, SUPPRESSED, MILESTONE = "pql.handoff", "pql.suppressed", "pql.milestone"
STAGE, SLA_BREACHED = "pql.stage", "pql.sla_breached"  # both carry StageData


class MqlContext(BaseModel):
    stage: str
    owner: str | None


class FitResult(BaseModel):
    passed: bool
    traits: dict[str, object]          # the traits the fit rules looked at, as they were


class Qualification(BaseModel):
    account_id: str
    account_name: str | None
    qualified_at: str
    score: int
    threshold: int
    milestones: list[str]
    evidence: dict[str, list[Evidence]]
    fit: FitResult | None
    mql: MqlContext | None
    rules_version: str


class HandoffData(Qualification):
    precedence: Literal["pql_supersedes_mql", "pql_only"]
    owner: str | None
    lane: Literal["pql"] = "pql"
    sla_due_at: str
    # the qualifying event was older than PQL_ALERT_MAX_AGE when decided (a backlog): no alert, no SLA clock
    backfill: bool = False


class SuppressedData(Qualification):
    reason: Literal["not_fit", "already_in_sales", "cooldown"]
    last_handoff_at: str | None = None
    last_handoff_id: str | None = None


class MilestoneData(BaseModel):
    account_id: str
    milestone: str
    description: str
    points: int
    reached_at: str
    evidence: list[Evidence]
    rules_version: str


# Every transition an account goes through; each is one stage event on pql.signals.
Stage = Literal["qualified", "handed_off", "accepted", "rejected", "converted", "sla_breached"]


class StageData(BaseModel):
    """One stage transition."""

    account_id: str
    stage: Stage
    at: str                                  # when the transition happened (event time or response time)
    lane: Literal["pql", "mql"] = "pql"
    handoff_id: str | None = None            # None only for a qualification that was not handed off
    handed_off_at: str | None = None
    sla_due_at: str | None = None
    seconds_since_handoff: float | None = None
    reason: str | None = None                # rejected: the reason; qualified without handoff: why not
    note: str | None = None
    by: str | None = None
    late: bool = False                       # a response that came after the SLA breach


class CloudEvent(BaseModel):
    specversion: Literal["1.0"] = "1.0"
    id: str
    source: str = SOURCE
    type: str
    time: str
    subject: str
    datacontenttype: Literal["application/json"] = "application/json"
    data: HandoffData | SuppressedData | MilestoneData | StageData | dict

    def to_json(self) -> str:
        return self.model_dump_json(exclude_none=False)
