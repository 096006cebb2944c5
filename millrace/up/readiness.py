"""Readiness markers: a service writes `<run_dir>/<name>.ready` (JSON) once it can work."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from millrace.settings import Settings


def marker(settings: Settings, name: str) -> Path:
    return settings.run_dir / f"{name}.ready"


def mark_ready(settings: Settings, name: str, **info: Any) -> None:
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    tmp = marker(settings, name).with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), **info}))
    tmp.replace(marker(settings, name))


def read(settings: Settings, name: str) -> dict[str, Any] | None:
    try:
        info: dict[str, Any] = json.loads(marker(settings, name).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return info


def clear(settings: Settings, name: str) -> None:
    marker(settings, name).unlink(missing_ok=True)
