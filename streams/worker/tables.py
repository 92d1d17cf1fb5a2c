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

from streams.topics import CHANGELOG_EXTRA, TABLES, changelog
from streams.worker import eos


@dataclass
class Tables:
    accounts: object
    users: object
    clocks: object
    app_id: str

    @classmethod
    def create(cls, app, partitions: int) -> "Tables":
        def table(name: str):
            return app.Table(name, partitions=partitions, value_type=bytes, extra_topic_configs=CHANGELOG_EXTRA)
        return cls(*(table(t) for t in TABLES), app.conf.id)

    def changelog(self, table: str) -> str:
        return changelog(self.app_id, table)

    def forget(self, partitions: set[int], partition_of: Callable[[str], int]) -> int:
        """Drop every value of these partitions from memory (and a RocksDB store's offsets of their
        changelogs, so that recovery reads them from the start); returns how many."""
        n = 0
        for table in (self.accounts, self.users, self.clocks):
            eos.forget_persisted_offsets(table.data, partitions)
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
