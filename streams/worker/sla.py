"""SLA ticking: every PQL_SLA_TICK seconds, a tick line (wall clock) to each <app>-accounts partition
this worker owns, through the ingest tier. `detect` checks a partition's SLA clocks when its tick
arrives, so clocks are read in partition order, in the same transactions as everything else
(detectors/sales.py decides what is due)."""
from __future__ import annotations

import time


class Ticker:
    def __init__(self, app, source_topic: str, ingest, publisher, partitions: int):
        self.app, self.source, self.ingest, self.publisher = app, source_topic, ingest, publisher
        self.partitions = partitions

    async def tick(self) -> None:
        loop = self.ingest.loop
        if loop is None:  # the ingest tier has not started yet
            return
        owned = sorted(tp.partition for tp in self.app.consumer.assignment() if tp.topic == self.source)
        self.publisher.forget(owned)
        loop.tick(owned, int(time.time() * 1000), self.partitions)
