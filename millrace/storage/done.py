"""Which input lines of a batch have a result (the sink's `done:<batch>` bitmaps): re-drive
and fill skip exactly those lines."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import redis.asyncio as aioredis

from millrace.storage.keyspace import Keyspace


class Done:
    """The done-lines half of `Store`."""

    r: aioredis.Redis
    keys: Keyspace
    _token: str

    async def mark_done(self, lines: Mapping[str, Iterable[int]]) -> None:
        """Set the bits of input lines (per batch) whose result line is in the spool: one
        bitmap per batch built here and OR-ed in (a SETBIT per line was a third of the
        sink's CPU, spent packing commands). MULTI keeps the scratch key ours."""
        scratch = self.keys.done_new(self._token)
        async with self.r.pipeline(transaction=True) as p:
            for batch_id, numbers in lines.items():
                bits = bitmap(numbers)
                if bits:
                    p.set(scratch, bits)
                    p.bitop("OR", self.keys.done(batch_id), self.keys.done(batch_id), scratch)
            p.delete(scratch)
            await p.execute()

    async def done_lines(self, batch_id: str) -> DoneLines:
        raw = await self.r.execute_command(  # type: ignore[no-untyped-call]
            "GET", self.keys.done(batch_id), NEVER_DECODE=True)
        return DoneLines(bytes(raw or b""))


def bitmap(lines: Iterable[int]) -> bytes:
    """A Redis bitmap with the bits of `lines` set (the layout of `DoneLines`)."""
    numbers = list(lines)
    if not numbers:
        return b""
    bits = bytearray(max(numbers) // 8 + 1)
    for n in numbers:
        bits[n >> 3] |= 0x80 >> (n & 7)
    return bytes(bits)


@dataclass(frozen=True)
class DoneLines:
    """A Redis bitmap (bit n = line n has a result), most significant bit first."""

    bits: bytes

    def __contains__(self, line: int) -> bool:
        byte, bit = divmod(line, 8)
        return byte < len(self.bits) and bool(self.bits[byte] >> (7 - bit) & 1)

    def __len__(self) -> int:
        return sum(bin(b).count("1") for b in self.bits)
