"""Imports run down only: the contract package (`millrace/`, floor 1) ← the services
(`gateway/`, `streams/`, `gpu_consumer/`, `sink/`, floor 2) ← the tools (`ops/`, floor 3).

Read from the source with `ast` (every import, at the top of a module or inside a function),
so a lazy import cannot hide an arrow. Besides the floors: no route module imports another
(what two surfaces share lives beside the routes, not in one of them), and the Redis client
is used only inside `millrace/storage/`, the one storage seam.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.sources import parsed, python_files

ROOT = Path(__file__).resolve().parent.parent
CONTRACT = "millrace"
SERVICES = ("gateway", "streams", "gpu_consumer", "sink")
TOOLS = "ops"
STORAGE = "millrace.storage"
# the launcher waits for the redis-server it started with a client of its own
REDIS_CLIENT_ALLOWED = ("ops.embedded",)


@dataclass(frozen=True)
class Arrow:
    source: str  # the importing module, dotted
    target: str  # the imported module, dotted
    line: int

    def __str__(self) -> str:
        return f"{self.source}:{self.line} imports {self.target}"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(source: str, tree: ast.AST) -> list[Arrow]:
    """Every module `tree` imports, relative imports resolved."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [Arrow(source, alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = source.split(".")[: -node.level]
                base = ".".join([*package, base] if base else package)
            # `from pkg import mod` imports pkg.mod when mod is a module
            found += [Arrow(source, f"{base}.{alias.name}", node.lineno) for alias in node.names]
    return found


def floor(module: str) -> int | None:
    top = module.split(".")[0]
    if top == CONTRACT:
        return 1
    if top in SERVICES:
        return 2
    if top == TOOLS:
        return 3
    return None


def is_route(tree: ast.AST) -> bool:
    """A module that defines `router = APIRouter(...)`."""
    return any(isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
               and getattr(node.value.func, "id", None) == "APIRouter"
               and any(getattr(t, "id", None) == "router" for t in node.targets)
               for node in getattr(tree, "body", []))


def violations(modules: dict[str, ast.AST]) -> list[str]:
    """What breaks the floors in `modules` (dotted name → parsed source)."""
    routes = {name for name, tree in modules.items() if is_route(tree)}
    found = []
    for name, tree in modules.items():
        mine = floor(name)
        for arrow in imports(name, tree):
            theirs = floor(arrow.target)
            top, their_top = name.split(".")[0], arrow.target.split(".")[0]
            if theirs is not None and mine is not None and theirs > mine:
                found.append(f"upward: {arrow}")
            elif mine == theirs == 2 and top != their_top:
                found.append(f"sideways (one service into another): {arrow}")
            if name in routes and any(arrow.target == r or arrow.target.startswith(r + ".")
                                      for r in routes - {name}):
                found.append(f"route into route: {arrow}")
            outside = not (name == STORAGE or name.startswith(STORAGE + "."))
            if (outside and name not in REDIS_CLIENT_ALLOWED and their_top == "redis"
                    and not arrow.target.startswith("redis.exceptions")):
                found.append(f"Redis client outside {STORAGE}: {arrow}")
        if not (name == STORAGE or name.startswith(STORAGE + ".")):
            found += [f"Redis client outside {STORAGE}: {name}:{node.lineno} uses a store's .r"
                      for node in ast.walk(tree)
                      if isinstance(node, ast.Attribute) and node.attr == "r"
                      and _names_a_store(node.value)]
    return found


def _names_a_store(node: ast.expr) -> bool:
    name = node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", "")
    return name.endswith("store")


def our_modules() -> dict[str, ast.AST]:
    trees = parsed(python_files(CONTRACT, *SERVICES, TOOLS))
    return {module_name(path): tree for path, tree in trees.items()}


def test_imports_run_down_only() -> None:
    modules = our_modules()
    assert {floor(name) for name in modules} == {1, 2, 3}
    assert violations(modules) == []


def test_nothing_outside_the_tools_imports_them() -> None:
    """The tests may; no shipped package does (the tools are floor 3: the top)."""
    modules = our_modules()
    into_tools = [str(a) for name, tree in modules.items() if floor(name) != 3
                  for a in imports(name, tree) if floor(a.target) == 3]
    assert into_tools == []


@pytest.mark.parametrize(("modules", "expected"), [
    ({"millrace.records": "from gateway.app import create_app"},
     "upward: millrace.records:1 imports gateway.app.create_app"),
    ({"millrace.records": "def f():\n    from ops import launcher"},
     "upward: millrace.records:2 imports ops.launcher"),
    ({"sink.service": "import ops.chaos"}, "upward: sink.service:1 imports ops.chaos"),
    ({"gateway.admin": "from streams.app import run"},
     "sideways (one service into another): gateway.admin:1 imports streams.app.run"),
    ({"gateway.api.routes.a": "from fastapi import APIRouter\nrouter = APIRouter()\n"
                              "from gateway.api.routes.b import x",
      "gateway.api.routes.b": "from fastapi import APIRouter\nrouter = APIRouter()\nx = 1"},
     "route into route: gateway.api.routes.a:3 imports gateway.api.routes.b.x"),
    ({"gateway.api.routes.a": "from fastapi import APIRouter\nrouter = APIRouter()\n"
                              "from . import b",
      "gateway.api.routes.b": "from fastapi import APIRouter\nrouter = APIRouter()\nx = 1"},
     "route into route: gateway.api.routes.a:3 imports gateway.api.routes.b"),
    ({"sink.service": "import redis"}, "Redis client outside millrace.storage: "
                                       "sink.service:1 imports redis"),
    ({"gateway.health": "async def f(ctx):\n    await ctx.store.r.ping()"},
     "Redis client outside millrace.storage: gateway.health:2 uses a store's .r"),
])
def test_the_check_catches_each_kind_of_wrong_arrow(modules: dict[str, str], expected: str
                                                    ) -> None:
    """Each rule fails on a module that breaks it (so the passing test above means
    something)."""
    parsed = {name: ast.parse(source) for name, source in modules.items()}
    assert violations(parsed) == [expected]


@pytest.mark.parametrize("source", [
    "from millrace.records import RequestRecord",  # down
    "from gateway.intake import create_batch",  # within the service
    "from redis.exceptions import RedisError",  # an error type, not the client
])
def test_the_check_lets_a_downward_arrow_pass(source: str) -> None:
    assert violations({"gateway.api.routes.a": ast.parse(source)}) == []
