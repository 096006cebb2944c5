"""Files in Redis: each file's object, project and store path; a project's files by
creation; and when each expires (the sink's janitor deletes them after)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis.asyncio as aioredis

from millrace.protocol import FileObject
from millrace.storage.keyspace import Keyspace


@dataclass(frozen=True)
class StoredFile:
    obj: FileObject
    project: str
    path: str


class Files:
    """The file half of `Store`, and the paging both its lists share."""

    r: aioredis.Redis
    keys: Keyspace

    async def put_file(self, obj: FileObject, project: str, path: str,
                       listed_at: float | None = None) -> None:
        async with self.r.pipeline(transaction=True) as p:
            p.hset(self.keys.file(obj.id),
                   mapping={"obj": obj.model_dump_json(), "project": project, "path": path})
            p.zadd(self.keys.files(project),
                   {obj.id: time.time() if listed_at is None else listed_at})
            if obj.expires_at is not None:
                p.zadd(self.keys.file_expiry, {obj.id: obj.expires_at})
            await p.execute()

    async def get_file(self, file_id: str, project: str) -> StoredFile | None:
        found = await self.get_file_any(file_id)
        return found if found is not None and found.project == project else None

    async def get_file_any(self, file_id: str) -> StoredFile | None:
        """A file whatever its project (a pre-signed URL's signature names the file)."""
        row = await self.r.hgetall(self.keys.file(file_id))
        if not row:
            return None
        return StoredFile(
            FileObject.model_validate_json(row["obj"]), str(row["project"]), str(row["path"])
        )

    async def page_ids(
        self, index: str, *, after: str | None, limit: int, newest_first: bool
    ) -> list[str]:
        """Up to `limit` ids of a sorted-set index, starting just past `after`."""
        start = 0
        if after is not None:
            rank = await (self.r.zrevrank if newest_first else self.r.zrank)(index, after)
            if not isinstance(rank, int):
                return []  # an `after` id that is not in the index
            start = rank + 1
        fetch = self.r.zrevrange if newest_first else self.r.zrange
        return [str(i) for i in await fetch(index, start, start + limit - 1)]

    async def list_files(
        self, project: str, *, after: str | None = None, limit: int = 10000,
        newest_first: bool = True,
    ) -> list[FileObject]:
        ids = await self.page_ids(self.keys.files(project), after=after, limit=limit,
                                  newest_first=newest_first)
        found = [await self.get_file(i, project) for i in ids]
        return [f.obj for f in found if f is not None]

    async def delete_file(self, file_id: str, project: str) -> None:
        async with self.r.pipeline(transaction=True) as p:
            p.delete(self.keys.file(file_id))
            p.zrem(self.keys.files(project), file_id)
            p.zrem(self.keys.file_expiry, file_id)
            await p.execute()

    async def expired_files(self, now: float, most: int = 1000) -> list[StoredFile]:
        """Files past their `expires_at` (not yet deleted)."""
        found = []
        for file_id in await self.r.zrangebyscore(self.keys.file_expiry, "-inf", now,
                                                  start=0, num=most):
            row = await self.r.hgetall(self.keys.file(str(file_id)))
            if row:
                found.append(StoredFile(FileObject.model_validate_json(row["obj"]),
                                        str(row["project"]), str(row["path"])))
            else:
                await self.r.zrem(self.keys.file_expiry, str(file_id))
        return found
