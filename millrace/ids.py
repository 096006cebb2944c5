"""Unique ids for records made per line (`batch_req_…`, `req_…`, `chatcmpl-…`).

`uuid.uuid4()` reads 16 bytes from the kernel for every id; a worker makes three per line,
and on the echo engine that was a fifth of its CPU (py-spy, 50,000-line batch). These ids
need to be unique, not secret: 128 bits from a generator seeded once per process from the
kernel, and again in a forked child, so that two processes never share a sequence.
"""

from __future__ import annotations

import os
import random

_random = random.Random()
os.register_at_fork(after_in_child=_random.seed)


def token() -> str:
    """32 hex digits, like `uuid.uuid4().hex`."""
    return f"{_random.getrandbits(128):032x}"
