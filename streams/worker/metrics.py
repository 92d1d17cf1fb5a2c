"""Prometheus metrics, served at /metrics on the worker's web port (PQL_WEB_PORT).

Naming: `pql_` prefix, `_total` counters, seconds. No per-account or per-user labels, no PII:
label values come from small fixed sets (event types, reasons, milestone ids from the rules file).
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

disable_created_metrics()  # no `_created` series next to every counter and histogram
REGISTRY = CollectorRegistry()
LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
FAST = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)

events_consumed = Counter("pql_events_consumed", "Input events read from product.events, by type",
                          ["type"], registry=REGISTRY)
events_invalid = Counter("pql_events_invalid", "Rejected inputs sent to the dead-letter topic, by reason",
                         ["reason"], registry=REGISTRY)
events_clock_corrected = Counter("pql_events_clock_corrected", "Events dated more than PQL_MAX_FUTURE ahead of when "
                                 "they were received whose time was corrected by their sentAt", registry=REGISTRY)
clients_recreated = Counter("pql_kafka_clients_recreated", "Kafka consumers of the ingest tier or the alerts task made anew after a "
                            "fatal error (a fenced static member)", registry=REGISTRY)
events_unattributed = Counter("pql_events_unattributed", "Events a rule listens to that no account could be found for",
                              registry=REGISTRY)
events_late = Counter("pql_events_late", "Events older than their account's newest minus the rules' lateness "
                      "(sent to the dead-letter topic as too_late)", registry=REGISTRY)
events_held = Counter("pql_events_held", "Events held until a group call ties their user to an account",
                      registry=REGISTRY)
ticks_quiet = Counter("pql_ticks_quiet", "Ticks with nothing to do or tell, skipped (streams/worker/progress.py `_quiet`)",
                      registry=REGISTRY)
marks_left_out = Counter("pql_marks_left_out", "MARK lines not sent: a group call's user key released nothing, and its "
                         "account learns that from the key's partition's committed offset", registry=REGISTRY)
divergence = Counter("pql_divergence", "Published outputs that may differ from a replay of the time-sorted stream, "
                     "by reason (docs/semantics.md)", ["reason"], registry=REGISTRY)
events_duplicate = Counter("pql_events_duplicate", "Events ignored because their messageId was seen", registry=REGISTRY)
milestones_reached = Counter("pql_milestones_reached", "Milestones newly reached", ["milestone"], registry=REGISTRY)
qualifications = Counter("pql_qualifications", "Accounts that reached the qualify score", registry=REGISTRY)
handoffs_published = Counter("pql_handoffs_published", "pql.handoff events published", ["lane", "precedence"],
                             registry=REGISTRY)
handoffs_backfill = Counter("pql_handoffs_backfill", "Handoffs whose qualifying event was older than "
                            "PQL_ALERT_MAX_AGE: published with backfill=true, no alert, no SLA clock",
                            registry=REGISTRY)
handoffs_suppressed = Counter("pql_handoffs_suppressed", "Qualifications suppressed, by reason", ["reason"],
                              registry=REGISTRY)
suppressions_muted = Counter("pql_suppressions_muted", "Qualifications not published: a pql.suppressed after the "
                             "same handoff already was (one per handoff)", registry=REGISTRY)
event_to_handoff = Histogram("pql_event_to_handoff_seconds", "Qualifying event timestamp to handoff published",
                             buckets=LATENCY, registry=REGISTRY)
event_processing = Histogram("pql_event_processing_seconds", "Detection time per event in the Faust tier",
                             buckets=FAST, registry=REGISTRY)
mql_lookup = Histogram("pql_mql_lookup_seconds", "MQL state read from Redis at qualification, retries included",
                       buckets=FAST + (2.5, 5, 10, 30, 60), registry=REGISTRY)
commit_seconds = Histogram("pql_commit_seconds", "Duration of a Faust commit (all partition transactions)",
                           buckets=FAST + (2.5, 5, 10), registry=REGISTRY)
redis_errors = Counter("pql_redis_errors", "Failed Redis calls (each is retried)", registry=REGISTRY)
consumer_lag = Gauge("pql_consumer_lag", "End offset minus processed position", ["topic", "partition"],
                     registry=REGISTRY)
rereads = Counter("pql_rereads", "Envelope partitions read again because Faust skipped an envelope (streams/worker/eos.py)",
                  registry=REGISTRY)
rollbacks = Counter("pql_rollbacks", "Partitions whose tables were rebuilt from the changelogs because a rebalance "
                    "aborted their open transaction (streams/worker/eos.py)", registry=REGISTRY)
stale_batches = Counter("pql_stale_batches", "Fetched batches dropped because a seek moved their partitions "
                        "(streams/worker/eos.py)", registry=REGISTRY)
rebalances = Counter("pql_rebalances", "Partition assignments received", registry=REGISTRY)
table_recovery = Gauge("pql_table_recovery_seconds", "Duration of the last table recovery", registry=REGISTRY)
barrier_wait = Gauge("pql_barrier_wait_seconds", "How long the barrier of an <app>-accounts partition (the lowest "
                     "time the other partitions and the input told it) has not moved while its stream time is past "
                     "it: decisions wait for a partition or input that lags or stopped reporting",
                     ["partition"], registry=REGISTRY)
changelog_bulk = Counter("pql_changelog_bulk_records", "Changelog records read into the tables by the bulk read "
                         "before Faust's recovery (streams/worker/restore.py)", registry=REGISTRY)
table_writes_saved = Counter("pql_table_writes_saved", "Table values written again before their transaction's commit: "
                             "sent once, with the last value (streams/worker/publish.py)", registry=REGISTRY)
# the sales side (streams/worker/alerts.py, and `detect` for responses and SLA clocks)
MINUTES = (10, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 14400, 28800, 86400, 259200)
stage_transitions = Counter("pql_stage_transitions", "Stage events published (the funnel)", ["stage", "lane"],
                            registry=REGISTRY)
responses = Counter("pql_responses", "Sales responses read, by status and outcome (recorded, repeat, "
                    "unknown_handoff)", ["status", "outcome"], registry=REGISTRY)
rejections = Counter("pql_rejections", "Handoffs rejected by sales, by reason", ["reason"], registry=REGISTRY)
time_to_accept = Histogram("pql_time_to_accept_seconds", "Handoff to acceptance", ["lane"], buckets=MINUTES,
                           registry=REGISTRY)
sla_breaches = Counter("pql_sla_breaches", "Handoffs not answered within their SLA", ["lane"], registry=REGISTRY)
sla_open = Gauge("pql_sla_open_handoffs", "Handoffs on this worker awaiting a response (SLA clock running)",
                 registry=REGISTRY)
alerts_sent = Counter("pql_alerts_sent", "Alerts delivered", ["channel"], registry=REGISTRY)
alerts_failed = Counter("pql_alerts_failed", "Alert delivery attempts that failed", ["channel"], registry=REGISTRY)
alerts_deferred = Counter("pql_alerts_deferred", "Alerts moved to the retry topic after their attempts failed",
                          ["channel"], registry=REGISTRY)
alert_seconds = Histogram("pql_alert_delivery_seconds", "Alert delivery, attempts and backoff included",
                          ["channel"], buckets=LATENCY, registry=REGISTRY)
rules_info = Gauge("pql_rules_info", "Rules file in force", ["version"], registry=REGISTRY)
build_info = Gauge("pql_build_info", "pql-pipeline build", ["version"], registry=REGISTRY)


def render() -> bytes:
    return generate_latest(REGISTRY)
