"""Conditions (`where`, `fit.traits`) compiled once into plain predicates.

A condition is a bare scalar (equals) or a mapping of operators that must all hold. A missing
value fails every operator except ``exists: false``. Comparisons never raise. A number in the rule
is compared with numbers and with numeric strings ("4500"); a boolean in the rule matches booleans
and the strings "true"/"false"; a string in the rule, strings only (booleans are never numbers).
See docs/rules.md, "Values as payloads carry them".
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable

MISSING = object()

Getter = Callable[[Any], Any]
Predicate = Callable[[Any], bool]


def getter(path: str) -> Getter:
    """'properties.plan.name' -> function(event_or_dict) returning the value or MISSING."""
    parts = path.split(".")

    def get(obj: Any) -> Any:
        for part in parts:
            if isinstance(obj, dict):
                obj = obj.get(part, MISSING)
            elif obj is MISSING or obj is None:
                return MISSING
            else:
                value = getattr(obj, part, MISSING)
                if value is MISSING:
                    extra = getattr(obj, "model_extra", None) or {}
                    value = extra.get(part, MISSING)
                obj = value
            if obj is MISSING:
                return MISSING
        return obj

    return get


_DECIMAL = re.compile(r"\s*[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?\s*", re.ASCII)


def number(v: Any) -> float | None:
    """`v` as a finite number: a number, or a string written as a plain decimal number ("4500",
    " 12.5", "-3", "1e3"), as Segment's spec types `employees` (a String) and SDKs and warehouse
    exports often send numbers. Not booleans, not "1,000", "0x10", "NaN", "inf" or "51-200"."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        f = float(v)
    elif isinstance(v, str) and len(v) <= 64 and _DECIMAL.fullmatch(v):
        f = float(v)
    else:
        return None
    return f if math.isfinite(f) else None


def _boolean(v: Any) -> bool | None:
    """A boolean, or the string "true"/"false" in any case (a stringified boolean)."""
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in ("true", "false"):
        return v.strip().lower() == "true"
    return None


def _kind(v: Any) -> type | None:
    if isinstance(v, bool):
        return bool
    if isinstance(v, (int, float)):
        return float
    if isinstance(v, str):
        return str
    return None


def _same(a: Any, arg: Any) -> bool:
    """Does value `a` equal the rule's `arg`? A number arg also equals a numeric string, a boolean
    arg the string "true"/"false"; otherwise kinds must match."""
    kind = _kind(arg)
    if kind is float:
        n = number(a)
        return n is not None and n == arg
    if kind is bool:
        return _boolean(a) is arg
    return _kind(a) is kind and a == arg if kind or _kind(a) else a == arg


def _ordered(op: str, arg: Any) -> Callable[[Any], bool]:
    kind = _kind(arg)

    def test(v: Any) -> bool:
        if kind is float:
            v = number(v)
            if v is None:
                return False
        elif _kind(v) is not kind:
            return False
        if op == "gt":
            return v > arg
        if op == "gte":
            return v >= arg
        if op == "lt":
            return v < arg
        return v <= arg

    return test


def _operator(op: str, arg: Any) -> Callable[[Any], bool]:
    if op == "eq":
        return lambda v: v is not MISSING and _same(v, arg)
    if op == "in":
        return lambda v: v is not MISSING and any(_same(v, a) for a in arg)
    if op == "not_in":
        return lambda v: v is not MISSING and not any(_same(v, a) for a in arg)
    if op == "exists":
        return (lambda v: v is not MISSING and v is not None) if arg else (lambda v: v is MISSING or v is None)
    test = _ordered(op, arg)
    return lambda v: v is not MISSING and test(v)


def compile_condition(cond: Any) -> Callable[[Any], bool]:
    """One field's condition -> predicate over that field's value."""
    if not isinstance(cond, dict):
        return _operator("eq", cond)
    tests = [_operator(op, arg) for op, arg in cond.items()]
    return lambda v: all(t(v) for t in tests)


def compile_conditions(conditions: dict[str, Any]) -> Predicate:
    """{field path: condition} -> predicate over an event or a dict; all must hold."""
    checks = [(getter(path), compile_condition(cond)) for path, cond in conditions.items()]
    if not checks:
        return lambda obj: True
    return lambda obj: all(test(get(obj)) for get, test in checks)
