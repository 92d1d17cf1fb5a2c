"""The Faust tables of the detection tier. Values are JSON bytes, exactly what each changelog holds;
`detect` writes the changelogs itself, in its transactions (streams/worker/publish.py).

- accounts: account id -> AccountState (schemas/state.py)
- users:    user key (u:<userId> / a:<anonymousId>) -> UserState: group-call links, held events
- clocks:   "<partition>" -> that partition's SLA clocks {handoff_id: [due_ms, account]};
            "w<partition>" -> its stream time and the accounts with decisions waiting (rules `settle`)

Each is partitioned like <app>-accounts: a key lives on the partition `envelope.partition_of` gives.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass
class Tables:
    accounts: object
    users: object
    clocks: object
    app_id: str

    @classmethod
    def create(cls, app, partitions: int) -> "Tables":
        return cls(app.Table("accounts", partitions=partitions, value_type=bytes),
                   app.Table("users", partitions=partitions, value_type=bytes),
                   app.Table("clocks", partitions=partitions, value_type=bytes), app.conf.id)

    def changelog(self, table: str) -> str:
        return f"{self.app_id}-{table}-changelog"

    def forget(self, partitions: set[int], partition_of: Callable[[str], int]) -> int:
        """Drop every value of these partitions from memory; returns how many."""
        n = 0
        for table in (self.accounts, self.users):
            store = table.data
            for key in [k for k in list(store.keys()) if partition_of(k) in partitions]:
                del store[key]
                n += 1
        for p in partitions:
            for key in (str(p), f"w{p}"):
                if key in self.clocks.data:
                    del self.clocks.data[key]
                    n += 1
        return n
