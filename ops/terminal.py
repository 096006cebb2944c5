"""The terminal client: `millrace submit` and `millrace batches ls|show|watch|cancel|retry|
download`, a client of the HTTP API like any other.

Where it connects: `--base-url`/`--api-key`, else `MILLRACE_BASE_URL`/`MILLRACE_API_KEY`,
else the OpenAI SDK's `OPENAI_BASE_URL`/`OPENAI_API_KEY`, else the `millrace up` in the
data dir (its `endpoints.json` and generated key).

Exit codes of `submit --wait` and `batches watch`: 0 every line succeeded, 3 some lines
failed, 1 the batch failed, expired or was cancelled, 2 a usage or API error.
"""

from __future__ import annotations

import csv
import json
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, BinaryIO

import httpx
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.prompt import Confirm
from rich.table import Table

from millrace.errors import MillraceError
from millrace.settings import Settings

TERMINAL = {"completed", "failed", "expired", "cancelled"}
POLL_S = 1.0
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_SOME_FAILED = 0, 1, 2, 3


class ClientError(MillraceError):
    """The API answered with an error, or could not be reached."""

    exit_code = EXIT_USAGE


@dataclass(frozen=True)
class Api:
    base_url: str
    api_key: str

    @classmethod
    def of(cls, settings: Settings, base_url: str | None, api_key: str | None) -> Api:
        found: dict[str, Any] = {}
        endpoints = settings.data_dir / "endpoints.json"
        if endpoints.exists():
            found = json.loads(endpoints.read_text())
        url = (base_url or settings.base_url or settings.openai_base_url
               or found.get("base_url"))
        key_file = settings.data_dir / "api_key"
        key = api_key or next((s.get_secret_value() for s in (
            settings.api_key, settings.openai_api_key) if s is not None), None) or (
            key_file.read_text().strip() if key_file.exists() else None)
        if not url or not key:
            raise ClientError("no gateway to talk to: pass --base-url and --api-key, set "
                              "MILLRACE_BASE_URL and MILLRACE_API_KEY, or run `millrace up` "
                              "in this data dir")
        return cls(str(url).rstrip("/"), key)

    def call(self, method: str, path: str, headers: dict[str, str] | None = None,
             raw: bool = False, **kwargs: Any) -> Any:
        """The answer's JSON (its bytes with `raw`), or a ClientError."""
        try:
            answer = httpx.request(method, self.base_url + path, timeout=60, headers={
                "Authorization": f"Bearer {self.api_key}", **(headers or {})}, **kwargs)
        except httpx.HTTPError as exc:
            raise ClientError(f"{self.base_url}: {exc}") from exc
        if answer.status_code >= 400:
            try:
                message = answer.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = answer.text[:200]
            raise ClientError(f"{method} {path}: {answer.status_code} {message}")
        return answer.content if raw else answer.json()


# --- submit ---------------------------------------------------------------------------------
def prepare(path: Path, model: str | None, out: BinaryIO) -> tuple[str, int]:
    """Copy the input file to `out` (each line's `body.model` set to `model` if given):
    (the endpoint its lines name, the number of lines)."""
    endpoint, count = "", 0
    with path.open("rb") as lines:
        for raw in lines:
            if not raw.strip():
                continue
            count += 1
            try:
                line = json.loads(raw)
            except ValueError:
                line = None  # sent as it is: the gateway names the bad line
            if isinstance(line, dict):
                endpoint = endpoint or str(line.get("url") or "")
                if model is not None and isinstance(line.get("body", {}), dict):
                    line.setdefault("body", {})["model"] = model
                    raw = json.dumps(line).encode() + b"\n"
            out.write(raw if raw.endswith(b"\n") else raw + b"\n")
    return endpoint, count


def submit(api: Api, path: Path, endpoint: str | None, model: str | None,
           window: str) -> dict[str, Any]:
    if not path.is_file():
        raise ClientError(f"{path}: no such file")
    with tempfile.TemporaryFile() as prepared:
        named, count = prepare(path, model, prepared)
        if count == 0:
            raise ClientError(f"{path} holds no lines")
        prepared.seek(0)
        uploaded = api.call("POST", "/files", data={"purpose": "batch"},
                            files={"file": (path.name, prepared)})
    batch: dict[str, Any] = api.call("POST", "/batches", json={
        "input_file_id": uploaded["id"], "endpoint": endpoint or named or "/v1/chat/completions",
        "completion_window": window})
    return batch


def task_rows(task: dict[str, Any], csv_path: Path, uuid_column: str) -> bytes:
    """A CSV file's rows as PromptLoop data rows of the task: `data_uuid` from
    `uuid_column`, the inputs from the columns named like the task's input slots."""
    slots = [str(slot["name"]) for slot in task["inputs"]]
    with csv_path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [c for c in (uuid_column, *slots) if c not in (reader.fieldnames or [])]
        if missing:
            raise ClientError(f"{csv_path} has no column {', '.join(missing)} (the task's "
                              f"inputs are {', '.join(slots)})")
        rows = [json.dumps({"data_uuid": row[uuid_column],
                            "inputs": [row[slot] for slot in slots]}) for row in reader]
    if not rows:
        raise ClientError(f"{csv_path} holds no rows")
    return ("\n".join(rows) + "\n").encode()


def submit_task(api: Api, task_id: str, csv_path: Path, uuid_column: str) -> dict[str, Any]:
    """Run a task over a CSV file's rows (a PromptLoop job): the batch it became."""
    root = Api(api.base_url.removesuffix("/v1"), api.api_key)
    task = root.call("GET", f"/v0/tasks/{task_id}")
    launched = root.call("POST", f"/v0/launch-job?task_id={task_id}",
                         content=task_rows(task, csv_path, uuid_column),
                         headers={"Content-Type": "application/jsonl"})
    batch: dict[str, Any] = api.call("GET", f"/batches/{launched['job_id']}")
    return batch


# --- watching -------------------------------------------------------------------------------
class Interrupts:
    """Ctrl-C noted instead of raised, so it is answered between two polls whatever the
    client was doing when it came (installed before the batch id is shown)."""

    def __init__(self) -> None:
        self.pending = False
        signal.signal(signal.SIGINT, self._noted)

    def _noted(self, signum: int, frame: FrameType | None) -> None:
        self.pending = True

    def take(self) -> bool:
        pending, self.pending = self.pending, False
        return pending


class LeftRunning(Exception):
    """The user stopped watching and kept the batch running."""


def watch(api: Api, batch_id: str, console: Console, interrupts: Interrupts,
          cancel: Callable[[], bool]) -> dict[str, Any]:
    """A progress bar until the batch is final: the final batch. At a Ctrl-C, `cancel`
    says whether to cancel the batch (else LeftRunning)."""
    columns = (TextColumn("[bold]{task.fields[status]}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("failed {task.fields[failed]}"),
               TextColumn("{task.fields[rate]:.1f} lines/s"), TimeElapsedColumn(),
               TextColumn("ETA"), TimeRemainingColumn())
    started = time.monotonic()
    batch: dict[str, Any] = api.call("GET", f"/batches/{batch_id}")
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(batch_id, total=None, status=batch["status"], failed=0,
                                 rate=0.0)
        while batch["status"] not in TERMINAL:
            if interrupts.take():
                progress.stop()
                if not cancel():
                    raise LeftRunning(batch_id)
                api.call("POST", f"/batches/{batch_id}/cancel")
                progress.start()
            time.sleep(POLL_S)
            batch = api.call("GET", f"/batches/{batch_id}")
            _show_progress(progress, task, batch, time.monotonic() - started)
    return batch


def _show_progress(progress: Progress, task: TaskID, batch: dict[str, Any], took_s: float
                   ) -> None:
    counts = batch.get("request_counts") or {}
    done = int(counts.get("completed", 0)) + int(counts.get("failed", 0))
    progress.update(task, total=int(counts.get("total", 0)) or None, completed=done,
                    status=batch["status"], failed=int(counts.get("failed", 0)),
                    rate=done / max(took_s, 1e-3))


def exit_code(batch: dict[str, Any]) -> int:
    if batch["status"] != "completed":
        return EXIT_FAILED
    counts = batch.get("request_counts") or {}
    return EXIT_SOME_FAILED if int(counts.get("failed", 0)) else EXIT_OK


def download(api: Api, batch: dict[str, Any], out: Path) -> list[Path]:
    """The batch's output and error files, written to `out`: their paths."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for kind in ("output", "error"):
        file_id = batch.get(f"{kind}_file_id")
        if file_id:
            target = out / f"{batch['id']}_{kind}.jsonl"
            target.write_bytes(api.call("GET", f"/files/{file_id}/content", raw=True))
            written.append(target)
    return written


def batches_table(batches: list[dict[str, Any]]) -> Table:
    table = Table()
    table.add_column("id", no_wrap=True, min_width=30)  # whole, so it can be copied
    for name in ("status", "completed", "failed", "total", "created", "endpoint"):
        table.add_column(name)
    for b in batches:
        counts = b.get("request_counts") or {}
        table.add_row(b["id"], b["status"], str(counts.get("completed", 0)),
                      str(counts.get("failed", 0)), str(counts.get("total", 0)),
                      time.strftime("%m-%d %H:%M", time.localtime(b["created_at"])),
                      b["endpoint"])
    return table


def ask_to_cancel(console: Console) -> Callable[[], bool]:
    return lambda: Confirm.ask("Cancel the batch? (no: leave it running)", console=console,
                               default=False)


def console() -> Console:
    """A console for people; piped, wide enough that a table row stays one line."""
    found = Console()
    return found if found.is_terminal else Console(width=160)
