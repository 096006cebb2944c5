"""PromptLoop tasks on a real Redis: versions are kept whole, a task is its project's only,
and a malformed id is no task."""

from __future__ import annotations

from typing import Any

from millrace.promptloop import TaskSpec
from millrace.storage.store import Store
from millrace.storage.tasks import Tasks
from tests.deployment import OnStore

SPEC = TaskSpec(name="t", instructions="Classify.", inputs=[{"name": "text"}],  # type: ignore[list-item]
                outputs=[{"name": "label"}])  # type: ignore[list-item]


def test_versions_projects_and_listing(on_store: OnStore[Any]) -> None:
    async def scenario(store: Store) -> None:
        tasks = Tasks(store)
        first = await tasks.create(SPEC, "p")
        assert first.id.startswith("task_") and first.version == 1
        second = await tasks.update(first, SPEC.model_copy(update={"name": "t2"}))
        assert (second.id, second.version, second.name) == (first.id, 2, "t2")
        assert await tasks.get(first.id, "p") == second  # the latest
        assert await tasks.get(first.id, "p", version=1) == first  # kept whole
        assert await tasks.get(first.id, "other-project") is None
        assert await tasks.get("task_../../x", "p") is None
        other = await tasks.create(SPEC, "p")
        assert [t.id for t in await tasks.list("p")] == [other.id, first.id]
        assert await tasks.list("other-project") == []

    on_store(scenario)
