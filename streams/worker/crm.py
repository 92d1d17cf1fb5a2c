"""The `crm` agent: crm.lifecycle records (the CRM's MQL stage and owner per account) into the Redis
MQL store, which `detect` reads when an account qualifies. A record that does not validate goes to the
DLQ as bad_crm_record."""
from __future__ import annotations

from pydantic import ValidationError

from schemas.mql import MqlRecord
from schemas.sales import problem
from streams.mqlstore import AsyncMqlStore
from streams.worker.dlq import DeadLetters


class Agent:
    def __init__(self, mql: AsyncMqlStore, dead: DeadLetters):
        self.mql, self.dead = mql, dead

    async def run(self, stream) -> None:
        async for ev in stream.events():
            try:
                rec = MqlRecord.model_validate_json(ev.value or b"")
            except ValidationError as err:
                await self.dead.send(ev.key, ev.value or b"", ev.message, "bad_crm_record", problem(err))
                continue
            await self.mql.put(rec)
