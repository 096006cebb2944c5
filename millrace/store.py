"""The Redis read model: API keys, file objects, batch objects.

A batch is stored as two JSON halves so that two writers never race on one value: `doc`,
written once by the gateway (id, endpoint, input file, window, metadata, ...), and `state`,
owned by the aggregator after creation (status, counts, timestamps, usage, file ids).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from millrace.protocol import Batch, FileObject, WebhookEndpoint


def hash_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


def new_api_key() -> str:
    return "sk-mr-" + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class Principal:
    """Who is calling: the project a key belongs to, whether it may administer, and its
    request budget per minute (0 = unlimited)."""

    project: str
    admin: bool = False
    rpm: int = 0
    key_hash: str = ""


@dataclass(frozen=True)
class RestoredBatch:
    """The gateway-written half of a batch, as the aggregator keeps it for recovery."""

    project: str
    doc: dict[str, Any]
    listed_at: float
    webhook: dict[str, Any] | None = None


@dataclass(frozen=True)
class StoredFile:
    obj: FileObject
    project: str
    path: str


class Store:
    def __init__(self, client: aioredis.Redis, namespace: str) -> None:
        self.r = client
        self.ns = namespace

    @classmethod
    def connect(cls, url: str, namespace: str) -> Store:
        return cls(aioredis.Redis.from_url(url, decode_responses=True), namespace)

    async def close(self) -> None:
        await self.r.aclose()

    def key(self, *parts: str) -> str:
        return ":".join((self.ns, *parts))

    # --- API keys -------------------------------------------------------------------
    async def put_key_hash(self, key_hash: str, principal: Principal,
                           created_at: int | None = None) -> None:
        await self.r.hset(
            self.key("key", key_hash),
            mapping={
                "project": principal.project,
                "admin": int(principal.admin),
                "rpm": principal.rpm,
                "created_at": created_at or int(time.time()),
            },
        )

    async def principal(self, api_key: str) -> Principal | None:
        key_hash = hash_key(api_key)
        row = await self.r.hgetall(self.key("key", key_hash))
        if not row:
            return None
        return Principal(project=str(row["project"]), admin=row.get("admin") == "1",
                         rpm=int(row.get("rpm") or 0), key_hash=key_hash)

    async def take_request(self, principal: Principal) -> tuple[int, int]:
        """Count one request in the key's current minute: (requests so far, seconds left)."""
        now = time.time()
        window = int(now // 60)
        key = self.key("rate", principal.key_hash, str(window))
        async with self.r.pipeline(transaction=True) as p:
            p.incr(key)
            p.expire(key, 120)
            used, _ = await p.execute()
        return int(used), 60 - int(now % 60)

    # --- files ------------------------------------------------------------------------
    async def put_file(self, obj: FileObject, project: str, path: str,
                       listed_at: float | None = None) -> None:
        async with self.r.pipeline(transaction=True) as p:
            p.hset(
                self.key("file", obj.id),
                mapping={"obj": obj.model_dump_json(), "project": project, "path": path},
            )
            p.zadd(self.key("files", project), {obj.id: listed_at or time.time()})
            await p.execute()

    async def get_file(self, file_id: str, project: str) -> StoredFile | None:
        row = await self.r.hgetall(self.key("file", file_id))
        if not row or row["project"] != project:
            return None
        return StoredFile(
            FileObject.model_validate_json(row["obj"]), str(row["project"]), str(row["path"])
        )

    async def page_ids(
        self, index: str, project: str, *, after: str | None, limit: int, newest_first: bool
    ) -> list[str]:
        """Up to `limit` ids of a project's index, starting just past `after`."""
        key = self.key(index, project)
        start = 0
        if after is not None:
            rank = await (self.r.zrevrank if newest_first else self.r.zrank)(key, after)
            if not isinstance(rank, int):
                return []  # an `after` id that is not in the index
            start = rank + 1
        fetch = self.r.zrevrange if newest_first else self.r.zrange
        return [str(i) for i in await fetch(key, start, start + limit - 1)]

    async def list_files(
        self, project: str, *, after: str | None = None, limit: int = 10000,
        newest_first: bool = True,
    ) -> list[FileObject]:
        ids = await self.page_ids("files", project, after=after, limit=limit,
                                  newest_first=newest_first)
        found = [await self.get_file(i, project) for i in ids]
        return [f.obj for f in found if f is not None]

    async def delete_file(self, file_id: str, project: str) -> None:
        async with self.r.pipeline(transaction=True) as p:
            p.delete(self.key("file", file_id))
            p.zrem(self.key("files", project), file_id)
            await p.execute()

    # --- batches ----------------------------------------------------------------------
    async def create_batch(self, batch: Batch, project: str, *, listed_at: float,
                           webhook: dict[str, Any] | None = None) -> None:
        doc = batch.model_dump(mode="json")
        async with self.r.pipeline(transaction=True) as p:
            p.hset(
                self.key("batch", batch.id),
                mapping={"doc": json.dumps(doc), "state": "{}", "project": project,
                         "webhook": json.dumps(webhook)},
            )
            p.zadd(self.key("batches", project), {batch.id: listed_at})
            await p.execute()

    async def set_batch_state(self, batch_id: str, state: dict[str, Any],
                              restore: RestoredBatch | None = None) -> None:
        """Write the aggregator's half; with `restore`, also the gateway's half wherever it
        is missing (after Redis was lost), never overwriting what is there."""
        async with self.r.pipeline(transaction=False) as p:
            p.hset(self.key("batch", batch_id), "state", json.dumps(state))
            if restore is not None:
                self._restore(p, batch_id, restore)
            await p.execute()

    async def restore_batch(self, batch_id: str, restore: RestoredBatch,
                            state: dict[str, Any]) -> bool:
        """Rebuild: put a batch back as it was; a state written since is kept."""
        async with self.r.pipeline(transaction=False) as p:
            p.hsetnx(self.key("batch", batch_id), "state", json.dumps(state))
            self._restore(p, batch_id, restore)
            results = await p.execute()
        return bool(results[0])

    def _restore(self, p: Any, batch_id: str, restore: RestoredBatch) -> None:
        key = self.key("batch", batch_id)
        p.hsetnx(key, "doc", json.dumps(restore.doc))
        p.hsetnx(key, "project", restore.project)
        p.hsetnx(key, "webhook", json.dumps(restore.webhook))
        p.zadd(self.key("batches", restore.project), {batch_id: restore.listed_at}, nx=True)

    async def batch_webhook(self, batch_id: str) -> dict[str, Any] | None:
        """The batch's own webhook target (`{"url": …}`), if it was given one."""
        raw = await self.r.hget(self.key("batch", batch_id), "webhook")
        value = json.loads(raw) if raw else None
        return value if isinstance(value, dict) else None

    async def get_batch(self, batch_id: str, project: str) -> Batch | None:
        row = await self.r.hgetall(self.key("batch", batch_id))
        if not row or row.get("project") != project or "doc" not in row:
            return None
        state = json.loads(row.get("state") or "{}")
        return Batch.model_validate({**json.loads(row["doc"]), **state})

    async def list_batches(
        self, project: str, *, after: str | None = None, limit: int = 20
    ) -> list[Batch]:
        ids = await self.page_ids("batches", project, after=after, limit=limit,
                                  newest_first=True)
        found = [await self.get_batch(i, project) for i in ids]
        return [b for b in found if b is not None]

    # --- stream batches (lines arrive on the ingest topic) --------------------------------
    async def open_stream(self, batch_id: str, endpoint: str, project: str) -> None:
        await self.r.hset(self.key("stream", batch_id),
                          mapping={"endpoint": endpoint, "project": project})

    async def stream(self, batch_id: str) -> dict[str, str] | None:
        """{endpoint, project[, sealed_total]} of a stream batch, None if there is none."""
        row = await self.r.hgetall(self.key("stream", batch_id))
        return {str(k): str(v) for k, v in row.items()} or None

    async def note_rejected(self, batch_id: str, token: str) -> None:
        """A message of the batch that did not become a line still counts as received."""
        await self.r.sadd(self.key("stream-rejected", batch_id), token)

    async def received(self, batch_id: str) -> int:
        """Distinct ingest messages of the batch processed so far (lines + rejected)."""
        async with self.r.pipeline(transaction=False) as p:
            p.hlen(self.key("stream-ids", batch_id))
            p.scard(self.key("stream-rejected", batch_id))
            lines, rejected = await p.execute()
        return int(lines) + int(rejected)

    async def expect_stream(self, batch_id: str, messages: int) -> None:
        await self.r.hsetnx(self.key("stream", batch_id), "expected", messages)

    async def claim_line(self, batch_id: str, custom_id: str, token: str) -> tuple[str, int]:
        """Give `custom_id` to the message identified by `token` (its partition:offset).

        Returns ("new", line number), ("redelivery", line number) when the same message
        comes again after a crash, or ("duplicate", 0) when another message holds the id.
        """
        ids = self.key("stream-ids", batch_id)
        async with self.r.pipeline(transaction=True) as p:
            p.hsetnx(ids, custom_id, token)
            p.hget(ids, custom_id)
            p.hlen(ids)
            created, holder, count = await p.execute()
        if created:
            return "new", int(count)
        return ("redelivery", int(count)) if holder == token else ("duplicate", 0)

    async def seal_stream(self, batch_id: str) -> int:
        """Close a stream batch; idempotent: a second call returns the same total."""
        key = self.key("stream", batch_id)
        total = await self.r.hlen(self.key("stream-ids", batch_id))
        await self.r.hsetnx(key, "sealed_total", total)
        return int(await self.r.hget(key, "sealed_total") or 0)

    # --- webhook endpoints (per project) ---------------------------------------------------
    async def put_endpoint(self, project: str, endpoint: WebhookEndpoint) -> None:
        await self.r.hset(self.key("webhook-endpoints", project), endpoint.id,
                          endpoint.model_dump_json())

    async def endpoints(self, project: str) -> list[WebhookEndpoint]:
        rows = await self.r.hgetall(self.key("webhook-endpoints", project))
        found = [WebhookEndpoint.model_validate_json(v) for v in rows.values()]
        return sorted(found, key=lambda e: (e.created_at, e.id))

    async def delete_endpoint(self, project: str, endpoint_id: str) -> bool:
        return bool(await self.r.hdel(self.key("webhook-endpoints", project), endpoint_id))
