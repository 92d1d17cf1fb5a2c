"""streams/topics.py: names, and waiting for just-created topics to be served."""
import time
from concurrent.futures import Future
from types import SimpleNamespace

from streams.config import Settings
from streams.topics import Topics, served


def test_the_tables_changelogs_are_among_our_topics_without_the_topic_prefix():
    t = Topics.of(Settings(app_id="app", topic_prefix="x."))
    assert t.changelogs == ("app-accounts-changelog", "app-users-changelog", "app-clocks-changelog")
    assert t.accounts == "x.app-accounts"


class Admin:
    """list_offsets refuses each partition `refusals` times (NOT_LEADER_OR_FOLLOWER while a new
    partition is not served yet), then answers."""

    def __init__(self, refusals: dict):
        self.refusals, self.asked = dict(refusals), []

    def list_offsets(self, asked, request_timeout=None):
        self.asked.append(sorted((tp.topic, tp.partition) for tp in asked))
        out = {}
        for tp in asked:
            f = Future()
            key = (tp.topic, tp.partition)
            if self.refusals.get(key, 0) > 0:
                self.refusals[key] -= 1
                f.set_exception(RuntimeError("NOT_LEADER_OR_FOLLOWER"))
            else:
                f.set_result(SimpleNamespace(offset=0))
            out[tp] = f
        return out


def test_served_asks_again_for_the_partitions_refused_until_each_answers():
    admin = Admin({("c", 1): 2, ("d", 0): 1})
    served(admin, {"c": 2, "d": 1}, time.monotonic() + 30)
    assert admin.asked == [[("c", 0), ("c", 1), ("d", 0)], [("c", 1), ("d", 0)], [("c", 1)]]


def test_served_gives_up_at_its_deadline():
    admin = Admin({("c", 0): 10**6})
    started = time.monotonic()
    served(admin, {"c": 1}, started + 1.2)
    assert 1.0 <= time.monotonic() - started < 3 and len(admin.asked) >= 2
