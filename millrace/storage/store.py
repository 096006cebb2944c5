"""The Redis read model every service shares: API keys, files, batches, webhook endpoints,
plus the aggregator's state, the index of active batches and their deadlines, and which
input lines of a batch have a result (the sink's `done` bitmap). Key patterns:
`millrace.storage.keyspace`.

A batch is one hash with halves that never share a writer: `doc` and `project` (the
gateway, once), `state` (the aggregator-owned Batch fields) and `agg` (the aggregator's
whole state, from which it resumes after any restart).
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from millrace import ids
from millrace.protocol import Batch, StoredEndpoint
from millrace.storage.done import Done
from millrace.storage.enqueued import Enqueued
from millrace.storage.files import Files
from millrace.storage.keyspace import Keyspace
from millrace.storage.principals import Principal, Principals

# A dead Redis must give the API a quick 503, not a hang.
CONNECT_TIMEOUT_S = 2.0
COMMAND_TIMEOUT_S = 5.0
REPLY_KEPT_S = 600


@dataclass(frozen=True)
class RestoredBatch:
    """The gateway-written half of a batch, as the aggregator keeps it for recovery."""

    project: str
    doc: dict[str, Any]
    listed_at: float


@dataclass(frozen=True)
class StoredBatch:
    """What the aggregator resumes a batch from: its own state, else the `created` event the
    gateway kept with the batch, else the Batch document."""

    agg: str | None
    doc: dict[str, Any] | None
    project: str | None
    created: str | None = None


@dataclass(frozen=True)
class Version:
    """Which view of a batch an aggregate state is: the batch-events offset of the last event
    applied on the broker of cluster id `epoch`, and whether the status is final."""

    epoch: str
    offset: int
    final: bool


DELETED_KEEP_S = 7 * 24 * 3600  # a deleted batch's tombstone

# KEYS: the batch hash, the active set, the deadlines; ARGV: agg, state (the Batch fields),
# epoch, offset, final, finished, deadline ("" for none), batch id
_SAVE_FENCED = """
if redis.call('HEXISTS', KEYS[1], 'deleted') == 1 then return 0 end
local cur = redis.call('HMGET', KEYS[1], 'agg_epoch', 'agg_offset', 'agg_final')
if cur[3] == '1' and ARGV[5] ~= '1' then return 0 end
if cur[1] == ARGV[3] and cur[2] and tonumber(cur[2]) > tonumber(ARGV[4]) then return 0 end
redis.call('HSET', KEYS[1], 'agg', ARGV[1], 'state', ARGV[2], 'agg_epoch', ARGV[3],
           'agg_offset', ARGV[4], 'agg_final', ARGV[5])
if ARGV[6] ~= '1' then redis.call('SADD', KEYS[2], ARGV[8]) end
if ARGV[7] ~= '' then redis.call('ZADD', KEYS[3], ARGV[7], ARGV[8])
else redis.call('ZREM', KEYS[3], ARGV[8]) end
return 1
"""


class Store(Principals, Files, Done):
    """The read model: API keys (`principals`), files (`files`), done lines (`done`) and,
    here, batches, their aggregate state, the active set and deadlines, leases, replies
    and webhook endpoints."""

    def __init__(self, client: aioredis.Redis, namespace: str) -> None:
        self.r = client
        self.ns = namespace
        self.keys = Keyspace(namespace)
        self._save_fenced = client.register_script(_SAVE_FENCED)
        self._token = ids.token()  # this process's scratch keys
        # API keys found, for a moment: every API call looks its key up first
        self._principals: dict[str, tuple[float, Principal]] = {}

    @classmethod
    def connect(cls, url: str, namespace: str, max_connections: int = 256) -> Store:
        """A pool of at most `max_connections`; a caller waits (up to the connect timeout)
        for a free one instead of failing at once, and then gets a RedisError (503). 256: a
        gateway's 200 busy client connections each hold one for a command; with 64, waiters
        lost the freed connections to newer requests (uvloop: p90 99 ms against 60)."""
        pool = aioredis.BlockingConnectionPool.from_url(
            url, decode_responses=True, max_connections=max_connections,
            timeout=CONNECT_TIMEOUT_S, socket_connect_timeout=CONNECT_TIMEOUT_S,
            socket_timeout=COMMAND_TIMEOUT_S)
        return cls(aioredis.Redis(connection_pool=pool), namespace)

    async def close(self) -> None:
        await self.r.aclose()
        await self.r.connection_pool.disconnect()  # a pool passed in is not closed by aclose

    async def take_lease(self, key: str, seconds: float) -> bool:
        """True for one caller per `seconds` (several processes share a periodic task)."""
        return bool(await self.r.set(key, "1", nx=True, px=int(seconds * 1000)))

    # --- batches ----------------------------------------------------------------------
    async def create_batch(self, batch: Batch, project: str, *, listed_at: float,
                           created: str | None = None, enqueued: Enqueued | None = None
                           ) -> None:
        """The gateway's half, and the batch among the active ones with its deadline (so a
        batch is swept or expired even if nothing else ever hears of it). `created`: the
        event about to be published, kept so that its webhook target and output expiry
        survive the event being lost (a broker that dies right after)."""
        doc = batch.model_dump(mode="json")
        async with self.r.pipeline(transaction=True) as p:
            # line_key: the batch's own key for its lines' tickets (`records.line_ticket`)
            p.hset(self.keys.batch(batch.id),
                   mapping={"doc": json.dumps(doc), "state": "{}", "project": project,
                            "line_key": secrets.token_hex(16)})
            if created is not None:
                p.hset(self.keys.batch(batch.id), "created", created)
            p.zadd(self.keys.batches(project), {batch.id: listed_at})
            p.sadd(self.keys.active, batch.id)
            p.zadd(self.keys.deadlines, {batch.id: batch.expires_at or 0})
            if enqueued is not None:  # what admission counts, until the batch ends
                p.hset(self.keys.enqueued(enqueued.model), batch.id,
                       json.dumps({"project": project, **enqueued.fields()}))
            await p.execute()

    async def line_key(self, batch_id: str) -> str | None:
        """The key a batch's line tickets are made with; None for a batch from before
        tickets (its lines carry none, and none is checked)."""
        key = await self.r.hget(self.keys.batch(batch_id), "line_key")
        return str(key) if key else None

    async def line_owners(self, batch_ids: list[str]
                          ) -> dict[str, tuple[str, str | None] | None]:
        """Each batch's project and line key (`line_key`), None for a batch that does not
        exist, in one round trip (the sink checks responses against them)."""
        async with self.r.pipeline(transaction=False) as p:
            for batch_id in batch_ids:
                p.hmget(self.keys.batch(batch_id), ["project", "line_key"])
            rows = await p.execute()
        return {b: (str(project), str(key) if key else None) if project else None
                for b, (project, key) in zip(batch_ids, rows, strict=True)}

    async def forget_batch(self, batch_id: str, project: str) -> None:
        """Undo `create_batch` (its `created` event could not be published)."""
        async with self.r.pipeline(transaction=True) as p:
            p.delete(self.keys.batch(batch_id), self.keys.ext(batch_id))
            p.zrem(self.keys.batches(project), batch_id)
            p.srem(self.keys.active, batch_id)
            p.zrem(self.keys.deadlines, batch_id)
            await p.execute()

    async def delete_batch(self, batch_id: str, project: str) -> None:
        """A final batch deleted by its owner: gone from every read, its hash left as a
        tombstone (`deleted`) for `DELETED_KEEP_S`, so that an aggregator holding its state
        in memory cannot save it back (`_SAVE_FENCED` refuses a deleted batch)."""
        key = self.keys.batch(batch_id)
        async with self.r.pipeline(transaction=True) as p:
            p.delete(key, self.keys.ext(batch_id), self.keys.explode(batch_id),
                     self.keys.stream(batch_id), self.keys.stream_ids(batch_id),
                     self.keys.stream_rejected(batch_id), self.keys.done(batch_id),
                     self.keys.reply(batch_id))
            p.hset(key, "deleted", str(int(time.time())))
            p.expire(key, DELETED_KEEP_S)
            p.zrem(self.keys.batches(project), batch_id)
            p.srem(self.keys.active, batch_id)
            p.zrem(self.keys.deadlines, batch_id)
            await p.execute()

    async def batches_using(self, project: str, file_id: str) -> list[str]:
        """The project's batches whose input is `file_id`."""
        ids = [str(i) for i in await self.r.zrange(self.keys.batches(project), 0, -1)]
        found = []
        for start in range(0, len(ids), 500):
            async with self.r.pipeline(transaction=False) as p:
                for batch_id in ids[start:start + 500]:
                    p.hget(self.keys.batch(batch_id), "doc")
                docs = await p.execute()
            found += [batch_id for batch_id, doc in zip(ids[start:start + 500], docs,
                                                         strict=True)
                      if doc and json.loads(doc).get("input_file_id") == file_id]
        return found

    async def put_ext(self, batch_id: str, ext: Mapping[str, Any]) -> None:
        """What a PromptLoop or PLai client gave for a batch beyond the OpenAI fields."""
        await self.r.set(self.keys.ext(batch_id), json.dumps(ext))

    async def get_ext(self, batch_id: str) -> dict[str, Any]:
        raw = await self.r.get(self.keys.ext(batch_id))
        return dict(json.loads(raw)) if raw else {}

    async def batch_ids_at(self, project: str, skip: int, take: int, newest_first: bool
                           ) -> list[str]:
        """A page of a project's batch ids by position (PLai's skip/take)."""
        key = self.keys.batches(project)
        page = (self.r.zrevrange if newest_first else self.r.zrange)
        return [str(i) for i in await page(key, skip, skip + take - 1)]

    async def get_batch(self, batch_id: str, project: str) -> Batch | None:
        # not the aggregator's own state (`agg`, kilobytes): only what the Batch is made of
        doc, state, owner = await self.r.hmget(self.keys.batch(batch_id),
                                               ["doc", "state", "project"])
        if doc is None or owner != project:
            return None
        return Batch.model_validate({**json.loads(doc), **json.loads(state or "{}")})

    async def batch_project(self, batch_id: str) -> str | None:
        project = await self.r.hget(self.keys.batch(batch_id), "project")
        return str(project) if project else None

    async def newest_batch_ids(self, project: str | None, most: int) -> list[tuple[str, str]]:
        """(batch id, project) of the `most` newest batches of a project, or of every
        project (the dashboard's admin view: each project's index, merged)."""
        if project is not None:
            projects = [project]
        else:
            start = len(self.keys.batches(""))
            projects = [str(k)[start:] async for k in self.r.scan_iter(
                match=self.keys.batches("*"), count=1000)]
        found: list[tuple[float, str, str]] = []
        for one in projects:
            ranked = await self.r.zrevrange(self.keys.batches(one), 0, most - 1,
                                            withscores=True)
            found += [(float(pair[1]), str(pair[0]), one) for pair in ranked]
        found.sort(reverse=True)
        return [(batch_id, one) for _, batch_id, one in found[:most]]

    async def list_batches(
        self, project: str, *, after: str | None = None, limit: int = 20
    ) -> list[Batch]:
        ids = await self.page_ids(self.keys.batches(project), after=after, limit=limit,
                                  newest_first=True)
        found = [await self.get_batch(i, project) for i in ids]
        return [b for b in found if b is not None]

    # --- the aggregator's state ---------------------------------------------------------
    async def load_aggregate(self, batch_id: str) -> StoredBatch:
        agg, doc, project, created = await self.r.hmget(self.keys.batch(batch_id),
                                                        ["agg", "doc", "project", "created"])
        return StoredBatch(str(agg) if agg else None, json.loads(doc) if doc else None,
                           str(project) if project else None,
                           str(created) if created else None)

    async def versions(self, batch_ids: list[str]) -> dict[str, Version]:
        """The version of each batch's stored aggregate state (batches without one left
        out), in one round trip."""
        async with self.r.pipeline(transaction=False) as p:
            for batch_id in batch_ids:
                p.hmget(self.keys.batch(batch_id), ["agg_epoch", "agg_offset", "agg_final"])
            rows = await p.execute()
        return {b: Version(str(e or ""), int(o), f == "1")
                for b, (e, o, f) in zip(batch_ids, rows, strict=True) if o is not None}

    async def save_aggregate(self, batch_id: str, agg: str, fields: dict[str, Any], *,
                             version: Version, finished: bool, deadline: int | None,
                             restore: RestoredBatch | None = None) -> bool:
        """The aggregator's state and the Batch fields it owns, in one atomic step, fenced:
        a state older than the stored one (the same broker, a lower batch-events offset),
        or one that would take a final batch out of its final status, changes nothing and
        gives False. An unfinished batch is (again) among the active ones; a finished one
        stays there until the sink took its `finished` event (`done_with`). With `restore`,
        the gateway's half is written back wherever it is missing (Redis was lost), never
        overwriting."""
        saved = await self._save_fenced(
            keys=[self.keys.batch(batch_id), self.keys.active, self.keys.deadlines],
            args=[agg, json.dumps(fields), version.epoch, version.offset,
                  "1" if version.final else "0", "1" if finished else "0",
                  "" if deadline is None else deadline, batch_id])
        if saved and restore is not None:
            async with self.r.pipeline(transaction=True) as p:
                self._restore(p, batch_id, restore)
                await p.execute()
        return bool(saved)

    async def restore_batch(self, batch_id: str, restore: RestoredBatch, agg: str,
                            fields: dict[str, Any], active: bool) -> bool:
        """Rebuild: put a batch back as it was; a state written since is kept."""
        key = self.keys.batch(batch_id)
        async with self.r.pipeline(transaction=False) as p:
            p.hsetnx(key, "state", json.dumps(fields))
            p.hsetnx(key, "agg", agg)
            self._restore(p, batch_id, restore)
            if active:
                p.sadd(self.keys.active, batch_id)
            results = await p.execute()
        return bool(results[0])

    def _restore(self, p: Any, batch_id: str, restore: RestoredBatch) -> None:
        key = self.keys.batch(batch_id)
        p.hsetnx(key, "doc", json.dumps(restore.doc))
        p.hsetnx(key, "project", restore.project)
        p.zadd(self.keys.batches(restore.project), {batch_id: restore.listed_at}, nx=True)

    async def done_with(self, batch_id: str) -> None:
        """The batch is finished and its webhooks recorded: nothing more to resume."""
        async with self.r.pipeline(transaction=True) as p:
            p.srem(self.keys.active, batch_id)
            p.delete(self.keys.done(batch_id))
            await p.execute()

    # --- where a sink that takes a partition over starts reading ----------------------
    async def note_first_offsets(self, firsts: Mapping[tuple[str, int], Mapping[str, int]]
                                 ) -> None:
        """(topic, partition) → {batch: offset of a record of it}: each active batch keeps
        the lowest offset seen (ZADD LT), so its records can all be read again."""
        wanted = {batch for seen in firsts.values() for batch in seen}
        if not wanted:
            return
        ordered = sorted(wanted)
        flags = await self.r.smismember(self.keys.active, ordered)
        active = {batch for batch, flag in zip(ordered, flags, strict=True) if flag}
        async with self.r.pipeline(transaction=False) as p:
            for (topic, partition), seen in firsts.items():
                mine = {batch: offset for batch, offset in seen.items() if batch in active}
                if mine:
                    p.zadd(self.keys.sink_from(topic, partition), mine, lt=True)
            await p.execute()

    async def forget_first_offsets(self, batch_id: str, where: Iterable[tuple[str, int]]
                                   ) -> None:
        async with self.r.pipeline(transaction=False) as p:
            for topic, partition in where:
                p.zrem(self.keys.sink_from(topic, partition), batch_id)
            await p.execute()

    async def explode_checkpoint(self, batch_id: str) -> dict[str, str]:
        """How far the gateway's explode of a batch got (written through `Ownership`)."""
        found: dict[str, str] = await self.r.hgetall(self.keys.explode(batch_id))  # type: ignore[assignment]
        return found

    async def forget_explode(self, batch_id: str) -> None:
        await self.r.delete(self.keys.explode(batch_id))

    async def ping(self) -> None:
        """A round trip to Redis (raises RedisError when it is away)."""
        await self.r.ping()

    async def count_request(self, key: str, window_s: int) -> int:
        """One more request in a rate window's counter (kept for two windows): the count."""
        async with self.r.pipeline(transaction=True) as p:
            p.incr(key)
            p.expire(key, 2 * window_s)
            used, _ = await p.execute()
        return int(used)

    async def active_batches(self) -> list[str]:
        return sorted(str(b) for b in await self.r.smembers(self.keys.active))

    async def active_by_status(self) -> dict[str, int]:
        """How many unfinished batches are in each status."""
        pipe = self.r.pipeline(transaction=False)
        for batch_id in await self.active_batches():
            pipe.hmget(self.keys.batch(batch_id), ["doc", "state"])
        counts: dict[str, int] = {}
        for doc, state in await pipe.execute():
            if doc is not None:
                status = str({**json.loads(doc), **json.loads(state or "{}")}.get("status"))
                counts[status] = counts.get(status, 0) + 1
        return counts

    async def due_batches(self, now: float, most: int = 1000) -> list[str]:
        """Active batches whose completion window has passed."""
        due = await self.r.zrangebyscore(self.keys.deadlines, "-inf", now, start=0, num=most)
        return [str(b) for b in due]


    async def put_replies(self, lines: Iterable[tuple[str, str]]) -> None:
        """(batch, output line) for lines someone waits on (`wait_reply`)."""
        async with self.r.pipeline(transaction=False) as p:
            for batch_id, line in lines:
                p.rpush(self.keys.reply(batch_id), line)
                p.expire(self.keys.reply(batch_id), REPLY_KEPT_S)
            await p.execute()

    async def wait_reply(self, batch_id: str, timeout_s: float) -> str | None:
        """The first output line of the batch, as soon as the sink has it (None after
        `timeout_s`, at most a command timeout)."""
        found = await self.r.blpop([self.keys.reply(batch_id)],
                                   timeout=min(timeout_s, COMMAND_TIMEOUT_S - 1))
        return str(found[1]) if found else None

    # --- webhook endpoints (per project) ---------------------------------------------------
    async def put_endpoint(self, project: str, endpoint: StoredEndpoint) -> None:
        await self.r.hset(self.keys.webhook_endpoints(project), endpoint.id,
                          endpoint.model_dump_json())

    async def endpoints(self, project: str) -> list[StoredEndpoint]:
        """The project's endpoints, oldest first."""
        rows = await self.r.hgetall(self.keys.webhook_endpoints(project))
        found = [StoredEndpoint.model_validate_json(v) for v in rows.values()]
        return sorted(found, key=lambda e: (e.created_at, e.id))

    async def endpoint(self, project: str, endpoint_id: str) -> StoredEndpoint | None:
        raw = await self.r.hget(self.keys.webhook_endpoints(project), endpoint_id)
        return StoredEndpoint.model_validate_json(raw) if raw else None

    async def delete_endpoint(self, project: str, endpoint_id: str) -> bool:
        return bool(await self.r.hdel(self.keys.webhook_endpoints(project), endpoint_id))


