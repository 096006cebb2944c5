"""Whole-keyspace scans of the read model, for recovery (`millrace resume --reseed`): slow,
and never on a request's path."""

from __future__ import annotations

import json

from millrace.protocol import FileObject, StoredEndpoint
from millrace.records import ApiKeyEntry, EndpointEntry, FileEntry
from millrace.storage.store import Store


async def all_batch_ids(store: Store) -> list[str]:
    """Every batch in the read model, finished ones included."""
    prefix = store.keys.batch("")
    found = [str(k)[len(prefix):]
             async for k in store.r.scan_iter(match=f"{prefix}*", count=1000)]
    return sorted(found)


async def registry_entries(store: Store) -> list[FileEntry | ApiKeyEntry | EndpointEntry]:
    """Files, API keys and webhook endpoints as registry records, to publish again."""
    entries: list[FileEntry | ApiKeyEntry | EndpointEntry] = []
    async for key in store.r.scan_iter(match=store.keys.file("*"), count=1000):
        row = await store.r.hgetall(key)
        if row:
            listed = await store.r.zscore(store.keys.files(str(row["project"])),
                                          str(key).rsplit(":", 1)[1])
            entries.append(FileEntry(file=FileObject.model_validate_json(row["obj"]),
                                     project=row["project"], path=row["path"],
                                     listed_at=float(listed or 0)))
    async for key in store.r.scan_iter(match=store.keys.api_key("*"), count=1000):
        row = await store.r.hgetall(key)
        if row:
            entries.append(ApiKeyEntry(key_hash=str(key).rsplit(":", 1)[1],
                                       project=row["project"], admin=row.get("admin") == "1",
                                       rpm=int(row.get("rpm") or 0),
                                       routes=json.loads(row.get("routes") or "{}"),
                                       max_priority=int(row.get("max_priority") or 0),
                                       default_priority=int(
                                           row.get("default_priority") or 0),
                                       enqueued_token_limit=int(limit) if (
                                           limit := row.get("enqueued_token_limit")) else None,
                                       created_at=int(row.get("created_at") or 0)))
    async for key in store.r.scan_iter(match=store.keys.webhook_endpoints("*"), count=100):
        project = str(key).split(":", 2)[2]
        for raw in (await store.r.hgetall(key)).values():
            entries.append(EndpointEntry(project=project,
                                         endpoint=StoredEndpoint.model_validate(
                                             json.loads(raw))))
    return entries

