"""Event-time formatting: integer milliseconds <-> ISO 8601 UTC with millisecond precision."""
from __future__ import annotations

from datetime import datetime, timedelta

from schemas.events import EPOCH, to_ms


def iso(ms: int) -> str:
    """1795431183699 -> '2026-11-23T10:53:03.699Z' (exact; no float rounding)."""
    dt = EPOCH + timedelta(milliseconds=ms)
    return f"{dt:%Y-%m-%dT%H:%M:%S}.{ms % 1000:03d}Z"


def parse_ms(text: str) -> int:
    """'2026-11-23T10:53:03.699Z' (any ISO 8601; no zone = UTC) -> ms. Raises ValueError."""
    return to_ms(datetime.fromisoformat(text.replace("Z", "+00:00")))
