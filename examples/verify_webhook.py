"""Verify a pql-pipeline webhook request. Standard library only: copy this function into your receiver.

The worker signs every webhook request with PQL_WEBHOOK_SECRET:

    X-PQL-Webhook-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>." + raw body>

Verify over the raw body bytes, before parsing them, and refuse a timestamp outside the tolerance:
a request captured on the way cannot be sent again later. Requests are also retried and may arrive
twice on purpose (at-least-once): dedupe on `X-PQL-Event-Id` after verifying.
"""
from __future__ import annotations

import hashlib
import hmac
import time

TOLERANCE = 300  # seconds; both clocks should be NTP-synced


def verify(body: bytes, header: str, secret: str, tolerance: float = TOLERANCE, now: float | None = None) -> bool:
    """True if `header` (the X-PQL-Webhook-Signature value) signs `body` with `secret`, within
    `tolerance` seconds of `now` (default: this machine's clock). Any `v1` entry may match (a sender
    in the middle of a secret rotation may send two)."""
    parts = [p.split("=", 1) for p in header.split(",") if "=" in p]
    stamps = [v for k, v in parts if k.strip() == "t"]
    signatures = [v.strip() for k, v in parts if k.strip() == "v1"]
    if len(stamps) != 1 or not signatures or not stamps[0].strip().isdigit():
        return False
    t = int(stamps[0])
    if abs((time.time() if now is None else now) - t) > tolerance:
        return False
    expected = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return any(hmac.compare_digest(expected, s) for s in signatures)
