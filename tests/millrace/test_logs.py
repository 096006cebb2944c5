"""`MILLRACE_LOG_FORMAT=json`: one JSON object per line, with the batch id where the message
names one (run in a process of its own: configuring logging is process-wide)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

SCRIPT = """
import logging
from millrace import logs
from millrace.settings import Settings
logs.configure(Settings.load())
logging.getLogger("sink.service").info("wrote the files of %s: %d lines",
                                       "batch_0123456789abcdef01234567", 3)
logging.getLogger("uvicorn.error").warning("no batch here")
token = logs.REQUEST.set(("req_" + "a" * 32, "mine-1"))
logging.getLogger("gateway.api").info("answering")
logs.REQUEST.reset(token)
logging.getLogger("gateway.api").info("after")
"""


def run(fmt: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MILLRACE_")}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env={**env, "MILLRACE_LOG_FORMAT": fmt},
                         capture_output=True, text=True, check=True)
    return out.stderr.splitlines()


def test_json_lines_carry_the_batch_id_and_the_request_ids() -> None:
    first, second, during, after = (json.loads(line) for line in run("json"))
    assert first["message"] == "wrote the files of batch_0123456789abcdef01234567: 3 lines"
    assert first["batch_id"] == "batch_0123456789abcdef01234567"
    assert first["level"] == "INFO" and first["logger"] == "sink.service"
    assert isinstance(first["pid"], int) and first["time"]
    assert second["batch_id"] is None and second["level"] == "WARNING"
    assert (during["request_id"], during["client_request_id"]) == ("req_" + "a" * 32, "mine-1")
    assert (after["request_id"], after["client_request_id"]) == (None, None)


def test_text_is_the_default() -> None:
    lines = run("text")
    assert lines[0].endswith("sink.service INFO wrote the files of "
                             "batch_0123456789abcdef01234567: 3 lines")
    assert lines[2].endswith("gateway.api INFO answering [req_" + "a" * 32 + " client mine-1]")
    assert lines[3].endswith("gateway.api INFO after")
