"""Wrong device clocks (docs/semantics.md, "Wrong clocks"). Pure: the time an event was received
comes in as a value.

An event dated more than `max_future` ahead of when it was received would make its account's newest
event jump ahead: its real events would become too late, and a qualification at its time would wait
for the wall clock. So, with `received` the event's own `receivedAt` when it has one, else the
caller's (the ingest wall clock live, `--processed-at` in replay):
- when `sentAt` is that far ahead too (the device's clock was wrong when it sent the batch), the
  time is corrected as Segment's server corrects it: `received - (sentAt - timestamp)`;
- otherwise the event is refused with reason `future` (the caller dead-letters it).
"""
from __future__ import annotations

from datetime import timedelta
from typing import Any

from detectors.timefmt import iso
from schemas.events import EPOCH, InvalidEvent, clock, to_ms


def check_future(event: Any, received: int | None, max_future: int) -> bool:
    """Raise InvalidEvent('future') for an event too far ahead of `received` (ms; None: no check);
    correct its `timestamp` in place when `sentAt` shows the skew. True when corrected."""
    own = clock(event, "receivedAt")
    ref = to_ms(own) if own is not None else received
    if ref is None or event.ms <= ref + max_future:
        return False
    sent = clock(event, "sentAt")
    if sent is not None and to_ms(sent) > ref + max_future:
        fixed = ref - (to_ms(sent) - event.ms)
        if 0 <= fixed <= ref + max_future:
            event.timestamp = EPOCH + timedelta(milliseconds=fixed)
            event.__dict__.pop("ms", None)  # (the cached event time)
            return True
    where = "its receivedAt" if own is not None else "when it was read"
    raise InvalidEvent("future", f"timestamp {iso(event.ms)} is {(event.ms - ref) / 3_600_000:,.1f} h ahead of "
                                 f"{where} ({iso(ref)}), more than PQL_MAX_FUTURE ({max_future // 1000} s), "
                                 f"and no sentAt shows the device clock's skew")


