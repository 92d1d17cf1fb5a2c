"""The `pql backtest --html` report: one self-contained file (no network: inline CSS and SVG charts, a
few lines of inline script that record each chart's drawn size for tests), from `backtest.report`."""
from __future__ import annotations

from html import escape
from typing import Any

COLORS = {"current": "#64748b", "candidate": "#2563eb"}
W, H, PAD = 720, 220, 40


def _chart(name: str, title: str, weeks: list[str], series: dict[str, list[int]]) -> str:
    """Grouped bars: per week, one bar per side."""
    top = max([1, *(v for vs in series.values() for v in vs)])
    slot = (W - 2 * PAD) / max(1, len(weeks))
    bar = min(40.0, slot / (len(series) + 1))
    parts = [f'<svg class="chart" data-chart="{name}" viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" '
             f'aria-label="{escape(title)}">',
             f'<line x1="{PAD}" y1="{H - PAD}" x2="{W - PAD}" y2="{H - PAD}" stroke="#cbd5e1"/>',
             f'<text x="{PAD}" y="16" class="t">{escape(title)} (max {top:,})</text>']
    for i, wk in enumerate(weeks):
        x0 = PAD + i * slot + (slot - bar * len(series)) / 2
        if len(weeks) <= 16 or i % max(1, len(weeks) // 16) == 0:
            parts.append(f'<text x="{x0:.1f}" y="{H - PAD + 16}" class="x">{escape(wk[5:])}</text>')
        for j, (side, values) in enumerate(series.items()):
            h = (H - 2 * PAD - 10) * values[i] / top
            parts.append(f'<rect class="bar" data-series="{side}" data-week="{escape(wk)}" data-value="{values[i]}" '
                         f'x="{x0 + j * bar:.1f}" y="{H - PAD - h:.1f}" width="{bar - 2:.1f}" height="{h:.1f}" '
                         f'fill="{COLORS[side]}"><title>{side} {escape(wk)}: {values[i]:,}</title></rect>')
    return "".join(parts) + "</svg>"


def _funnel(rep: dict) -> str:
    """Accounts with relevant events -> handed off (-> accepted or converted, with responses), per side."""
    steps = []
    for side in ("current", "candidate"):
        s = rep["sides"][side]
        row = [("relevant events", s["accounts_with_relevant_events"]), ("handed off", s["accounts_handed_off"])]
        if "responses" in rep:
            o = rep["responses"][side]["outcomes"]
            row.append(("accepted or converted", o.get("accepted", 0) + o.get("converted", 0)))
        steps.append((side, row))
    top = max([1, *(v for _, row in steps for _, v in row)])
    bar_h, rows = 18, sum(len(row) for _, row in steps)
    height = rows * (bar_h + 8) + 30
    parts = [f'<svg class="chart" data-chart="funnel" viewBox="0 0 {W} {height}" width="{W}" height="{height}">',
             '<text x="0" y="16" class="t">Funnel: accounts</text>']
    y = 30
    for side, row in steps:
        for label, v in row:
            width = max(1.0, (W - 260) * v / top)
            parts.append(f'<text x="0" y="{y + 13}" class="x">{side}: {escape(label)}</text>'
                         f'<rect class="bar" data-series="{side}" data-value="{v}" x="200" y="{y}" width="{width:.1f}" '
                         f'height="{bar_h}" fill="{COLORS[side]}"/>'
                         f'<text x="{206 + width:.1f}" y="{y + 13}" class="x">{v:,}</text>')
            y += bar_h + 8
    return "".join(parts) + "</svg>"


def _table(rows: list[dict], title: str) -> str:
    if not rows:
        return f"<h3>{escape(title)}: none</h3>"
    body = "".join(
        f"<tr><td>{escape(r['account'])}</td><td>{escape(r['qualified_at'])}</td><td>{r['score']}</td>"
        f"<td>{escape(', '.join(r['milestones']))}</td><td>{escape(r['other_side'])}</td>"
        f"<td>{'<br>'.join(escape(f'{m}: ' + '; '.join(ev)) for m, ev in r['evidence'].items())}</td></tr>"
        for r in rows)
    return (f"<h3>{escape(title)}: {len(rows):,}</h3><table class='accounts' data-list='{escape(title)}'><tr><th>account</th>"
            f"<th>qualified at</th><th>score</th><th>milestones</th><th>the other rules</th><th>evidence (latest 3)</th>"
            f"</tr>{body}</table>")


def _totals(rep: dict) -> str:
    cur, cand = rep["sides"]["current"]["total"], rep["sides"]["candidate"]["total"]
    rows: list[tuple[str, Any, Any]] = [("qualifications", cur["qualifications"], cand["qualifications"]),
                                        ("handoffs", cur["handoffs"], cand["handoffs"])]
    for group in ("by_precedence", "suppressed", "sla_clocks"):
        for k in sorted(set(cur[group]) | set(cand[group])):
            rows.append((f"{group.replace('_', ' ')}: {k}", cur[group].get(k, 0), cand[group].get(k, 0)))
    s = rep["sides"]
    rows.append(("median hours, first event to handoff", s["current"]["median_hours_to_first_handoff"],
                 s["candidate"]["median_hours_to_first_handoff"]))
    if "responses" in rep:
        rows.append(("precision (accepted+converted of answered)", rep["responses"]["current"]["precision"],
                     rep["responses"]["candidate"]["precision"]))
    return "<table class='totals'><tr><th></th><th>current</th><th>candidate</th></tr>" + "".join(
        f"<tr><td>{escape(n)}</td><td>{'-' if a is None else a}</td><td>{'-' if b is None else b}</td></tr>"
        for n, a, b in rows) + "</table>"


STYLE = """body{font:14px system-ui,sans-serif;margin:24px;color:#0f172a;max-width:1100px}
table{border-collapse:collapse;margin:8px 0 20px}td,th{border:1px solid #e2e8f0;padding:4px 8px;text-align:left;
vertical-align:top;font-size:13px}.t{font:bold 13px sans-serif}.x{font:11px sans-serif;fill:#475569}
.key span{display:inline-block;width:12px;height:12px;margin:0 4px 0 12px;vertical-align:middle}"""

# records what the browser drew (tests read it back with chromium --dump-dom)
SCRIPT = """for (const el of document.querySelectorAll('svg.chart .bar')) {
  const b = el.getBBox(); el.setAttribute('data-drawn', b.width.toFixed(1) + 'x' + b.height.toFixed(1)); }"""


def render(rep: dict) -> str:
    weeks = list(rep["weeks"])
    series = {k: {side: [rep["weeks"][w][side][k] for w in weeks] for side in ("current", "candidate")}
              for k in ("handoffs", "qualifications")}
    s = rep["sides"]
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>pql backtest</title>
<style>{STYLE}</style></head><body>
<h1>pql backtest</h1>
<p>{rep['lines']:,} lines. Current: <code>{escape(s['current']['rules'])}</code> (version {escape(s['current']['version'])});
candidate: <code>{escape(s['candidate']['rules'])}</code> (version {escape(s['candidate']['version'])}).</p>
<p class="key"><span style="background:{COLORS['current']}"></span>current<span style="background:{COLORS['candidate']}"></span>candidate</p>
{_chart("handoffs", "Handoffs per week", weeks, series["handoffs"])}
{_chart("qualifications", "Qualifications per week", weeks, series["qualifications"])}
{_funnel(rep)}
<h2>Totals</h2>{_totals(rep)}
<h2>Accounts</h2>{_table(rep["gained"], "gained by the candidate")}{_table(rep["lost"], "lost by the candidate")}
<script>{SCRIPT}</script></body></html>
"""
