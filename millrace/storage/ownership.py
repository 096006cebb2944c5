"""Owner epochs: a consumer that froze or was cut off and wakes up changes nothing its
partition's new owner did.

Kafka moves a partition to another member of the group once its owner's session expires,
but the old owner does not know until its next poll: it may still hold records it fetched
and go on handling them — writing Redis, the file store, publishing — over its successor's
work. So each instance, the moment the group gives it a partition (the rebalance callback,
inside the poll that joined), takes that partition's owner epoch: `INCR owner:<group>:<p>`.
Every later owner's INCR makes an earlier owner's epoch stale. Before it acts on a
partition's records an instance checks that the stored epoch is still its own
(`lost`), and writes that must never go backwards are checked and made in one Lua script
(`hset_if_owner`). A stale owner's records are dropped, uncommitted (Kafka refuses the
commit of a member that left the group anyway): the new owner handles them.

What a stale owner can still do — between a check and the act that follows it — is limited
to acts whose effects are idempotent or monotonic where they land (the sink's files derive
from the complete set of lines; the aggregator takes counts only upwards and is fenced by
its own versions; webhook deliveries are keyed by event and target): see
docs/architecture.md, "Fencing".
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping

import redis
from redis.exceptions import RedisError

from millrace import metrics
from millrace.storage.keyspace import Keyspace
from millrace.storage.store import COMMAND_TIMEOUT_S

log = logging.getLogger(__name__)

# KEYS: the owner key, the hash; ARGV: the epoch, then field, value, field, value...
_HSET_IF_OWNER = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[2], unpack(ARGV, 2))
return 1
"""


class Ownership:
    """The owner epochs one instance holds for a consumer group's partitions. Blocking calls
    (a rebalance callback runs on the consumer's thread): async callers use a thread."""

    def __init__(self, redis_url: str, keys: Keyspace, group: str, service: str) -> None:
        self.keys, self.group, self.service = keys, group, service
        self._redis = redis.Redis.from_url(redis_url, decode_responses=True,
                                           socket_timeout=COMMAND_TIMEOUT_S,
                                           socket_connect_timeout=COMMAND_TIMEOUT_S)
        self._hset = self._redis.register_script(_HSET_IF_OWNER)
        self.epochs: dict[int, int] = {}

    def take(self, partitions: Iterable[int]) -> None:
        """We were given these partitions: our epochs make every earlier owner's stale.
        Waits for Redis (writing without an epoch could undo a successor's work)."""
        wanted = sorted(set(partitions))
        while wanted:
            try:
                with self._redis.pipeline(transaction=False) as p:
                    for partition in wanted:
                        p.incr(self.keys.owner(self.group, partition))
                    taken = p.execute()
                self.epochs.update(zip(wanted, (int(e) for e in taken), strict=True))
                return
            except RedisError as exc:
                log.warning("waiting for Redis to take partitions %s: %s", wanted, exc)
                time.sleep(1)

    def drop(self, partitions: Iterable[int]) -> None:
        for partition in partitions:
            self.epochs.pop(partition, None)

    def lost(self, partitions: Iterable[int]) -> set[int]:
        """Those of `partitions` we do not own: never given or given back (not counted), or
        taken over by another instance since we took them (logged, counted and dropped).
        Reads a copy of the epochs: a rebalance callback on the consumer's thread may drop
        partitions meanwhile."""
        epochs = self.epochs.copy()
        wanted = sorted(set(partitions))
        held = [p for p in wanted if p in epochs]
        gone = set(wanted) - set(held)
        if not held:
            return gone
        keys = [self.keys.owner(self.group, p) for p in held]
        stored = self._redis.mget(keys)
        if None in stored:  # Redis lost its data (wiped, `millrace rebuild`): ours again
            for key, p, epoch in zip(keys, held, stored, strict=True):
                if epoch is None:
                    self._redis.set(key, epochs[p], nx=True)
            stored = self._redis.mget(keys)
        taken = {p for p, epoch in zip(held, stored, strict=True) if epoch != str(epochs[p])}
        if taken:
            log.warning("partitions %s of %s were taken over: their records are left to the "
                        "new owner", sorted(taken), self.group)
            metrics.FENCED.labels(self.service).inc(len(taken))
            self.drop(taken)
        return gone | taken

    def hset_if_owner(self, partition: int, key: str, mapping: Mapping[str, str | int]
                      ) -> bool:
        """HSET, only while we own `partition` (checked and written in one step)."""
        epoch = self.epochs.get(partition)
        if epoch is None:
            return False
        args: list[str | int] = [str(epoch)]
        for field, value in mapping.items():
            args += [field, value]
        if self._hset(keys=[self.keys.owner(self.group, partition), key], args=args):
            return True
        metrics.FENCED.labels(self.service).inc()
        self.drop([partition])
        return False

    def first_offsets(self, topic: str, partition: int) -> dict[str, int]:
        """Batch → the first offset of its records on `topic[partition]` (the sink's
        `sink-from`, written by `Store.note_first_offsets`); read in a rebalance, so
        blocking. Raises RedisError while Redis is away."""
        found: list[tuple[str, float]] = self._redis.zrange(  # type: ignore[assignment]
            self.keys.sink_from(topic, partition), 0, -1, withscores=True)
        return {str(batch): int(offset) for batch, offset in found}

    def close(self) -> None:
        self._redis.close()
