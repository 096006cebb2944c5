"""Files on a real Redis: a file is only its project's, a project's files page by creation
from an `after` id, and the expiry index gives back exactly the files past `expires_at`."""

from __future__ import annotations

from typing import Any

from millrace.protocol import FileObject
from millrace.storage.store import Store
from tests.deployment import OnStore


def file(file_id: str, expires_at: int | None = None) -> FileObject:
    return FileObject(id=file_id, bytes=3, created_at=1, filename=f"{file_id}.jsonl",
                      purpose="batch", expires_at=expires_at)


def test_a_file_is_only_its_project_s(on_store: OnStore[Any]) -> None:
    async def scenario(store: Store) -> None:
        await store.put_file(file("f"), "p", "files/f")
        found = await store.get_file("f", "p")
        assert found is not None and (found.obj, found.path) == (file("f"), "files/f")
        assert await store.get_file("f", "q") is None
        assert (await store.get_file_any("f") or found).project == "p"
        assert await store.get_file_any("none") is None

    on_store(scenario)


def test_files_page_by_creation_from_an_after_id(on_store: OnStore[Any]) -> None:
    async def scenario(store: Store) -> None:
        for n in range(5):
            await store.put_file(file(f"f{n}"), "p", f"files/f{n}", listed_at=float(n))
        ids = [f.id for f in await store.list_files("p")]
        assert ids == ["f4", "f3", "f2", "f1", "f0"]
        page = await store.list_files("p", after="f3", limit=2)
        assert [f.id for f in page] == ["f2", "f1"]
        oldest = await store.list_files("p", after="f1", newest_first=False)
        assert [f.id for f in oldest] == ["f2", "f3", "f4"]
        assert await store.list_files("p", after="unknown") == []
        assert await store.list_files("q") == []

    on_store(scenario)


def test_expired_files_are_those_past_expires_at_until_deleted(on_store: OnStore[Any]) -> None:
    async def scenario(store: Store) -> None:
        await store.put_file(file("old", expires_at=100), "p", "files/old")
        await store.put_file(file("new", expires_at=300), "p", "files/new")
        await store.put_file(file("kept"), "p", "files/kept")  # never expires
        await store.put_file(file("gone", expires_at=50), "p", "files/gone")
        await store.r.delete(store.keys.file("gone"))  # its hash lost, its index entry not
        assert [f.obj.id for f in await store.expired_files(now=200)] == ["old"]
        # the dangling entry was dropped on the way
        assert await store.r.zscore(store.keys.file_expiry, "gone") is None
        await store.delete_file("old", "p")
        assert await store.expired_files(now=200) == []
        assert [f.id for f in await store.list_files("p")] == ["kept", "new"]
        assert [f.obj.id for f in await store.expired_files(now=10**10)] == ["new"]

    on_store(scenario)
