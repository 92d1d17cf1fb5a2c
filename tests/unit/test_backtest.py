"""`pql backtest` on a generated history with a known difference between two rule files."""
import io
import json

from click.testing import CliRunner

from backtest_history import CURRENT, backtest, history
from schemas.sales import SalesResponse
from streams.tools import backtest as bt
from streams.tools.backtest_html import render
from helpers import at

def test_counts_per_week_and_in_total_are_the_known_difference():
    rep = backtest()
    weeks = {w: (v["current"]["handoffs"], v["candidate"]["handoffs"]) for w, v in rep["weeks"].items()}
    assert weeks == {"2026-W45": (3, 3), "2026-W46": (0, 2), "2026-W47": (2, 1)}
    assert rep["sides"]["current"]["total"]["handoffs"] == 5 and rep["sides"]["candidate"]["total"]["handoffs"] == 6
    assert rep["sides"]["candidate"]["total"]["by_precedence"] == {"pql_only": 6}
    assert rep["sides"]["current"]["total"]["sla_clocks"] == {"pql": 5}
    assert [g["account"] for g in rep["gained"]] == ["b1", "b2"]
    assert [g["milestones"] for g in rep["gained"]] == [["invites"], ["invites"]]
    assert [g["other_side"] for g in rep["gained"]] == ["not qualified", "not qualified"]
    assert [(r["account"], r["milestones"]) for r in rep["lost"]] == [("c1", ["crm"])]
    # first relevant event -> first handoff: current a* 2 h (third invite), c1 d1 0 h; candidate a* b* 1 h, d1 0 h
    assert rep["sides"]["current"]["median_hours_to_first_handoff"] == 2.0
    assert rep["sides"]["candidate"]["median_hours_to_first_handoff"] == 1.0


def test_past_responses_give_a_precision_estimate_for_each_side():
    from helpers import run

    out, _, _ = run(CURRENT, [json.loads(x) for x in history()])
    ids = {o["subject"]: o["id"] for o in out if o["type"] == "pql.handoff"}
    answers = [("a1", "accepted", None), ("a2", "rejected", "not_icp"), ("c1", "converted", None)]
    responses = [(n, SalesResponse.model_validate({"handoff_id": ids[a], "account_id": a, "status": status,
                                                   "reason": reason, "timestamp": at(days=20)}))
                 for n, (a, status, reason) in enumerate(answers, 1)]
    rep = backtest(responses)
    assert rep["responses"]["current"] == {
        "outcomes": {"accepted": 1, "converted": 1, "not answered": 2, "rejected: not_icp": 1}, "precision": 0.667}
    assert rep["responses"]["candidate"] == {
        "outcomes": {"accepted": 1, "not answered": 4, "rejected: not_icp": 1}, "precision": 0.5}


def test_the_period_limits_what_is_counted_not_what_builds_state():
    rep = backtest(period=(bt.parse_ms(at(days=8)), bt.parse_ms(at(days=15))))
    assert list(rep["weeks"]) == ["2026-W46"]
    assert [g["account"] for g in rep["gained"]] == ["b1", "b2"] and rep["lost"] == []


def test_the_terminal_table_fits_80_columns_and_names_the_difference():
    out = io.StringIO()
    bt.render_text(backtest(), out)
    text = out.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "accounts gained by the candidate: 2, lost: 1" in text
    assert any(line.startswith("- c1 ") and "crm" in line for line in text.splitlines())
    assert any(line.split()[:3] == ["handoffs", "5", "6"] for line in text.splitlines())


def test_the_command_line_prints_json_and_writes_a_self_contained_html(tmp_path):
    from streams.tools.cli import main

    events = tmp_path / "events.jsonl"
    events.write_bytes(b"\n".join(history()) + b"\n")
    cur, cand = tmp_path / "current.yaml", tmp_path / "candidate.yaml"
    for path, version, count, crm in ((cur, "v1", 3, '["salesforce", "hubspot"]'), (cand, "v2", 2, '["salesforce"]')):
        path.write_text(f"""version: {version}
milestones:
  invites: {{event: Invite Sent, distinct: properties.invitee_email, count: {count}, within: 7d, points: 60}}
  crm: {{event: Integration Connected, where: {{properties.integration: {{in: {crm}}}}}, points: 60}}
qualify: {{score: 60, window: 30d}}
""")
    html = tmp_path / "report.html"
    res = CliRunner().invoke(main, ["backtest", str(events), "--rules", str(cur), "--against", str(cand), "--json",
                                    "--html", str(html)])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)
    assert [g["account"] for g in rep["gained"]] == ["b1", "b2"]
    page = html.read_text()
    assert "http://" not in page and "https://" not in page  # nothing to fetch
    assert page.count('data-series="candidate"') >= 3


def test_the_html_report_has_a_bar_per_week_and_side():
    page = render(backtest())
    for week, (a, b) in {"2026-W45": (3, 3), "2026-W46": (0, 2), "2026-W47": (2, 1)}.items():
        assert f'data-series="current" data-week="{week}" data-value="{a}"' in page
        assert f'data-series="candidate" data-week="{week}" data-value="{b}"' in page
