"""PromptLoop tasks in Redis (what a task is: `millrace/promptloop.py`)."""

from __future__ import annotations

import re
import secrets
import time

from millrace.promptloop import Task, TaskSpec
from millrace.storage.store import Store

_TASK_ID = re.compile(r"^task_[0-9a-f]{24}$")


class Tasks:
    """Tasks in Redis: `task:<id>` holds the project, the latest version and every version
    (`v<n>`: the Task as JSON, never changed once written); `tasks:<project>` lists them."""

    def __init__(self, store: Store) -> None:
        self.r = store.r
        self.keys = store.keys

    async def create(self, spec: TaskSpec, project: str) -> Task:
        now = int(time.time())
        task = Task(id="task_" + secrets.token_hex(12), version=1, created_at=now,
                    updated_at=now, **spec.model_dump())
        async with self.r.pipeline(transaction=True) as p:
            p.hset(self.keys.task(task.id), mapping={"project": project, "latest": 1,
                                                     "v1": task.model_dump_json()})
            p.zadd(self.keys.tasks(project), {task.id: time.time()})
            await p.execute()
        return task

    async def update(self, task: Task, spec: TaskSpec) -> Task:
        """A new version; rows and jobs keep the version they ran with."""
        version = int(await self.r.hincrby(self.keys.task(task.id), "latest", 1))
        new = Task(id=task.id, version=version, created_at=task.created_at,
                   updated_at=int(time.time()), **spec.model_dump())
        await self.r.hset(self.keys.task(task.id), f"v{version}", new.model_dump_json())
        return new

    async def get(self, task_id: str, project: str, version: int | None = None
                  ) -> Task | None:
        if not _TASK_ID.match(task_id):
            return None
        owner, latest = await self.r.hmget(self.keys.task(task_id), ["project", "latest"])
        if owner != project:
            return None
        raw = await self.r.hget(self.keys.task(task_id), "v" + str(version or int(latest or 1)))
        return Task.model_validate_json(raw) if raw else None

    async def list(self, project: str, limit: int = 100) -> list[Task]:
        ids = await self.r.zrevrange(self.keys.tasks(project), 0, limit - 1)
        found = [await self.get(str(i), project) for i in ids]
        return [t for t in found if t is not None]
