"""Rules files: the shipped example loads; a bad file names the file, line and field."""
import subprocess
import sys
from pathlib import Path

import pytest

from schemas.rules import RulesError, load_rules, parse_duration

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = (ROOT / "examples/rules.yaml").read_text()


def test_example_loads():
    r = load_rules(ROOT / "examples/rules.yaml")
    assert r.version == "2026-12-07" and set(r.milestones) == {"team_invites", "usage_limit", "activation", "seat_growth",
                                                              "crm_integration"}
    assert r.cooldown == 30 * 86_400_000 and r.sla.pql == 3_600_000
    assert r.lateness == 7 * 86_400_000 and r.hold == 86_400_000


@pytest.mark.parametrize("text,ms", [("90s", 90_000), ("15m", 900_000), ("1h", 3_600_000), ("30d", 2_592_000_000),
                                     ("1h30m", 5_400_000)])
def test_durations(text, ms):
    assert parse_duration(text) == ms


@pytest.mark.parametrize("bad", ["10", "1w", "0s", "", "h1", 5])
def test_bad_durations(bad):
    with pytest.raises(ValueError):
        parse_duration(bad)


BROKEN = [
    # (replace this, with this, expected fragment of the message)
    ("    count: 3\n", "    count: 0\n", ":13: milestones.team_invites.count: Input should be greater than or equal to 1"),
    ("    within: 7d\n    points: 60", "    within: 7 days\n    points: 60", ":14: milestones.team_invites.within: expected a duration"),
    ('version: "2026-12-07"', "versio: x", "version: Field required"),
    ("{in: [salesforce, hubspot]}", "{among: [salesforce]}", "unknown operator 'among'"),
    ("{in: [salesforce, hubspot]}", "[salesforce, hubspot]", "a list needs an operator"),
    ("    sequence: [Source Connected, Job Run, Results Viewed]", "    event: Job Run\n    sequence: [A, B]",
     "milestones.activation: give either event or sequence"),
    ("  score: 60", "  score: 60\n  extra: 1", "qualify.extra: Extra inputs are not permitted"),
    ("employees: {gte: 10}", "employees: {gte: [10]}", "gte takes a number or a string"),
    ("milestones:", "milestones: [\n", "not valid YAML"),
    ("hold: 1d ", "hold: 23d ", ":42: hold: lateness + hold must be shorter than cooldown"),
]


@pytest.mark.parametrize("old,new,fragment", BROKEN)
def test_bad_rules_name_path_and_field(tmp_path, old, new, fragment):
    assert old in EXAMPLE
    f = tmp_path / "rules.yaml"
    f.write_text(EXAMPLE.replace(old, new, 1))
    with pytest.raises(RulesError) as err:
        load_rules(f)
    assert str(err.value).startswith(str(f)), err.value
    assert fragment in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(RulesError, match="cannot read rules file"):
        load_rules(tmp_path / "nope.yaml")


def test_cli_rules_check(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "streams.tools.cli", "rules", "check", str(ROOT / "examples/rules.yaml")],
                        capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0 and "ok: version 2026-12-07" in ok.stdout
    f = tmp_path / "bad.yaml"
    f.write_text(EXAMPLE.replace("    points: 20", "    points: -5"))
    bad = subprocess.run([sys.executable, "-m", "streams.tools.cli", "rules", "check", str(f)],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2
    assert f"{f}:" in bad.stderr and "milestones.crm_integration.points" in bad.stderr
