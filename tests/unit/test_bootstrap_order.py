"""`pql bootstrap` runs a history in event-time order whatever the file's order. An export sorted by
account (then time) is the common case: read as it is, a user's events without `context.groupId`
come after their account's later events, and the lateness bound drops them."""
import io

from detectors.engine import Engine
from helpers import export_by_account
from schemas.rules import load_rules
from streams.tools.bootstrap import in_time_order
from streams.tools.replay import replay
from streams.tools.simulate import Simulator


def test_an_export_sorted_by_account_runs_as_the_stream_in_time_order_would():
    lines = list(Simulator(accounts=300, seed=5, late_group=0.3, span_ms=42 * 86_400_000).events(20_000))
    export = export_by_account(lines) + [b"not json"]
    rules = load_rules("examples/rules.yaml")
    as_read = replay(export, Engine(rules), {}, io.StringIO(), io.StringIO())
    assert as_read.too_late > 0
    order, valid = in_time_order(export)
    assert sorted(order) == list(range(len(export)))
    assert len(export) - 1 in order[:len(export) - valid]  # lines that do not parse first (reported), then by time
    ours, theirs = io.StringIO(), io.StringIO()
    in_order = replay([export[i] for i in order], Engine(rules), {}, ours, io.StringIO())
    timed = replay(lines, Engine(rules), {}, theirs, io.StringIO())
    assert in_order.too_late == 0 and in_order.handoffs == timed.handoffs > 0
    assert sorted(ours.getvalue().splitlines()) == sorted(theirs.getvalue().splitlines())
