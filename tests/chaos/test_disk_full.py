"""Issue 25: the file store fills up mid-batch (a small tmpfs of its own, in a mount
namespace of the deployment's). The sink cannot write the batch's files: it waits, no
truncated file is ever published, the API answers uploads with a 503 in OpenAI's envelope
(never a 500); once space is back the batch completes with every line exactly once."""

from __future__ import annotations

import errno
from pathlib import Path

from millrace.results import final_key
from millrace.up.chaos import (
    SLOW_ECHO,
    TERMINAL,
    Api,
    Receiver,
    Round,
    Up,
    batch_file,
    check,
)
from millrace.up.embedded import free_port
from tests.deployment import wait_until

LINES = 200
MOUNT_MB = 16


def test_a_full_file_store_holds_the_batch_until_space_is_back(tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    receiver = Receiver()
    up = Up(tmp_path / "up", free_port(), "echo", {
        "MILLRACE_FILE_STORE_URL": str(small / "store"), **SLOW_ECHO},
        wrap=["unshare", "-m", "--propagation", "private", "sh", "-c",
              f'mount -t tmpfs -o size={MOUNT_MB}m tmpfs "{small}" && exec "$@"', "sh"])
    try:
        up.start()
        assert up.proc is not None
        inside = Path(f"/proc/{up.proc.pid}/root") / small.relative_to("/")
        api = Api(up)
        batch_id = api.create(LINES, "full", receiver.url)
        wait_until(lambda: (b := api.batch(batch_id)) and b["request_counts"]["completed"],
                   120, "the batch to start")
        sink = up.pid("sink")
        _fill(inside / "filler")
        sink_log = up.data_dir / "logs" / "sink.log"
        # every line in, the files not writable: the sink waits (it does not crash)
        wait_until(lambda: "waiting for the broker, Redis or disk space" in sink_log.read_text(
            errors="replace"), 120, "the sink to wait for space to write the files")
        upload = api.call("POST", "/files", files={"file": ("x.jsonl", batch_file(5, "x"))},
                          data={"purpose": "batch"})
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
        if up.proc is not None and up.proc.poll() is None:
            up.stop()


def _fill(path: Path) -> None:
    """Write until the file system refuses."""
    chunk = b"\0" * (1 << 20)
    with path.open("wb") as out:
        while True:
            try:
                out.write(chunk)
                out.flush()
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                return
