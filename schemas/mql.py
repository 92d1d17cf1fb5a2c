"""MQL state contract: the CRM's view of an account, as kept in Redis and in `--mql` files."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from schemas.rules import STAGES

_BY_LOWER = {s.lower(): s for s in STAGES}


def _stage(value: object) -> object:
    if isinstance(value, str) and value.strip().lower() in _BY_LOWER:
        return _BY_LOWER[value.strip().lower()]
    return value


Stage = Annotated[
    Literal["Lead", "MQL", "SAL", "SQL", "Opportunity", "Customer", "Recycled", "Disqualified"],
    BeforeValidator(_stage),
]
IN_SALES = frozenset({"SQL", "Opportunity", "Customer"})
OPEN_MQL = frozenset({"MQL", "SAL"})


class MqlRecord(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    # bounded: the owner is copied into every handoff of the account
    account_id: Annotated[str, Field(min_length=1, max_length=256)]
    stage: Stage
    owner: Annotated[str, Field(max_length=256)] | None = None
    timestamp: Annotated[str, Field(max_length=64)] | None = None
