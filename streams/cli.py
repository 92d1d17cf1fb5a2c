"""The `pql` command line. Each command is a thin shell over a module that does the work."""
from __future__ import annotations

import sys

import click

from schemas.rules import Rules, RulesError, load_rules


def _rules(path: str) -> Rules:
    try:
        return load_rules(path)
    except RulesError as err:
        click.echo(f"pql: bad rules file: {err}", err=True)
        sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """pql-pipeline: real-time product-qualified lead detection."""


@main.group()
def rules() -> None:
    """Work with rules files."""


@rules.command("check")
@click.argument("file", type=click.Path(dir_okay=False))
def rules_check(file: str) -> None:
    """Validate a rules FILE; on error name the path and field, exit 2."""
    r = _rules(file)
    click.echo(
        f"{file}: ok: version {r.version}, {len(r.milestones)} milestones "
        f"({', '.join(r.milestones)}), qualify at {r.qualify.score} points"
    )


@main.command()
@click.argument("events", type=click.Path(exists=True, dir_okay=False))
@click.option("--rules", "rules_path", required=True, type=click.Path(dir_okay=False), help="Rules YAML.")
@click.option("--mql", "mql_path", type=click.Path(exists=True, dir_okay=False),
              help='MQL records, JSON lines {"account_id","stage","owner"}.')
@click.option("--milestones", is_flag=True, help="Also print pql.milestone events.")
def replay(events: str, rules_path: str, mql_path: str | None, milestones: bool) -> None:
    """Run the detection engine over an EVENTS.jsonl file (the backtest).

    Handoffs and suppressions (CloudEvents, one per line) go to stdout; rejected lines and a
    summary go to stderr. Exits 0 when the run completes, even if some lines were invalid.
    """
    from detectors.engine import Engine
    from streams import replay as rp

    engine = Engine(_rules(rules_path))
    try:
        mql = rp.load_mql(mql_path) if mql_path else {}
    except rp.MqlFileError as err:
        click.echo(f"pql: bad MQL file: {err}", err=True)
        sys.exit(2)
    summary = rp.run(events, engine, mql, milestones)
    click.echo(summary.render(), err=True)


if __name__ == "__main__":
    main()
