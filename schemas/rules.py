"""Rules contract: the YAML file that says what a milestone is and when an account qualifies.

``load_rules(path)`` returns validated :class:`Rules` or raises :class:`RulesError`, whose message
names the file, the line and the field (``rules.yaml:12: milestones.team_invites.count: ...``).
Durations (``90s``, ``15m``, ``1h``, ``30d``, or combined ``1h30m``) are held as milliseconds.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator,
)

_UNITS = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_DURATION = re.compile(r"^(?:\d+[smhd])+$")
OPERATORS = ("eq", "in", "not_in", "gt", "gte", "lt", "lte", "exists")
STAGES = ("Lead", "MQL", "SAL", "SQL", "Opportunity", "Customer", "Recycled", "Disqualified")


def parse_duration(value: Any) -> int:
    """'1h30m' -> 5_400_000 (ms). Rejects bare numbers: a unit is always required."""
    if isinstance(value, str) and _DURATION.match(value.strip()):
        ms = sum(int(n) * _UNITS[u] for n, u in re.findall(r"(\d+)([smhd])", value))
        if ms > 0:
            return ms
    raise ValueError(f"expected a duration such as 90s, 15m, 1h or 30d, got {value!r}")


def parse_wait(value: Any) -> int:
    """Like parse_duration, but zero (``0s``) is allowed."""
    if isinstance(value, str) and re.fullmatch(r"0+[smhd]", value.strip()):
        return 0
    return parse_duration(value)


Duration = Annotated[int, BeforeValidator(parse_duration)]
Wait = Annotated[int, BeforeValidator(parse_wait)]
Name = Annotated[str, Field(min_length=1)]


def check_condition(field: str, cond: Any) -> Any:
    """Validate one condition (a bare scalar, or a mapping of operators)."""
    if isinstance(cond, list):
        raise ValueError(f"{field}: a list needs an operator, e.g. {{in: [...]}}")
    if not isinstance(cond, dict):
        return cond
    if not cond:
        raise ValueError(f"{field}: empty condition")
    for op, arg in cond.items():
        if op not in OPERATORS:
            raise ValueError(f"{field}: unknown operator {op!r} (one of {', '.join(OPERATORS)})")
        if op in ("in", "not_in") and not isinstance(arg, list):
            raise ValueError(f"{field}: {op} takes a list")
        if op in ("gt", "gte", "lt", "lte") and (
            isinstance(arg, bool) or not isinstance(arg, (int, float, str))
        ):
            raise ValueError(f"{field}: {op} takes a number or a string")
        if op == "exists" and not isinstance(arg, bool):
            raise ValueError(f"{field}: exists takes true or false")
    return cond


def _conditions(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError("expected a mapping of field: condition")
    return {str(k): check_condition(str(k), v) for k, v in value.items()}


Conditions = Annotated[dict[str, Any], BeforeValidator(_conditions)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Ratio(_Strict):
    of: Name
    to: Name
    at_least: Annotated[float, Field(gt=0)]


class Growth(_Strict):
    """A trend: the count in the window `over` ending at an event is at least `at_least` times the
    count in the `over` before it, and at least `min`."""

    over: Duration
    at_least: Annotated[float, Field(gt=0)]
    min: Annotated[int, Field(ge=1)] = 1


class Milestone(_Strict):
    description: str | None = None
    type: Literal["track", "page", "screen"] = "track"
    event: Name | list[Name] | None = None   # a name, a list of names (any of them), or "*" (every call of `type`)
    where: Conditions = {}
    distinct: Name | None = None
    count: Annotated[int, Field(ge=1)] = 1
    within: Duration | None = None
    ratio: Ratio | None = None
    sequence: Annotated[list[Name], Field(min_length=2)] | None = None
    growth: Growth | None = None
    fades: Duration | None = None            # its points stop counting after this long without a matching event
    points: Annotated[int, Field(ge=0)]

    @model_validator(mode="after")
    def _one_kind(self) -> "Milestone":
        if self.sequence is not None:
            if self.event is not None:
                raise ValueError("give either event or sequence, not both")
            if self.ratio or self.distinct or self.count != 1:
                raise ValueError("a sequence takes no ratio, distinct or count")
            if self.within is None:
                raise ValueError("a sequence needs within")
        elif self.event is None:
            raise ValueError("give event (or sequence)")
        elif isinstance(self.event, list):
            if not self.event:
                raise ValueError("event: give at least one name")
            if "*" in self.event:
                raise ValueError('event: "*" (every call) stands alone, not in a list')
            if len(set(self.event)) != len(self.event):
                raise ValueError("event: a name is listed twice")
        if self.ratio is not None and (self.distinct or self.count != 1 or self.within):
            raise ValueError("a ratio looks at one event: it takes no distinct, count or within")
        if self.growth is not None and (self.sequence or self.ratio or self.count != 1 or self.within):
            raise ValueError("growth compares two windows of its own (over): it takes no count, within, ratio or sequence")
        if self.fades is not None and self.fades <= 0:
            raise ValueError("fades: give a duration")
        return self

    @property
    def kind(self) -> str:
        return "sequence" if self.sequence else "ratio" if self.ratio else "growth" if self.growth else "count"

    @property
    def names(self) -> tuple[str, ...]:
        """Event names this milestone listens to ("*": every call of its type)."""
        if self.sequence:
            return tuple(self.sequence)
        return tuple(self.event) if isinstance(self.event, list) else (self.event or "",)


class Sla(_Strict):
    pql: Duration = 3_600_000
    mql: Duration = 86_400_000


class Fit(_Strict):
    traits: Conditions


class Qualify(_Strict):
    score: Annotated[int, Field(ge=1)]
    window: Duration


MilestoneId = Annotated[str, Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")]


DAY = 86_400_000


class Rules(_Strict):
    version: Name
    cooldown: Duration = 30 * DAY
    lateness: Duration = 7 * DAY     # how far behind an account's newest event an event may be and still count
    hold: Duration = DAY             # how long before a user's group call their unattributed events still count
    settle: Wait = 0                 # how long, in event time, a qualification waits for earlier events (0: not at all)
    sla: Sla = Sla()
    fit: Fit | None = None
    milestones: Annotated[dict[MilestoneId, Milestone], Field(min_length=1)]
    qualify: Qualify

    @model_validator(mode="before")
    @classmethod
    def _version_text(cls, data: Any) -> Any:
        # YAML reads `version: 2026-11-23` as a date; the version is a label, keep it as written.
        if isinstance(data, dict) and data.get("version") is not None and not isinstance(data["version"], str):
            data = {**data, "version": str(data["version"])}
        return data

    @field_validator("hold")
    @classmethod
    def _bound_under_cooldown(cls, v: int, info: ValidationInfo) -> int:
        cooldown, lateness = info.data.get("cooldown"), info.data.get("lateness")
        if cooldown is not None and lateness is not None and lateness + v >= cooldown:
            raise ValueError("lateness + hold must be shorter than cooldown (a late event could otherwise "
                             "reorder handoff episodes)")
        return v

    @field_validator("settle")
    @classmethod
    def _settle_within_lateness(cls, v: int, info: ValidationInfo) -> int:
        lateness = info.data.get("lateness")
        if lateness is not None and v > lateness:
            raise ValueError("settle must not be longer than lateness (a waiting qualification needs its events)")
        return v

    @model_validator(mode="after")
    def _growth_windows_settled(self) -> "Rules":
        # A trend's earlier window must be final when its later one is judged: no event may still
        # arrive in it (late ones by `lateness`, held ones by `hold` before their group call).
        for mid, m in self.milestones.items():
            if m.growth is not None and m.growth.over < self.lateness + 2 * self.hold:
                raise ValueError(f"milestones.{mid}.growth.over: must be at least lateness + 2 x hold "
                                 f"({(self.lateness + 2 * self.hold) // 3_600_000} h here): events may still "
                                 "arrive in its earlier window until then")
        return self

    @property
    def bound(self) -> int:
        """How far behind its account's newest event an event may be and still count (ms): the
        arrival disorder allowed (`lateness`) plus the attribution delay (`hold`)."""
        return self.lateness + self.hold


class RulesError(ValueError):
    """A rules file that cannot be used; the message names file, line and field."""


def _line_of(node: yaml.Node | None, loc: tuple) -> int | None:
    """Line (1-based) of the YAML node at loc, or of the deepest parent found."""
    line = node.start_mark.line + 1 if node is not None else None
    for key in loc:
        if not isinstance(node, yaml.MappingNode):
            break
        for k, v in node.value:
            if k.value == str(key):
                node, line = v, k.start_mark.line + 1
                break
        else:
            break
    return line


def load_rules(path: str | Path) -> Rules:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise RulesError(f"{path}: cannot read rules file: {err.strerror}") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise RulesError(f"{path}{where}: not valid YAML: {getattr(err, 'problem', err)}") from None
    if not isinstance(data, dict):
        raise RulesError(f"{path}: the rules file must be a mapping (version, milestones, qualify, ...)")
    try:
        return Rules.model_validate(data)
    except ValidationError as err:
        first = err.errors(include_url=False)[0]
        loc = tuple(p for p in first["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        field = ".".join(str(p) for p in loc) or "(top level)"
        line = _line_of(node, loc)
        msg = first["msg"].removeprefix("Value error, ")
        more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
        raise RulesError(f"{path}{f':{line}' if line else ''}: {field}: {msg}{more}") from None
