"""The `pql backtest --html` report opened in a real headless browser (Debian's Chromium,
installed by `deploy/stack.sh browser`): its charts are drawn with the expected series, and a
screenshot is saved next to the report (`report.png` in the test's temp dir)."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from backtest_history import backtest  # a generated history with a known difference
from streams.tools.backtest_html import render

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def chromium() -> str:
    res = subprocess.run([str(ROOT / "deploy/stack.sh"), "browser"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    path = shutil.which("chromium")
    assert path, "deploy/stack.sh browser did not put chromium on PATH"
    return path


def browse(chromium: str, *args: str) -> str:
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout


def test_the_report_renders_its_charts_in_chromium(chromium, tmp_path):
    page = tmp_path / "report.html"
    page.write_text(render(backtest()))
    dom = browse(chromium, "--virtual-time-budget=2000", "--dump-dom", page.as_uri())
    drawn = re.findall(r'<rect class="bar" data-series="(\w+)" data-week="([\w-]+)" data-value="(\d+)"[^>]*'
                       r'data-drawn="([\d.]+)x([\d.]+)"', dom)
    # every week of both sides has a bar the browser laid out, as tall as its value says
    assert {(s, w, int(v)) for s, w, v, _, _ in drawn} >= {
        ("current", "2026-W45", 3), ("candidate", "2026-W46", 2), ("current", "2026-W47", 2)}
    heights = {(s, w, int(v)): float(h) for s, w, v, _, h in drawn}
    assert heights[("candidate", "2026-W46", 2)] > 0 and heights[("current", "2026-W46", 0)] == 0
    assert heights[("current", "2026-W45", 3)] > heights[("current", "2026-W47", 2)] > 0
    assert all(float(wd) > 0 for _, _, _, wd, _ in drawn)
    assert "gained by the candidate: 2" in dom and "lost by the candidate: 1" in dom
    shot = tmp_path / "report.png"
    browse(chromium, "--window-size=1100,1300", f"--screenshot={shot}", page.as_uri())
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
