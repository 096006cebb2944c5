"""Readiness markers: a service writes `<run_dir>/<name>.ready` (JSON) once it can work.

Under `up --replicas` each instance has its own data dir, `<data_dir>/replicas/<name>`, and
its marker is there."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from millrace.settings import Settings


def marker(settings: Settings, name: str) -> Path:
    return settings.run_dir / f"{name}.ready"


def mark_ready(settings: Settings, name: str, **info: Any) -> None:
    _write(settings, name, {"pid": os.getpid(), **info})


def note_partitions(settings: Settings, name: str, topic: str, partitions: list[int]) -> None:
    """Record in this process's marker which partitions of `topic` it holds now, so an
    operator (and the scale-out test) can tell which instance owns a batch's partition.
    Nothing before the process marked itself ready."""
    info = read(settings, name)
    if info is None or info.get("pid") != os.getpid():
        return
    _write(settings, name, {**info, "partitions": {**info.get("partitions", {}),
                                                   topic: sorted(partitions)}})


def _write(settings: Settings, name: str, info: dict[str, Any]) -> None:
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    tmp = marker(settings, name).with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(info))
    tmp.replace(marker(settings, name))


def read(settings: Settings, name: str) -> dict[str, Any] | None:
    return read_path(marker(settings, name))


def read_path(path: Path) -> dict[str, Any] | None:
    try:
        info: dict[str, Any] = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return info


def clear(settings: Settings, name: str) -> None:
    marker(settings, name).unlink(missing_ok=True)


def instance_dir(data_dir: Path, name: str) -> Path:
    """The data dir of one instance under `up --replicas`."""
    return data_dir / "replicas" / name


def markers(data_dir: Path) -> Iterator[Path]:
    """Every marker of a deployment: its own and those of its instances' data dirs."""
    yield from (data_dir / "run").glob("*.ready")
    yield from (data_dir / "replicas").glob("*/run/*.ready")


def pids(data_dir: Path) -> dict[str, int]:
    """Process name (gateway, sink-2, broker, …) → the pid its marker names."""
    found = {}
    for path in markers(data_dir):
        pid = (read_path(path) or {}).get("pid")
        if isinstance(pid, int):
            found[path.stem] = pid
    return found
