"""The `pql` command line. Each command is a thin shell over a module that does the work."""
from __future__ import annotations

import sys

import click
from pydantic import ValidationError

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
@click.option("--stages", is_flag=True, help="Also print pql.stage events (qualified, handed_off).")
@click.option("--now", "now", metavar="TIME",
              help="Read the SLA clocks at TIME (ISO 8601, or 'now') after the last event: print a "
                   "pql.sla_breached for every handoff due by then.")
@click.option("--responses", "responses_path", type=click.Path(exists=True, dir_okay=False),
              help="Sales responses, JSON lines as on sales.responses, applied in time order among the events.")
@click.option("--alert-max-age", type=click.FloatRange(min=0), default=86400.0, show_default=True,
              envvar="PQL_ALERT_MAX_AGE", metavar="SECONDS",
              help="A handoff whose qualifying event is older than this when decided is a backfill (flagged, "
                   "no SLA clock), as in the worker. 0: never.")
@click.option("--processed-at", metavar="TIME",
              help="Decide as a worker started at TIME (ISO 8601, or 'now') over this history would (backfill "
                   "flags, and the clock events without receivedAt are checked against for --max-future); "
                   "default: each event as it happened (the stream time).")
@click.option("--max-future", type=click.FloatRange(min=0, min_open=True), default=3600.0, show_default=True,
              envvar="PQL_MAX_FUTURE", metavar="SECONDS",
              help="An event dated more than this ahead of its receivedAt (else --processed-at) is corrected by "
                   "its sentAt, or refused as `future`, as in the worker.")
@click.option("--switch", "switches", multiple=True, metavar="LINE:RULES",
              help="From input line LINE on, decide with the rules file RULES, as a worker restarted with them "
                   "there would (a rules deploy: docs/operations.md \"Changing rules\"). Repeatable.")
def replay(events: str, rules_path: str, mql_path: str | None, milestones: bool, stages: bool,
           now: str | None, responses_path: str | None, alert_max_age: float, processed_at: str | None,
           max_future: float, switches: tuple[str, ...]) -> None:
    """Run the detection engine over an EVENTS.jsonl file (the backtest).

    Handoffs and suppressions (CloudEvents, one per line) go to stdout; rejected lines and a
    summary go to stderr. Exits 0 when the run completes, even if some lines were invalid.
    """
    from detectors.engine import Engine
    from streams.config import alert_max_age_ms
    from streams.tools import replay as rp

    engine = Engine(_rules(rules_path), alert_max_age_ms(alert_max_age))
    at: dict[int, Engine] = {}
    for s in switches:
        line, sep, path = s.partition(":")
        if not sep or not line.isdigit() or int(line) < 1:
            click.echo(f"pql: --switch {s!r}: give LINE:RULES, LINE a line number (from 1)", err=True)
            sys.exit(2)
        at[int(line)] = Engine(_rules(path), alert_max_age_ms(alert_max_age))
    try:
        mql = rp.load_mql(mql_path) if mql_path else {}
    except rp.MqlFileError as err:
        click.echo(f"pql: bad MQL file: {err}", err=True)
        sys.exit(2)
    now_ms, processed_ms = _time("--now", now), _time("--processed-at", processed_at)
    responses = rp.load_responses(responses_path, sys.stderr) if responses_path else []
    summary = rp.run(events, engine, mql, milestones, stages, now_ms, responses, processed_ms, int(max_future * 1000),
                     at)
    click.echo(summary.render(), err=True)


@main.command()
@click.argument("history", type=click.Path(exists=True, dir_okay=False))
@click.option("--rules", "rules_path", required=True, type=click.Path(dir_okay=False),
              help="The rules the workers will run next (PQL_RULES after the deploy).")
@click.option("--crash-after", type=int, hidden=True, help="(tests) exit after N records, before the commit.")
def bootstrap(history: str, rules_path: str, crash_after: int | None) -> None:
    """Rebuild the account tables from a HISTORY.jsonl with new rules, so that new milestones see the
    past; what they decide is published flagged backfill. One Kafka transaction. Stop the workers
    first (docs/operations.md "Changing rules")."""
    import time

    from detectors.engine import Engine
    from streams.tools import bootstrap as bs

    engine = Engine(_rules(rules_path), 0)  # decided now about the past: every handoff a backfill
    settings = _settings()
    say = lambda text: click.echo(f"pql bootstrap: {text}", err=True)  # noqa: E731
    with open(history, "rb") as f:
        lines = f.read().splitlines()
    try:
        res = bs.run(lines, engine, settings, int(time.time() * 1000), sys.stderr, crash_after, say)
    except bs.BootstrapError as err:
        say(str(err))
        sys.exit(1)
    s = res.summary
    say(f"{res.accounts:,} account states written ({res.kept_sales:,} with their sales history kept), "
        f"{s.handoffs:,} handoffs (backfill) and {sum(s.suppressed.values()):,} suppressions published, "
        f"{s.too_late:,} events too late, {sum(map(len, s.invalid.values())):,} invalid lines, in {res.seconds:.1f} s")


@main.command()
@click.argument("events", type=click.Path(exists=True, dir_okay=False))
@click.option("--rules", "rules_path", required=True, type=click.Path(dir_okay=False), help="The current rules YAML.")
@click.option("--against", "candidate_path", required=True, type=click.Path(dir_okay=False),
              help="The candidate rules YAML.")
@click.option("--mql", "mql_path", type=click.Path(exists=True, dir_okay=False),
              help='MQL records, JSON lines {"account_id","stage","owner"}.')
@click.option("--responses", "responses_path", type=click.Path(exists=True, dir_okay=False),
              help="Past sales responses to the current rules' handoffs (JSON lines as on sales.responses): "
                   "what sales made of the candidate's accounts.")
@click.option("--from", "from_", metavar="TIME", help="Count qualifications from TIME (ISO 8601); earlier events still build state.")
@click.option("--to", "to", metavar="TIME", help="Count qualifications before TIME (ISO 8601).")
@click.option("--html", "html_path", type=click.Path(dir_okay=False), help="Also write a self-contained HTML report here.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of the table.")
@click.option("--alert-max-age", type=click.FloatRange(min=0), default=86400.0, show_default=True,
              envvar="PQL_ALERT_MAX_AGE", metavar="SECONDS", help="As for `pql replay`.")
def backtest(events: str, rules_path: str, candidate_path: str, mql_path: str | None, responses_path: str | None,
             from_: str | None, to: str | None, html_path: str | None, as_json: bool, alert_max_age: float) -> None:
    """Compare two rules files over the same EVENTS.jsonl history, with the live engine: per week and
    in total, qualifications, handoffs, suppressions, accounts gained and lost, time to handoff, SLA
    load and (with --responses) a precision estimate."""
    import json

    from detectors.engine import Engine
    from streams.config import alert_max_age_ms
    from streams.tools import backtest as bt
    from streams.tools import replay as rp

    current, candidate = _rules(rules_path), _rules(candidate_path)
    try:
        mql = rp.load_mql(mql_path) if mql_path else {}
    except rp.MqlFileError as err:
        click.echo(f"pql: bad MQL file: {err}", err=True)
        sys.exit(2)
    responses = rp.load_responses(responses_path, sys.stderr) if responses_path else []
    period = (_time("--from", from_), _time("--to", to))
    max_age = alert_max_age_ms(alert_max_age)
    rep = rp.over_file(events, "backtest", sys.stderr.isatty() and not as_json, lambda f, progress: bt.run(
        f, (rules_path, current), (candidate_path, candidate), lambda r: Engine(r, max_age), mql, responses,
        period, progress))
    if html_path:
        from streams.tools.backtest_html import render

        with open(html_path, "w", encoding="utf-8") as out:
            out.write(render(rep))
    if as_json:
        click.echo(json.dumps(rep, indent=1))
    else:
        bt.render_text(rep, sys.stdout)
        if html_path:
            click.echo(f"\nHTML report: {html_path}")


def _checked(s, kafka: bool = False, redis: bool = False) -> None:
    """Kafka and/or Redis accept our credentials, or exit 2 naming the setting (never the secret)."""
    from streams.connect import ConnectError, check_kafka, check_redis

    try:
        if kafka:
            check_kafka(s)
        if redis:
            check_redis(s)
    except ConnectError as err:
        click.echo(f"pql: {err}", err=True)
        sys.exit(2)


def _time(option: str, value: str | None) -> int | None:
    """An ISO 8601 time or 'now', as ms; a bad one exits 2 naming the option."""
    if value is None:
        return None
    import time

    from detectors.timefmt import parse_ms

    try:
        return int(time.time() * 1000) if value == "now" else parse_ms(value)
    except ValueError:
        click.echo(f"pql: {option}: expected an ISO 8601 time or 'now', got {value!r}", err=True)
        sys.exit(2)


def _settings():
    from streams.config import SettingsError, load_settings

    try:
        return load_settings()
    except SettingsError as err:
        click.echo(f"pql: bad setting: {err}", err=True)
        sys.exit(2)


@main.command()
def worker() -> None:
    """Run the live worker (ingest + detection + CRM agents) until stopped.

    Configuration comes from PQL_* environment variables (see docs/configuration.md).
    """
    import logging

    from streams.worker.app import run_worker
    from streams.topics import TopicError

    s = _settings()
    logging.basicConfig(level=s.log_level.upper().replace("WARN", "WARNING"),
                        format="[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s")
    r = _rules(str(s.rules))
    _checked(s, kafka=True, redis=True)
    try:
        run_worker(s, r)
    except TopicError as err:
        click.echo(f"pql: {err}", err=True)
        sys.exit(2)


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--topic", help="Topic to publish to (default: the first of PQL_EVENTS_TOPICS, else product.events "
                              "with PQL_TOPIC_PREFIX).")
@click.option("--rate", type=float, help="Events per second (default: as fast as possible).")
def publish(file: str, topic: str | None, rate: float | None) -> None:
    """Publish a JSONL FILE of Segment events to Kafka, keyed by account (a line without one: by the
    account of its user's group call in the file)."""
    from pathlib import Path

    from streams.tools.publish import Publisher, publish as run, user_accounts
    from streams.topics import Topics

    s = _settings()
    _checked(s, kafka=True)
    with open(file, "rb") as f:
        users = user_accounts(f)
    pub = Publisher(s.confluent(), topic or Topics.of(s).events[0], users)
    with open(file, "rb") as f:
        if sys.stderr.isatty():
            with click.progressbar(length=Path(file).stat().st_size, label="publish", file=sys.stderr) as bar:
                last = [0]

                def progress(_n: int) -> None:
                    bar.update(f.tell() - last[0])
                    last[0] = f.tell()

                took = run(f, pub, rate, progress)
        else:
            took = run(f, pub, rate)
    click.echo(f"published {pub.sent} events to {pub.topic} in {took:.2f}s ({pub.sent / max(took, 1e-9):,.0f}/s); "
               f"{pub.keyed} keyed by account, {pub.sent - pub.keyed} unkeyed, {pub.failed} failed", err=True)
    sys.exit(1 if pub.failed else 0)


@main.command()
@click.option("--accounts", default=1000, show_default=True, help="Number of accounts.")
@click.option("--events", "count", default=100_000, show_default=True, help="Number of events.")
@click.option("--rate", type=float, help="Events per second (Kafka only; default: as fast as possible).")
@click.option("--seed", default=7, show_default=True)
@click.option("--now", is_flag=True, help="Stamp events with the current time instead of a simulated week.")
@click.option("--out", "out", type=click.Path(dir_okay=False), help="Write JSONL here instead of Kafka.")
@click.option("--late-group", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Share of accounts whose users act (without context.groupId) before the app sends `group`.")
@click.option("--days", type=click.FloatRange(min=0.001), default=7.0, show_default=True,
              help="Event time the simulated history spans (e.g. 56 for eight weeks, to backtest by week); it "
                   "starts on 2026-11-16, or ends at the start of today (UTC) when that would be in the future.")
def simulate(accounts: int, count: int, rate: float | None, seed: int, now: bool, out: str | None,
             late_group: float, days: float) -> None:
    """Synthetic product-usage traffic, to Kafka (product.events) or to a JSONL file."""
    from streams.tools.simulate import Simulator

    from streams.tools.simulate import start_by_now

    span = int(days * 86_400_000)
    sim = Simulator(accounts=accounts, seed=seed, live=now, late_group=late_group, span_ms=span,
                    start=start_by_now(span))
    lines = sim.events(count)
    if out:
        with open(out, "wb") as f:
            for line in lines:
                f.write(line + b"\n")
        click.echo(f"wrote {count} events for {accounts} accounts to {out}", err=True)
        return
    from streams.tools.publish import Publisher, publish as run
    from streams.topics import Topics

    s = _settings()
    _checked(s, kafka=True)
    pub = Publisher(s.confluent(), Topics.of(s).events[0])
    took = run(lines, pub, rate)
    click.echo(f"simulated {pub.sent} events for {accounts} accounts to {pub.topic} in {took:.2f}s", err=True)


@main.command()
@click.argument("handoff_id")
@click.option("--accept", "status", flag_value="accepted", help="Sales accepts the lead.")
@click.option("--reject", "reason", metavar="REASON",
              help="Sales rejects it: not_icp, duplicate, bad_data, student_or_research, competitor, no_budget, "
                   "bad_timing or other (other needs --note).")
@click.option("--convert", "status", flag_value="converted", help="The lead converted (e.g. an opportunity won).")
@click.option("--note", help="Free text, kept with the response.")
@click.option("--by", help="Who responded (rep id).")
@click.option("--account", help="The handoff's account (default: looked up in Redis by handoff id).")
def respond(handoff_id: str, status: str | None, reason: str | None, note: str | None, by: str | None,
            account: str | None) -> None:
    """Send a sales response for HANDOFF_ID to sales.responses."""
    import json
    from datetime import datetime, timezone

    from schemas.sales import SalesResponse, problem
    from streams.topics import Topics

    if (status is None) == (reason is None):
        click.echo("pql: give one of --accept, --reject REASON, --convert", err=True)
        sys.exit(2)
    status = status or "rejected"
    s = _settings()
    if account is None:
        account = _store().account_of(handoff_id)
        if account is None:
            click.echo(f"pql: handoff {handoff_id} is not in Redis (unknown, expired, or its alert task has not "
                       "seen it yet); give --account", err=True)
            sys.exit(1)
    doc = {"handoff_id": handoff_id, "account_id": account, "status": status, "reason": reason, "note": note,
           "by": by, "timestamp": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")}
    try:
        SalesResponse.model_validate(doc)
    except ValidationError as err:
        click.echo(f"pql: {problem(err)}", err=True)
        sys.exit(2)
    from confluent_kafka import Producer

    topic = Topics.of(s).responses[0]
    _checked(s, kafka=True)
    producer = Producer({**s.confluent(), "enable.idempotence": True})
    failed = []
    producer.produce(topic, json.dumps({k: v for k, v in doc.items() if v is not None}).encode(),
                     key=account.encode(), on_delivery=lambda err, _m: failed.append(err) if err else None)
    if producer.flush(15) or failed:
        click.echo(f"pql: could not publish to {topic}: {failed[0] if failed else 'timed out'}", err=True)
        sys.exit(1)
    click.echo(f"{handoff_id} ({account}): {status}" + (f", {reason}" if reason else "") + f" -> {topic}")


@main.command()
@click.argument("topic")
@click.option("--count", "-n", type=int, help="Stop after N records.")
@click.option("--timeout", type=float, default=5.0, show_default=True, help="Stop after this many seconds with no record.")
@click.option("--keys", is_flag=True, help="Print each record's key and a tab before its value.")
def tail(topic: str, count: int | None, timeout: float, keys: bool) -> None:
    """Print the records of TOPIC (e.g. pql.handoffs; PQL_TOPIC_PREFIX is added) from its start, one
    value per line, read_committed, as a downstream consumer sees them."""
    from streams.tools.tail import tail as run

    s = _settings()
    _checked(s, kafka=True)
    run(s.confluent(), s.topic(topic), sys.stdout, count, timeout, keys)


@main.group()
def mql() -> None:
    """Read and write the MQL state in Redis."""


def _store():
    from streams.mqlstore import MqlStore

    s = _settings()
    _checked(s, redis=True)
    return MqlStore(s.redis_url, s.redis_prefix)


@mql.command("set")
@click.argument("account")
@click.option("--stage", required=True, help="Lead, MQL, SAL, SQL, Opportunity, Customer, Recycled, Disqualified")
@click.option("--owner", help="Owner (sales rep id).")
def mql_set(account: str, stage: str, owner: str | None) -> None:
    """Set an account's MQL stage and owner."""
    from datetime import datetime, timezone

    from schemas.mql import MqlRecord

    try:
        rec = MqlRecord(account_id=account, stage=stage, owner=owner,
                        timestamp=datetime.now(timezone.utc).isoformat())
    except ValidationError as err:
        click.echo(f"pql: {err.errors(include_url=False)[0]['loc'][0]}: {err.errors(include_url=False)[0]['msg']}",
                   err=True)
        sys.exit(2)
    _store().put(rec)
    click.echo(f"{account}: {rec.stage}" + (f", owner {rec.owner}" if rec.owner else ""))


@mql.command("get")
@click.argument("account")
def mql_get(account: str) -> None:
    """Show an account's MQL record (JSON), exit 1 when there is none."""
    rec = _store().get(account)
    if rec is None:
        click.echo(f"{account}: no MQL record", err=True)
        sys.exit(1)
    click.echo(rec.model_dump_json())


@mql.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
def mql_import(file: str) -> None:
    """Load MQL records from JSONL ({"account_id","stage","owner"}, as `pql replay --mql`)."""
    from streams.tools.replay import MqlFileError, load_mql

    try:
        records = load_mql(file)
    except MqlFileError as err:
        click.echo(f"pql: bad MQL file: {err}", err=True)
        sys.exit(2)
    store = _store()
    applied = sum(store.put(r) for r in records.values())
    click.echo(f"imported {applied} of {len(records)} records from {file}")


if __name__ == "__main__":
    main()
