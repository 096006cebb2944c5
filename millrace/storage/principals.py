"""API keys in Redis: who a key is (its project, admin flag and budgets), by its SHA-256
only; a key found is remembered for a moment (every API call looks its key up first)."""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import dataclass

import redis.asyncio as aioredis

from millrace.storage.keyspace import Keyspace

PRINCIPAL_TTL_S = 2.0
PRINCIPALS_KEPT = 10_000


def hash_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


def new_api_key() -> str:
    return "sk-mr-" + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class Principal:
    """Who is calling: the project a key belongs to, whether it may administer, its
    request budget per minute (0 = unlimited), its own per-route budgets
    (`"GET /v0/tasks"` → requests per minute), which override the deployment's, and the
    highest batch `priority` it may ask for (an admin raises it; any key may go lower),
    the priority its batches get when they give none, and the prompt tokens its project's
    unfinished batches may hold per model (None: the deployment's `ENQUEUED_TOKEN_LIMIT`;
    0: none)."""

    project: str
    admin: bool = False
    rpm: int = 0
    key_hash: str = ""
    routes: tuple[tuple[str, int], ...] = ()
    max_priority: int = 0
    default_priority: int = 0
    enqueued_token_limit: int | None = None


class Principals:
    """The API-key half of `Store`."""

    r: aioredis.Redis
    keys: Keyspace
    _principals: dict[str, tuple[float, Principal]]

    async def put_key_hash(self, key_hash: str, principal: Principal,
                           created_at: int | None = None) -> None:
        await self.r.hset(
            self.keys.api_key(key_hash),
            mapping={
                "project": principal.project,
                "admin": int(principal.admin),
                "rpm": principal.rpm,
                "routes": json.dumps(dict(principal.routes)),
                "max_priority": principal.max_priority,
                "default_priority": principal.default_priority,
                "enqueued_token_limit": _optional(principal.enqueued_token_limit),
                "created_at": created_at or int(time.time()),
            },
        )

    async def principal(self, api_key: str) -> Principal | None:
        """The key's principal. A key found is remembered for PRINCIPAL_TTL_S (keys are
        never changed in place); one not found is looked up every time (a new key works
        at once)."""
        key_hash = hash_key(api_key)
        cached = self._principals.get(key_hash)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        found = await self.principal_of_hash(key_hash)
        if found is None:
            return None
        if len(self._principals) > PRINCIPALS_KEPT:
            self._principals.clear()
        self._principals[key_hash] = (time.monotonic() + PRINCIPAL_TTL_S, found)
        return found

    async def principal_of_hash(self, key_hash: str) -> Principal | None:
        row = await self.r.hgetall(self.keys.api_key(key_hash))
        if not row:
            return None
        return Principal(project=str(row["project"]), admin=row.get("admin") == "1",
                         rpm=int(row.get("rpm") or 0), key_hash=key_hash,
                         routes=tuple(json.loads(row.get("routes") or "{}").items()),
                         max_priority=int(row.get("max_priority") or 0),
                         default_priority=int(row.get("default_priority") or 0),
                         enqueued_token_limit=_limit(row.get("enqueued_token_limit")))


def _optional(limit: int | None) -> str:
    return "" if limit is None else str(limit)


def _limit(raw: object) -> int | None:
    return int(str(raw)) if raw else None
