"""Owner epochs on a real Redis: the newest owner of a partition wins, an instance whose
partition was taken over drops it, and a rebalance callback dropping partitions on another
thread while `lost` reads them never breaks the reader (it did: a KeyError that stopped a
gateway's jobs stage in the chaos suite)."""

from __future__ import annotations

import threading
import uuid

from millrace.storage.keyspace import Keyspace
from millrace.storage.ownership import Ownership
from tests.deployment import Deployment


def owners(deployment: Deployment, keys: Keyspace) -> Ownership:
    return Ownership(str(deployment.endpoints["redis_url"]), keys, "group", "test")


def test_the_newest_owner_wins_and_the_older_one_drops_the_partition(
        deployment: Deployment) -> None:
    keys = Keyspace(f"own{uuid.uuid4().hex[:8]}")
    first, second = owners(deployment, keys), owners(deployment, keys)
    try:
        first.take([0, 1])
        assert first.lost([0, 1, 2]) == {2}  # never given
        second.take([1])  # the group moved partition 1
        assert first.lost([0, 1]) == {1}
        assert 1 not in first.epochs and first.lost([0]) == set()
        assert second.lost([1]) == set()
        assert not first.hset_if_owner(1, keys.explode("b"), {"lines": 5})
        assert second.hset_if_owner(1, keys.explode("b"), {"lines": 5})
    finally:
        first.close()
        second.close()


def test_partitions_dropped_while_lost_reads_them_are_simply_gone(
        deployment: Deployment) -> None:
    ours = owners(deployment, Keyspace(f"own{uuid.uuid4().hex[:8]}"))
    partitions = list(range(16))
    ours.take(partitions)
    stop = threading.Event()
    failures: list[BaseException] = []

    def rebalances() -> None:  # what the consumer thread's callbacks do
        while not stop.is_set():
            ours.drop(partitions[::2])
            ours.epochs.update({p: 1 for p in partitions[::2]})

    churn = threading.Thread(target=rebalances)
    churn.start()
    try:
        for _ in range(2000):
            try:
                ours.lost(partitions)
            except Exception as exc:  # any failure is the finding
                failures.append(exc)
                break
    finally:
        stop.set()
        churn.join()
        ours.close()
    assert failures == []
