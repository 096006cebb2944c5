"""Issue 25: the file store fills up mid-batch (a small tmpfs of its own, in a mount
namespace of the deployment's). The sink cannot write the batch's files: it waits, no
truncated file is ever published, the API answers uploads with a 503 in OpenAI's envelope
(never a 500); once space is back the batch completes with every line exactly once."""

from __future__ import annotations

from pathlib import Path

from millrace.result_files import final_key
from ops.chaos import (
    SLOW_ECHO,
    TERMINAL,
    Api,
    Receiver,
    Round,
    batch_file,
    check,
    deployment,
    fill,
)
from tests.deployment import wait_until

LINES = 200


def test_a_full_file_store_holds_the_batch_until_space_is_back(tmp_path: Path) -> None:
    receiver = Receiver()
    with deployment(tmp_path / "up", "echo", SLOW_ECHO, small_store=True) as up:
        try:
            assert up.proc is not None and up.small is not None
            inside = Path(f"/proc/{up.proc.pid}/root") / up.small.relative_to("/")
            api = Api(up)
            batch_id = api.create(LINES, "full", receiver.url)
            wait_until(lambda: (b := api.batch(batch_id)) and b["request_counts"]["completed"],
                       120, "the batch to start")
            sink = up.pid("sink")
            fill(inside / "filler")
            sink_log = up.data_dir / "logs" / "sink.log"
            # every line in, the files not writable: the sink waits (it does not crash)
            wait_until(lambda: "waiting for the broker, Redis or disk space" in
                       sink_log.read_text(errors="replace"), 120,
                       "the sink to wait for space to write the files")
            upload = api.call("POST", "/files", data={"purpose": "batch"},
                              files={"file": ("x.jsonl", batch_file(5, "x"))})
            assert upload is not None and upload.status_code == 503, upload
            assert upload.json()["error"]["type"] == "server_error"
            batch = api.batch(batch_id)
            assert batch is not None and batch["status"] not in TERMINAL, batch
            assert not (inside / "store" / final_key(batch_id, "output")).exists()
            (inside / "filler").unlink()  # space is back
            final = wait_until(lambda: (b := api.batch(batch_id)) is not None
                               and b["status"] in TERMINAL and b, 300, "the batch to end")
            result = Round(1, "disk-full", 0.0, LINES)
            check(result, final, api, "full")
            wait_until(lambda: receiver.delivered(batch_id), 60, "the webhook")
            result.webhooks = receiver.delivered(batch_id)
            assert result.ok, result  # every line once, each whole (each parsed)
            assert up.pid("sink") == sink, "the sink restarted instead of waiting"
        finally:
            receiver.close()
