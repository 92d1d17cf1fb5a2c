"""Input contract: Segment-spec events (also what RudderStack sends).

Unknown fields are kept (``extra="allow"``). Event time is ``timestamp``; a timestamp without a zone
is read as UTC. A call without ``timestamp`` (as SDKs and collectors write it, before Segment's
server fills it in) gets Segment's: ``receivedAt - (sentAt - originalTimestamp)`` when all three are
there, else ``originalTimestamp``, else ``receivedAt`` (``event_time``). Parsing never raises
anything but :class:`InvalidEvent`.
"""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter, ValidationError, model_validator

UTC = timezone.utc
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
ONE_MS = timedelta(milliseconds=1)
LATEST = datetime(2200, 1, 1, tzinfo=UTC)  # event times past this (or before 1970) are rejected
ID_MAX = 256  # characters in an id (messageId, userId, anonymousId, groupId): ids are kept in state
Id = Annotated[str, StringConstraints(min_length=1, max_length=ID_MAX)]
OptionalId = Annotated[str, StringConstraints(max_length=ID_MAX)] | None
Time = Annotated[datetime, Field(ge=EPOCH, lt=LATEST)]  # checked in pydantic-core
TIME = TypeAdapter(Time)
CLOCK_FIELDS = ("originalTimestamp", "sentAt", "receivedAt")  # Segment's other times (kept as extra fields)


class once:
    """A property computed at the first read and kept in the instance (functools.cached_property
    without its lock, which Python 3.11 takes at every first read: a third of an event's parse)."""

    def __init__(self, fn):
        self.fn, self.name = fn, fn.__name__

    def __get__(self, obj, cls=None):
        if obj is None:
            return self
        value = obj.__dict__[self.name] = self.fn(obj)
        return value


def to_ms(ts: datetime) -> int:
    """Milliseconds since the epoch, exact; a time without a zone is UTC."""
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return (ts - EPOCH) // ONE_MS


class _Event(BaseModel):
    model_config = ConfigDict(extra="allow", coerce_numbers_to_str=True, ignored_types=(once,))

    messageId: Id
    timestamp: Time | None = None  # (set by parse_event when the call has none: see event_time)
    userId: OptionalId = None
    anonymousId: OptionalId = None
    context: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _short_group_id(self) -> "_Event":
        gid = self.context.get("groupId")
        if gid is not None and len(str(gid)) > ID_MAX:
            raise ValueError(f"field 'context.groupId': at most {ID_MAX} characters")
        return self

    @once
    def ms(self) -> int:
        """Event time in integer milliseconds since the epoch (exact, no float rounding)."""
        return to_ms(self.timestamp)

    @property
    def group_id(self) -> str | None:
        """The account named on the event itself (``context.groupId``)."""
        gid = self.context.get("groupId")
        return str(gid) if gid not in (None, "") else None

    @property
    def name(self) -> str | None:
        """The name rules match on: ``event`` for track, ``name`` for page/screen."""
        return None


class Track(_Event):
    type: Literal["track"]
    event: Annotated[str, Field(min_length=1)]
    properties: dict[str, Any] = Field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.event


class Page(_Event):
    type: Literal["page"]
    name_: str | None = Field(default=None, alias="name")
    properties: dict[str, Any] = Field(default_factory=dict)

    @property
    def name(self) -> str | None:
        return self.name_


class Screen(Page):
    type: Literal["screen"]  # type: ignore[assignment]


class Identify(_Event):
    type: Literal["identify"]
    traits: dict[str, Any] = Field(default_factory=dict)


class Group(_Event):
    type: Literal["group"]
    groupId: Id
    traits: dict[str, Any] = Field(default_factory=dict)


class Alias(_Event):
    type: Literal["alias"]
    previousId: OptionalId = None


Event = Annotated[Union[Track, Page, Screen, Identify, Group, Alias], Field(discriminator="type")]
EVENT = TypeAdapter(Event)

# Bounded set of reasons (they are metric label values and DLQ reasons).
REASONS = ("not_json", "not_object", "unknown_type", "missing_field", "bad_timestamp", "invalid_field", "too_large",
           "future")


class InvalidEvent(ValueError):
    """An input that is not a usable Segment event. ``reason`` is one of REASONS."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _explain(err: ValidationError) -> InvalidEvent:
    first = err.errors(include_url=False)[0]
    kind, loc = first["type"], [str(p) for p in first["loc"]]
    field = ".".join(loc[1:]) if len(loc) > 1 else ".".join(loc)
    if kind == "json_invalid":
        return InvalidEvent("not_json", first["msg"])
    if kind in ("model_attributes_type", "model_type", "dict_type") and len(loc) <= 1:
        return InvalidEvent("not_object", "an event must be a JSON object")
    if kind == "union_tag_not_found":
        return InvalidEvent("missing_field", "missing field 'type'")
    if kind == "union_tag_invalid":
        return InvalidEvent("unknown_type", f"unknown type {first.get('ctx', {}).get('tag')!r}")
    if kind == "missing":
        return InvalidEvent("missing_field", f"missing field {field!r}")
    if kind == "value_error" and len(loc) <= 1:  # a check across fields (_Event._short_group_id)
        return InvalidEvent("invalid_field", first["msg"].removeprefix("Value error, "))
    if field in ("timestamp", *CLOCK_FIELDS):
        return _bad_time(field, kind, first.get("input"))
    return InvalidEvent("invalid_field", f"field {field!r}: {first['msg']}")


def _bad_time(field: str, kind: str, value: Any) -> InvalidEvent:
    why = "out of range (1970..2199)" if kind in ("greater_than_equal", "less_than") else "unparsable"
    return InvalidEvent("bad_timestamp", f"{why} {field} {value!r}")


def clock(event: Any, name: str) -> datetime | None:
    """One of Segment's other times (`originalTimestamp`, `sentAt`, `receivedAt`), or None; a bad
    one raises bad_timestamp naming it."""
    value = (event.model_extra or {}).get(name)
    if value is None:
        return None
    try:
        return TIME.validate_python(value)
    except ValidationError as err:
        raise _bad_time(name, err.errors(include_url=False)[0]["type"], value) from None


def event_time(event: Any) -> datetime:
    """Segment's `timestamp` for a call that has none (its spec, "Timestamps"): the device's
    `originalTimestamp` corrected by the device clock's skew, `sentAt - receivedAt`, when all three
    are there; else `originalTimestamp`; else `receivedAt`; else missing_field."""
    original, sent, received = (clock(event, n) for n in CLOCK_FIELDS)
    if original is not None and sent is not None and received is not None:
        t = _utc(received) - (_utc(sent) - _utc(original))
        if not EPOCH <= t < LATEST:
            raise InvalidEvent("bad_timestamp", f"out of range (1970..2199) timestamp {t.isoformat()!r} "
                                                "(receivedAt - (sentAt - originalTimestamp))")
        return t
    if original is not None:
        return original
    if received is not None:
        return received
    raise InvalidEvent("missing_field", "missing field 'timestamp' (and no originalTimestamp or receivedAt)")


def _utc(t: datetime) -> datetime:
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def parse_event(raw: bytes | str) -> Event:
    """Validate one JSON document as a Segment event, or raise InvalidEvent."""
    try:
        event = EVENT.validate_json(raw)
    except ValidationError as err:
        raise _explain(err) from None
    _no_inf_nan(raw)
    if event.timestamp is None:
        event.timestamp = event_time(event)
    return event


def _no_inf_nan(raw: bytes | str) -> None:
    """NaN and Infinity are not JSON (RFC 8259), though pydantic's parser takes them; a NaN usage
    would pass every ratio test. Checked only when the text could hold one."""
    nan, inf = (b"NaN", b"Infinity") if isinstance(raw, bytes) else ("NaN", "Infinity")
    if nan not in raw and inf not in raw:  # type: ignore[operator]
        return

    def refuse(constant: str):
        raise InvalidEvent("not_json", f"{constant} is not JSON (RFC 8259)")

    json.loads(raw, parse_constant=refuse)
