"""Format versions of what the worker keeps and hands on: table values (account and user state, SLA
clocks, waiting decisions: the changelogs) and envelopes (`<app>-accounts`, `<app>-progress`).

FORMAT is the version this release writes; 0 is the format before versions (releases up to
f6a6d9a), which had the same shape as 1. A reader takes every version up to FORMAT, migrating an
older value on read (MIGRATIONS), and refuses a newer one (NewerFormat: the worker stops, saying
so): a newer release wrote it, and an older one could drop what it does not know.

Where the version is:
- a table value is a JSON object whose first member is ``"v": <version>``; in the SLA clocks map
  (``{handoff_id: [due, account]}``) it is shaped like a clock, ``"v": [<version>, ""]``, so that a
  worker of the release before versions, meeting it in a rolling upgrade, takes it for a clock that
  ran out long ago with no account, and drops it;
- an envelope carries the Kafka header ``pql-format``.
No version (older values and envelopes) is 0. docs/operations.md "Upgrading" says how to roll a
release out.

A release that changes a shape bumps FORMAT and adds MIGRATIONS[old] (a value of version old, parsed,
to version old + 1). It must also stay readable by the release before it until every worker runs
the new one (a rolling upgrade runs both): add fields, do not rename or retype them.
"""
from __future__ import annotations

import json
import re
from typing import Any, Callable

FORMAT = 1
HEADER = "pql-format"
MIGRATIONS: dict[int, Callable[[dict], dict]] = {}  # version n -> its value as version n + 1 (0 -> 1: the same)
HEADERS = [(HEADER, str(FORMAT).encode())]  # the Kafka headers of an envelope this release writes
_VERSION = re.compile(rb'\{"v":\[?(\d+)')


class NewerFormat(Exception):
    """A value or envelope of a format this release does not know."""

    def __init__(self, version: int, what: str):
        super().__init__(
            f"{what} has format {version}; this release reads formats up to {FORMAT}. A newer release of "
            f"pql-pipeline wrote it: run that release (or a later one) for this PQL_APP_ID; an older "
            f"worker must not run against newer state (docs/operations.md \"Upgrading\")")
        self.version = version


def version_of(body: bytes) -> int:
    """The format of a table value (0 when it carries none)."""
    m = _VERSION.match(body)
    return int(m.group(1)) if m else 0


def versioned(body: bytes, clock_shaped: bool = False) -> bytes:
    """A table value's JSON object with this release's version as its first member."""
    v = b'"v":[%d,""]' % FORMAT if clock_shaped else b'"v":%d' % FORMAT
    return b"{" + v + (b"}" if body == b"{}" else b"," + body[1:])


def readable(body: bytes, what: str) -> bytes:
    """The value as this release reads it: migrated when older; NewerFormat when newer. (Pydantic
    models ignore the "v" member; maps drop it: `unversioned`.)"""
    v = version_of(body)
    if v > FORMAT:
        raise NewerFormat(v, what)
    if v == FORMAT or not any(k in MIGRATIONS for k in range(v, FORMAT)):
        return body
    value = json.loads(body)
    value.pop("v", None)
    for k in range(v, FORMAT):
        if k in MIGRATIONS:
            value = MIGRATIONS[k](value)
    return json.dumps(value, separators=(",", ":")).encode()


def unversioned(value: dict[str, Any]) -> dict[str, Any]:
    """A parsed map value without its version member."""
    value.pop("v", None)
    return value


def check_headers(headers: Any, what: str) -> int:
    """An envelope's format from its Kafka headers (a list of (name, value) or a mapping; None: 0);
    NewerFormat when newer than this release."""
    if not headers:
        return 0
    items = headers.items() if hasattr(headers, "items") else headers
    for name, value in items:
        if name == HEADER:
            v = int(value)
            if v > FORMAT:
                raise NewerFormat(v, what)
            return v
    return 0
