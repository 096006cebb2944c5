"""What every record is: versioned (`v`; fields are only ever added), frozen, UTF-8 JSON."""

from __future__ import annotations

import time

from pydantic import BaseModel, ConfigDict


def now() -> int:
    return int(time.time())


class Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    v: int = 1

    def dumps(self) -> bytes:
        return self.model_dump_json().encode()
