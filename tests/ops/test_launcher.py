"""`millrace up`: supervision, side-by-side deployments, clean shutdown."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

from openai import OpenAI

from tests.batch_flow import read_lines, run_batch
from tests.conftest import chat_line, write_jsonl
from tests.deployment import Deployment, start, wait_until


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_children_show_as_millrace_services(deployment: Deployment) -> None:
    titles = []
    for pid in deployment.child_pids():
        titles.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode())
    for service in ("broker", "redis", "worker", "aggregator", "sink", "gateway"):
        assert any(t.startswith(f"millrace {service}") for t in titles), (service, titles)
    assert sum(t.startswith("millrace gateway") for t in titles) == 2  # MILLRACE_GATEWAYS


def test_a_killed_service_is_restarted_and_the_pipeline_recovers(
    deployment: Deployment, client: OpenAI, model: str, tmp_path: Path
) -> None:
    info = deployment.ready_info("sink")
    assert info is not None
    old_pid = int(info["pid"])  # type: ignore[call-overload]
    os.kill(old_pid, signal.SIGKILL)

    def restarted() -> int | None:
        now = deployment.ready_info("sink")
        pid = int(now["pid"]) if now else None  # type: ignore[call-overload]
        return pid if pid and pid != old_pid and alive(pid) else None

    wait_until(restarted, 60, "the sink to be restarted")
    assert any("sink exited with code -9; restarting" in line
               for line in deployment.stderr_lines)
    batch, _ = run_batch(client, write_jsonl(tmp_path / "in.jsonl", [
        chat_line("after-restart", model, "Say ok.", max_tokens=4)]))
    assert batch.status == "completed"
    assert [line.custom_id for line in read_lines(client, batch.output_file_id)] == [
        "after-restart"]


def test_two_deployments_run_side_by_side_and_stop_cleanly(
    deployment: Deployment, tmp_path: Path
) -> None:
    second = start(tmp_path / "second", engine="echo", timeout=120)
    try:
        assert second.base_url != deployment.base_url
        assert second.endpoints["kafka_bootstrap"] != deployment.endpoints["kafka_bootstrap"]
        assert second.endpoints["redis_url"] != deployment.endpoints["redis_url"]
        client = OpenAI(base_url=second.base_url, api_key=second.api_key, max_retries=0)
        lines = [chat_line(f"e{i}", "smollm2-135m-instruct", f"echo {i}") for i in range(3)]
        batch, _ = run_batch(client, write_jsonl(tmp_path / "in.jsonl", lines), timeout=60)
        assert batch.status == "completed"
        echoed = {x.custom_id: x.response.body["choices"][0]["message"]["content"]
                  for x in read_lines(client, batch.output_file_id) if x.response}
        assert echoed == {"e0": "echo 0", "e1": "echo 1", "e2": "echo 2"}
        children = second.child_pids()
        assert len(children) == 7  # broker, redis, worker, aggregator, sink, two gateways
    finally:
        code = second.stop(signal.SIGINT)
    assert code == 0
    assert not [line for line in second.stderr_lines if "killing" in line]
    assert [pid for pid in children if alive(pid)] == []
    port = int(second.base_url.rsplit(":", 1)[1].split("/")[0])
    with socket.socket() as s:  # nothing listens on the gateway's port any more
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_up_refuses_a_port_in_use(tmp_path: Path) -> None:
    import subprocess
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "ops", "up", "--engine", "echo", "--port", str(port),
             "--data-dir", str(tmp_path)], capture_output=True, text=True, timeout=60,
        )
    assert result.returncode == 1
    assert f"127.0.0.1:{port} is in use" in result.stderr
    assert result.stdout == ""


def test_a_deployment_on_an_s3_file_store(s3_url: str, tmp_path: Path) -> None:
    """Gateway uploads and sink-sealed output live in S3; the SDK cannot tell."""
    dep = start(tmp_path / "s3", engine="echo", timeout=120,
                extra_env={"MILLRACE_FILE_STORE_URL": s3_url})
    try:
        client = OpenAI(base_url=dep.base_url, api_key=dep.api_key, max_retries=0)
        lines = [chat_line(f"s{i}", "smollm2-135m-instruct", f"in s3 {i}") for i in range(3)]
        batch, _ = run_batch(client, write_jsonl(tmp_path / "in.jsonl", lines), timeout=60)
        assert batch.status == "completed"
        assert sorted(x.custom_id for x in read_lines(client, batch.output_file_id)) == [
            "s0", "s1", "s2"]
        assert not (dep.data_dir / "files").exists()  # nothing fell back to local disk
    finally:
        assert dep.stop() == 0
