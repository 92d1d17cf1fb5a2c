"""Which accounts have qualifications waiting to be decided (rules `settle`, docs/semantics.md).

A qualification waits in its account's state until the stream time minus `settle` passes it. The
stream time is the newest event time seen (by `pql replay`; per partition by the worker). This index
says which accounts to visit when it moves; the worker keeps it durable, as JSON in its clocks table.
"""
from __future__ import annotations

from schemas.state import AccountState


BLOCKED = 2**63  # (as its earliest waiting ms) a group call of the account still expects its user keys


class Waiting:
    def __init__(self, accounts: dict[str, int] | None = None):
        self.accounts = accounts if accounts is not None else {}  # account -> its earliest waiting ms

    def track(self, account: str, state: AccountState) -> None:
        """Note what `state` has waiting now. An account whose group call still expects held events
        decides nothing before they come (engine `due`), so it is not visited until then: behind a
        backlog thousands wait so, and each envelope parsed every one of them (issue 25)."""
        if state.waiting:
            self.accounts[account] = BLOCKED if any(e[1] for e in state.expect.values()) else state.waiting[0][0]
        else:
            self.accounts.pop(account, None)

    def ready(self, cut: int | None) -> list[tuple[int, str]]:
        """(ms, account) of the accounts with something waiting at or before `cut` (all if None), by time."""
        return sorted((ms, a) for a, ms in self.accounts.items() if cut is None or ms <= cut)
