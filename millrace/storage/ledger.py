"""The bookkeeping of open stream batches in Redis: which messages became which lines.

A stream batch takes lines from the ingest topic until it is closed (`POST /seal`). Each
message that becomes a line claims its `custom_id` under the message's identity
(broker id, partition and offset), so a redelivered message keeps its line number and a
second message with the same `custom_id` is a duplicate; messages that become no line
still count as received, so a producer's announced total can be awaited.
"""

from __future__ import annotations

from typing import Literal

from millrace.storage.store import Store

Claim = Literal["new", "redelivery", "duplicate"]

# custom_id → "<token>|<line>": the line a message claimed is kept with the claim, so the
# same message redelivered gets the same line number back.
_CLAIM = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if not current then
  local line = redis.call('HLEN', KEYS[1]) + 1
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. '|' .. line)
  return {'new', line}
end
local sep = string.find(current, '|', 1, true)
if string.sub(current, 1, sep - 1) == ARGV[2] then
  return {'redelivery', tonumber(string.sub(current, sep + 1))}
end
return {'duplicate', 0}
"""


class StreamLedger:
    def __init__(self, store: Store) -> None:
        self.r = store.r
        self.keys = store.keys
        self._claim = self.r.register_script(_CLAIM)

    async def open(self, batch_id: str, endpoint: str, project: str, token: str) -> None:
        """Open a stream batch; `token`: what its ingest messages must carry."""
        await self.r.hset(self.keys.stream(batch_id),
                          mapping={"endpoint": endpoint, "project": project, "token": token})

    async def get(self, batch_id: str) -> dict[str, str] | None:
        """{endpoint, project, token[, expected][, sealed_total]}, None if no such stream
        batch."""
        row = await self.r.hgetall(self.keys.stream(batch_id))
        return {str(k): str(v) for k, v in row.items()} or None

    async def note_rejected(self, batch_id: str, token: str) -> None:
        """A message of the batch that did not become a line still counts as received."""
        await self.r.sadd(self.keys.stream_rejected(batch_id), token)

    async def received(self, batch_id: str) -> int:
        """Distinct ingest messages of the batch processed so far (lines + rejected)."""
        async with self.r.pipeline(transaction=False) as p:
            p.hlen(self.keys.stream_ids(batch_id))
            p.scard(self.keys.stream_rejected(batch_id))
            lines, rejected = await p.execute()
        return int(lines) + int(rejected)

    async def expect(self, batch_id: str, messages: int) -> None:
        await self.r.hsetnx(self.keys.stream(batch_id), "expected", messages)

    async def claim(self, batch_id: str, custom_id: str, token: str) -> tuple[Claim, int]:
        """Give `custom_id` to the message identified by `token`.

        Returns ("new", line number), ("redelivery", line number) when the same message
        comes again after a crash, or ("duplicate", 0) when another message holds the id.
        """
        outcome, line = await self._claim(keys=[self.keys.stream_ids(batch_id)],
                                          args=[custom_id, token])
        claim: Claim = outcome if outcome in ("new", "redelivery") else "duplicate"
        return claim, int(line)

    async def held(self, batch_id: str, custom_id: str, token: str
                   ) -> tuple[Claim | None, int]:
        """("redelivery", line) if the message `token` holds `custom_id`, else (None, 0)."""
        current = await self.r.hget(self.keys.stream_ids(batch_id), custom_id)
        holder, _, line = str(current or "").partition("|")
        return ("redelivery", int(line)) if current and holder == token else (None, 0)

    async def forget(self, batch_id: str) -> None:
        """A finished batch needs no bookkeeping; a late message is an unknown batch."""
        await self.r.delete(self.keys.stream(batch_id), self.keys.stream_ids(batch_id),
                            self.keys.stream_rejected(batch_id))

    async def close(self, batch_id: str) -> int:
        """Close the batch; idempotent: a second call returns the same total."""
        key = self.keys.stream(batch_id)
        total = await self.r.hlen(self.keys.stream_ids(batch_id))
        await self.r.hsetnx(key, "sealed_total", total)
        return int(await self.r.hget(key, "sealed_total") or 0)
