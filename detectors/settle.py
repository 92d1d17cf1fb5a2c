"""Which accounts have qualifications waiting to be decided (rules `settle`, docs/semantics.md).

A qualification waits in its account's state until the stream time minus `settle` passes it. The
stream time is the newest event time seen (by `pql replay`; per partition by the worker). This index
says which accounts to visit when it moves; the worker keeps it durable, as JSON in its clocks table.
"""
from __future__ import annotations

from schemas.state import AccountState


class Waiting:
    def __init__(self, accounts: dict[str, int] | None = None):
        self.accounts = accounts if accounts is not None else {}  # account -> its earliest waiting ms

    def track(self, account: str, state: AccountState) -> None:
        """Note what `state` has waiting now."""
        if state.waiting:
            self.accounts[account] = state.waiting[0][0]
        else:
            self.accounts.pop(account, None)

    def ready(self, cut: int | None) -> list[tuple[int, str]]:
        """(ms, account) of the accounts with something waiting at or before `cut` (all if None), by time."""
        return sorted((ms, a) for a, ms in self.accounts.items() if cut is None or ms <= cut)
