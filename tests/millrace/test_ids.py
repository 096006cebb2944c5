"""Ids made per line: 32 hex digits, never repeated, and a forked child does not repeat
its parent's sequence."""

from __future__ import annotations

import os
import re

from millrace import ids


def test_ids_are_32_hex_digits_and_unique() -> None:
    made = [ids.token() for _ in range(100_000)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", token) for token in made[:1000])
    assert len(set(made)) == len(made)


def test_a_forked_child_makes_other_ids_than_its_parent() -> None:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, to the parent
        os.write(write, " ".join(ids.token() for _ in range(10)).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read) as pipe:
        child = set(pipe.read().split())
    parent = {ids.token() for _ in range(10)}
    assert len(child) == 10 and not child & parent
