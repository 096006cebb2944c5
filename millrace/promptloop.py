"""PromptLoop tasks, and what their data rows become.

A task is a reusable job: a model, instructions, typed input slots (`string` or `link`) and
named output fields. A data row `{"data_uuid": …, "inputs": [v1, v2, …]}` fills the slots in
order. Each row becomes an ordinary OpenAI batch line (`custom_id` = `data_uuid`, a chat
completion whose answer is held to a JSON schema of the output fields by structured outputs),
so a PromptLoop job is a batch like any other: same topics, workers, counts and files. Its
results are read back from the output and error files as one object per row:
`{"data_uuid", "<field>": value, …}` or `{"data_uuid", "error": {"code", "message"}}`.

A `link` input is not fetched here: the row's line carries a `{"type": "link"}` content
part, which the gateway's explode replaces with the page's text (`gateway/lines.py`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field

from millrace.filestore import FileStore
from millrace.protocol import OutputLine
from millrace.result_files import KINDS, final_key

CHAT = "/v1/chat/completions"
MAX_REPORTED_ERRORS = 1000
_NAME = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"
JSON_TYPES = {"string": "string", "number": "number", "integer": "integer",
              "boolean": "boolean"}


class TaskInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    type: Literal["string", "link"] = "string"


class TaskOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=_NAME)
    type: Literal["string", "number", "integer", "boolean"] = "string"
    description: str = Field(default="", max_length=1000)
    # a string field's most characters: the grammar closes the string there, so a model
    # that would ramble still answers valid JSON within the task's max_tokens
    max_length: int = Field(default=200, ge=1, le=100_000)


class TaskSpec(BaseModel):
    """What a caller sends to create a task or make a new version of it."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=256)
    model: str | None = Field(default=None, description="a served chat model; default: the "
                              "first one")
    instructions: str = Field(min_length=1, max_length=20_000)
    inputs: list[TaskInput] = Field(min_length=1, max_length=32)
    outputs: list[TaskOutput] = Field(min_length=1, max_length=64)
    max_tokens: int = Field(default=256, ge=16, le=8192,
                            description="tokens the answer (the output fields' JSON) may use")


class Task(TaskSpec):
    id: str
    object: Literal["task"] = "task"
    version: int
    created_at: int
    updated_at: int

    def answer_schema(self) -> dict[str, Any]:
        """The JSON schema the answer is held to: exactly the output fields."""
        properties = {
            o.name: {"type": JSON_TYPES[o.type],
                     **({"description": o.description} if o.description else {}),
                     **({"maxLength": o.max_length} if o.type == "string" else {})}
            for o in self.outputs}
        return {"type": "object", "properties": properties,
                "required": [o.name for o in self.outputs], "additionalProperties": False}

    def system_prompt(self) -> str:
        fields = "\n".join(f"- {o.name} ({o.type})" + (f": {o.description}" if o.description
                                                        else "") for o in self.outputs)
        return (f"{self.instructions}\n\nAnswer with one JSON object with exactly these "
                f"fields:\n{fields}")

    def request_line(self, data_uuid: str, inputs: list[Any]) -> dict[str, Any]:
        """The OpenAI batch line a row becomes."""
        parts: list[dict[str, Any]] = []
        for slot, value in zip(self.inputs, inputs, strict=True):
            if slot.type == "link":
                parts.append({"type": "link", "name": slot.name, "url": value})
            else:
                parts.append({"type": "text", "text": f"{slot.name}: {value}"})
        return {
            "custom_id": data_uuid, "method": "POST", "url": CHAT,
            "body": {
                "model": self.model,
                "messages": [{"role": "system", "content": self.system_prompt()},
                             {"role": "user", "content": parts}],
                "response_format": {"type": "json_schema", "json_schema": {
                    "name": "row", "schema": self.answer_schema(), "strict": True}},
                "max_tokens": self.max_tokens,
                "temperature": 0,
            },
        }


# --- data rows ------------------------------------------------------------------------------
class RowError(BaseModel):
    line: int
    data_uuid: str | None = None
    code: str
    message: str


@dataclass
class RowReport:
    rows: int = 0
    errors: list[RowError] = field(default_factory=list)

    def add(self, line: int, data_uuid: str | None, code: str, message: str) -> None:
        if len(self.errors) < MAX_REPORTED_ERRORS:
            self.errors.append(RowError(line=line, data_uuid=data_uuid, code=code,
                                        message=message))


def is_link(value: object) -> bool:
    if not isinstance(value, str):
        return False
    parts = urlsplit(value)
    return parts.scheme in ("http", "https") and bool(parts.netloc)


def check_row(task: Task, number: int, raw: bytes, report: RowReport,
              max_line_bytes: int) -> tuple[str, list[Any]] | None:
    """(data_uuid, inputs) of a good row; a bad one is added to the report."""
    if len(raw) > max_line_bytes:
        report.add(number, None, "line_too_long",
                   f"This row is {len(raw)} bytes; a row may be at most {max_line_bytes}.")
        return None
    try:
        row = json.loads(raw)
    except (ValueError, RecursionError):
        report.add(number, None, "invalid_json_line", "This line is not valid JSON.")
        return None
    if not isinstance(row, dict):
        report.add(number, None, "invalid_json_line", "Each line must be a JSON object.")
        return None
    uuid, inputs = row.get("data_uuid"), row.get("inputs")
    if not isinstance(uuid, str) or not uuid:
        report.add(number, None, "missing_data_uuid", "Each row needs a 'data_uuid' string.")
        return None
    unknown = sorted(set(row) - {"data_uuid", "inputs"})
    if unknown:
        report.add(number, uuid, "unknown_field", f"Unknown field '{unknown[0]}'.")
        return None
    if not isinstance(inputs, list):
        report.add(number, uuid, "missing_inputs", "Each row needs an 'inputs' array.")
        return None
    if len(inputs) > len(task.inputs):
        report.add(number, uuid, "too_many_inputs",
                   f"Too many inputs: the task takes {len(task.inputs)}, the row has "
                   f"{len(inputs)}.")
        return None
    if len(inputs) < len(task.inputs):
        report.add(number, uuid, "too_few_inputs",
                   f"Too few inputs: the task takes {len(task.inputs)}, the row has "
                   f"{len(inputs)}.")
        return None
    for position, (slot, value) in enumerate(zip(task.inputs, inputs, strict=True)):
        good = is_link(value) if slot.type == "link" else isinstance(value, str | int | float)
        if not good or isinstance(value, bool):
            want = "an http(s) URL" if slot.type == "link" else "a string"
            report.add(number, uuid, "incorrect_input_type",
                       f"Incorrect input type: input {position} ('{slot.name}') must be "
                       f"{want}.")
            return None
    return uuid, inputs


def rows(raw_lines: Iterable[bytes]) -> Iterator[tuple[int, bytes]]:
    for number, raw in enumerate(raw_lines, start=1):
        if raw.strip():
            yield number, raw


def validate_rows(task: Task, raw_lines: Iterable[bytes], *, max_rows: int,
                  max_line_bytes: int) -> RowReport:
    report = RowReport()
    seen: set[str] = set()
    for number, raw in rows(raw_lines):
        report.rows += 1
        if report.rows == max_rows + 1:
            report.add(number, None, "too_many_rows", f"A job may hold at most {max_rows} rows.")
        found = check_row(task, number, raw, report, max_line_bytes)
        if found is None:
            continue
        if found[0] in seen:
            report.add(number, found[0], "duplicate_data_uuid",
                       f"The data_uuid '{found[0]}' appears more than once.")
            continue
        seen.add(found[0])
    if report.rows == 0:
        report.add(0, None, "empty_file", "The data has no rows.")
    return report


def request_lines(task: Task, raw_lines: Iterable[bytes], max_line_bytes: int
                  ) -> Iterator[bytes]:
    """The batch input file of validated rows: one request line per row, same line numbers
    (a blank row stays blank, so line n of the file is row n)."""
    unused = RowReport()
    for raw in raw_lines:
        found = check_row(task, 0, raw, unused, max_line_bytes) if raw.strip() else None
        yield (json.dumps(task.request_line(*found)).encode() if found else b"") + b"\n"


# --- results --------------------------------------------------------------------------------
def result_row(raw: bytes, usage: bool = False) -> dict[str, Any]:
    """One output or error line of a task's batch, as PromptLoop's result row (with the
    request's token usage when `usage`)."""
    line = OutputLine.model_validate_json(raw)
    if line.error is not None:
        return {"data_uuid": line.custom_id,
                "error": {"code": line.error.code, "message": line.error.message}}
    body = line.response.body if line.response else None
    if line.response is None or line.response.status_code != 200 or not isinstance(body, dict):
        error = (body or {}).get("error") if isinstance(body, dict) else None
        error = error if isinstance(error, dict) else {}
        return {"data_uuid": line.custom_id,
                "error": {"code": error.get("code") or "request_failed",
                          "message": error.get("message") or "the request failed"}}
    try:
        content = body["choices"][0]["message"]["content"]
        fields = json.loads(content)
        if not isinstance(fields, dict):
            raise ValueError("not an object")
    except (KeyError, IndexError, TypeError, ValueError):
        return {"data_uuid": line.custom_id,
                "error": {"code": "invalid_output",
                          "message": "The model's answer is not a JSON object of the output "
                                     "fields (was it cut off by max_tokens?)."}}
    row: dict[str, Any] = {**fields, "data_uuid": line.custom_id}
    if usage:
        row["usage"] = body.get("usage")
    return row


def result_rows(files: FileStore, batch_id: str, usage: bool = False
                ) -> Iterator[dict[str, Any]]:
    """A finished task batch's rows, read from its output then its error file, one at a
    time (memory stays one row whatever the job's size)."""
    for kind in KINDS:
        key = final_key(batch_id, kind)
        if files.exists(key):
            for raw in files.iter_lines(key):
                if raw.strip():
                    yield result_row(raw, usage)
