"""The MQL state in Redis: the CRM's view of each account.

Layout: one hash per account, ``<PQL_REDIS_PREFIX>mql:<account_id>`` with fields
``stage`` (MQL, SAL, SQL, ...), ``owner`` (absent when none) and ``updated_at`` (ISO 8601 UTC).
A change older than what is stored (by ``updated_at``) is ignored, so replays and out-of-order
CRM events cannot move an account backwards.

Also ``<PQL_REDIS_PREFIX>handoff:<handoff_id>`` = account id (expires after HANDOFF_TTL), written by
the alerts task for every handoff, so `pql respond HANDOFF_ID` can find the account.

The worker reads the MQL hash only when an account qualifies. When Redis is down the read waits and retries
with capped exponential backoff (logged, counted in pql_redis_errors_total); it never guesses.
"""
from __future__ import annotations

import asyncio
import logging
import time

import redis
import redis.asyncio as aredis

from detectors.timefmt import iso, parse_ms
from schemas.mql import MqlRecord

log = logging.getLogger("pql.mql")
HANDOFF_TTL = 180 * 86400  # seconds

# KEYS[1]=hash; ARGV: stage, owner ('' = none), updated_at ('' = unknown, always applies)
_APPLY = """
local cur = redis.call('HGET', KEYS[1], 'updated_at')
if ARGV[3] ~= '' and cur and cur > ARGV[3] then return 0 end
redis.call('HSET', KEYS[1], 'stage', ARGV[1])
if ARGV[2] == '' then redis.call('HDEL', KEYS[1], 'owner') else redis.call('HSET', KEYS[1], 'owner', ARGV[2]) end
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'updated_at', ARGV[3]) end
return 1
"""


def normalize_time(value: str | None) -> str:
    """Any ISO 8601 time -> 'YYYY-MM-DDTHH:MM:SS.mmmZ' (so times compare as strings); '' if none."""
    return iso(parse_ms(value)) if value else ""


def _record(account_id: str, h: dict) -> MqlRecord | None:
    if not h:
        return None
    d = {k.decode() if isinstance(k, bytes) else k: v.decode() if isinstance(v, bytes) else v for k, v in h.items()}
    return MqlRecord(account_id=account_id, stage=d["stage"], owner=d.get("owner"), timestamp=d.get("updated_at"))


def _args(rec: MqlRecord) -> list[str]:
    return [rec.stage, rec.owner or "", normalize_time(rec.timestamp)]


class MqlStore:
    """Synchronous access, for the CLI."""

    def __init__(self, url: str, prefix: str = "pql:"):
        self.r = redis.Redis.from_url(url)
        self.prefix = prefix
        self._apply = self.r.register_script(_APPLY)

    def key(self, account_id: str) -> str:
        return f"{self.prefix}mql:{account_id}"

    def get(self, account_id: str) -> MqlRecord | None:
        return _record(account_id, self.r.hgetall(self.key(account_id)))

    def put(self, rec: MqlRecord) -> bool:
        return bool(self._apply(keys=[self.key(rec.account_id)], args=_args(rec)))

    def account_of(self, handoff_id: str) -> str | None:
        v = self.r.get(f"{self.prefix}handoff:{handoff_id}")
        return v.decode() if v is not None else None


class AsyncMqlStore:
    """Asynchronous access with retries, for the worker."""

    def __init__(self, url: str, prefix: str, retry_max: float, on_error=None):
        self.r = aredis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        self.prefix = prefix
        self.retry_max = retry_max
        self.on_error = on_error or (lambda: None)
        self._apply = self.r.register_script(_APPLY)

    def key(self, account_id: str) -> str:
        return f"{self.prefix}mql:{account_id}"

    async def _retry(self, what: str, call):
        delay, failures = 0.05, 0
        while True:
            try:
                return await call()
            except (redis.ConnectionError, redis.TimeoutError, OSError) as err:
                failures += 1
                self.on_error()
                if failures == 1 or failures % 10 == 0:
                    log.warning("redis %s failed (%s); retry %d in %.2fs", what, type(err).__name__, failures, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.retry_max)

    async def get(self, account_id: str) -> tuple[MqlRecord | None, float]:
        """The account's MQL record (or None) and the seconds the lookup took, retries included."""
        started = time.perf_counter()
        h = await self._retry("read", lambda: self.r.hgetall(self.key(account_id)))
        return _record(account_id, h), time.perf_counter() - started

    async def put(self, rec: MqlRecord) -> bool:
        return bool(await self._retry("write", lambda: self._apply(keys=[self.key(rec.account_id)], args=_args(rec))))

    async def index_handoffs(self, pairs: list[tuple[str, str]]) -> None:
        """handoff id -> account, for `pql respond`."""
        async def write():
            pipe = self.r.pipeline(transaction=False)
            for handoff_id, account in pairs:
                pipe.set(f"{self.prefix}handoff:{handoff_id}", account, ex=HANDOFF_TTL)
            return await pipe.execute()

        await self._retry("handoff index write", write)

    async def close(self) -> None:
        await self.r.aclose()
