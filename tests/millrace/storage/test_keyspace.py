"""Every Redis key family is in the keyspace's table (with who writes it), and every family
in the table is one the keyspace makes: the table is the map docs/architecture.md points
readers to, so it must not drift from the code."""

from __future__ import annotations

import inspect
import re

from millrace.storage import keyspace
from millrace.storage.keyspace import Keyspace


def families_made() -> set[str]:
    """The family (first part after the namespace) of every key the keyspace makes."""
    keys = Keyspace("ns")
    found = set()
    for name, member in inspect.getmembers(Keyspace):
        if name.startswith("_"):
            continue
        if isinstance(member, property):
            key = member.fget(keys)  # type: ignore[misc]
        elif inspect.isfunction(member):
            arity = len(inspect.signature(member).parameters) - 1
            key = member(keys, *["x"] * arity)
        else:
            continue
        namespace, family, *_ = key.split(":")
        assert namespace == "ns", key
        found.add(family)
    return found


def families_in_the_table() -> set[str]:
    doc = keyspace.__doc__ or ""
    return {re.split(r"[:`]", key)[0]
            for row in re.findall(r"^\| (`[^|]+`) \|", doc, re.MULTILINE)
            for key in re.findall(r"`([^`]+)`", row)}


def test_the_table_lists_exactly_the_key_families_the_code_makes() -> None:
    assert families_in_the_table() == families_made()


def test_every_family_names_its_writers() -> None:
    rows = re.findall(r"^\| `[^|]+` \| [^|]+ \| ([^|]+) \|", keyspace.__doc__ or "",
                      re.MULTILINE)
    assert rows and all(writers.strip() for writers in rows)
