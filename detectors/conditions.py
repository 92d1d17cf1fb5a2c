"""Conditions (`where`, `fit.traits`) compiled once into plain predicates.

A condition is a bare scalar (equals) or a mapping of operators that must all hold. A missing
value fails every operator except ``exists: false``. Comparisons never raise: a number is only
compared with a number, a string with a string (booleans are not numbers).
"""
from __future__ import annotations

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


def _kind(v: Any) -> type | None:
    if isinstance(v, bool):
        return bool
    if isinstance(v, (int, float)):
        return float
    if isinstance(v, str):
        return str
    return None


def _same(a: Any, b: Any) -> bool:
    return _kind(a) is _kind(b) and a == b if _kind(a) or _kind(b) else a == b


def _ordered(op: str, arg: Any) -> Callable[[Any], bool]:
    kind = _kind(arg)

    def test(v: Any) -> bool:
        if _kind(v) is not kind:
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
