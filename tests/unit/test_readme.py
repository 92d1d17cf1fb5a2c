"""The README and docs say what the code does."""
import io
import json
import re
from pathlib import Path

from detectors.engine import Engine
from schemas.rules import load_rules
from streams.tools.replay import replay

ROOT = Path(__file__).resolve().parents[2]


def test_the_readme_handoff_is_what_replay_publishes():
    out = io.StringIO()
    with open(ROOT / "examples/first-events.jsonl", "rb") as f:
        replay(f, Engine(load_rules(ROOT / "examples/rules.yaml")), {}, out, io.StringIO())
    (handoff,) = [json.loads(line) for line in out.getvalue().splitlines()]
    readme = (ROOT / "README.md").read_text()
    shown = json.loads(re.search(r"```json\n(.*?)```", readme, flags=re.S).group(1))
    assert shown == handoff
    assert readme.count(handoff["id"]) >= 3  # replay, live tail, respond


def test_every_setting_is_documented():
    from streams.config import Settings

    doc = (ROOT / "docs/configuration.md").read_text()
    missing = [f"PQL_{name.upper()}" for name in Settings.model_fields if f"`PQL_{name.upper()}`" not in doc]
    assert not missing, f"docs/configuration.md does not document {missing}"
