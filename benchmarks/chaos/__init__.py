"""The chaos run (`make chaos`, `python -m benchmarks.chaos`): two workers under a seeded fault
schedule, checked against `pql replay` of the same input. See benchmarks/RELIABILITY.md.

- `faults.py`: the stack (its own Kafka and Redis), the worker pool (a supervisor), the schedule.
- `observe.py`: what the run sees: output topics, a sales rep answering handoffs, the alert endpoint,
  worker memory.
- `report.py`: expected vs seen, recovery times, the table.
"""
