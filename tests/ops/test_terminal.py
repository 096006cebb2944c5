"""`millrace submit` and `millrace batches …` against the real deployment, run as a user runs
them: a subprocess that finds the gateway from the environment."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
from openai import OpenAI

from ops.terminal import prepare
from tests.batch_flow import wait_done
from tests.conftest import chat_line, write_jsonl
from tests.deployment import Deployment, wait_until


def cli(*args: str, env: dict[str, str], **kwargs: object) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "ops", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.PIPE, **kwargs)  # type: ignore[call-overload]


def run(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    proc = cli(*args, env=env)
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def environment(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The caller's environment without millrace's variables, and a data dir holding no
    deployment, so the gateway can only come from `extra`."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MILLRACE_", "OPENAI_"))}
    return {**env, "MILLRACE_DATA_DIR": str(tmp_path / "nowhere"), **extra}


def test_submit_wait_download_and_the_batch_commands(deployment: Deployment, model: str,
                                                     tmp_path: Path) -> None:
    env = environment(tmp_path, MILLRACE_BASE_URL=deployment.base_url,
                      MILLRACE_API_KEY=deployment.api_key)
    lines = [json.dumps({"custom_id": f"t{i}", "method": "POST", "url": "/v1/chat/completions",
                         "body": {"messages": [{"role": "user", "content": f"Say {i}."}],
                                  "max_tokens": 4}}) for i in range(4)]
    lines.append(chat_line("refused", model, "x", temperature=-1))
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out"

    # --model fills in the model; the endpoint comes from the lines
    code, stdout, stderr = run("submit", str(path), "--model", model, "--wait", "--out",
                               str(out), "--json", env=env)
    assert code == 3, stderr  # some lines failed
    final = json.loads(stdout.strip().splitlines()[-1])
    assert final["status"] == "completed" and final["endpoint"] == "/v1/chat/completions"
    assert final["request_counts"] == {"total": 5, "completed": 4, "failed": 1}
    output, errors = (out / f"{final['id']}_output.jsonl", out / f"{final['id']}_error.jsonl")
    assert sorted(final["downloaded"]) == sorted([str(output), str(errors)])
    assert sorted(json.loads(x)["custom_id"] for x in output.read_text().splitlines()) == [
        "t0", "t1", "t2", "t3"]
    assert [json.loads(x)["custom_id"] for x in errors.read_text().splitlines()] == [
        "refused"]

    code, stdout, _ = run("batches", "ls", "--json", env=env)
    assert code == 0 and final["id"] in [b["id"] for b in json.loads(stdout)]
    code, stdout, _ = run("batches", "ls", env=env)  # the table for people
    assert code == 0 and final["id"] in stdout
    code, stdout, _ = run("batches", "cancel", final["id"], env=env)
    assert code == 2  # a finished batch cannot be cancelled (409)

    code, stdout, _ = run("batches", "retry", final["id"], "--json", env=env)
    assert code == 0
    retry = json.loads(stdout)
    assert retry["metadata"] == {"retry_of": final["id"]}
    code, stdout, _ = run("batches", "watch", retry["id"], "--out", str(out), "--json", env=env)
    assert code == 3
    assert json.loads(stdout.strip().splitlines()[-1])["request_counts"]["total"] == 1

    # the OpenAI SDK's variables work as well
    sdk_env = environment(tmp_path, OPENAI_BASE_URL=deployment.base_url,
                          OPENAI_API_KEY=deployment.api_key)
    code, stdout, _ = run("batches", "show", final["id"], "--json", env=sdk_env)
    assert code == 0 and json.loads(stdout)["status"] == "completed"
    code, _, stderr = run("batches", "ls", env=environment(tmp_path))
    assert code == 2 and "MILLRACE_BASE_URL" in stderr


def test_ctrl_c_offers_to_cancel(deployment: Deployment, client: OpenAI, model: str,
                                 tmp_path: Path) -> None:
    """Lines that must generate 1,500 tokens each are still running at the Ctrl-C."""
    env = environment(tmp_path, MILLRACE_BASE_URL=deployment.base_url,
                      MILLRACE_API_KEY=deployment.api_key)
    path = write_jsonl(tmp_path / "in.jsonl", [
        chat_line(f"long{i}", model, "Tell a tale.", max_tokens=1500, min_tokens=1500)
        for i in range(3)])
    proc = cli("submit", str(path), "--wait", "--out", str(tmp_path), env=env)
    assert proc.stdout is not None and proc.stdin is not None
    created = proc.stdout.readline()
    assert created.startswith("created batch_"), created
    batch_id = created.split()[1]
    wait_until(lambda: client.batches.retrieve(batch_id).status == "in_progress", 60,
               "the batch to start")
    proc.send_signal(signal.SIGINT)
    proc.stdin.write("y\n")
    proc.stdin.flush()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, (out, err)  # cancelled
    assert wait_done(client, batch_id).status == "cancelled"
    assert "Cancel the batch?" in out


def test_csv_rows_through_a_promptloop_task(deployment: Deployment, tmp_path: Path) -> None:
    root = deployment.base_url.removesuffix("/v1")
    admin = {"Authorization": f"Bearer {deployment.api_key}"}
    key = httpx.post(f"{root}/admin/api-keys", json={"project": "csv-rows"}, headers=admin,
                     timeout=30).json()["key"]  # its own per-route budgets
    task = httpx.post(f"{root}/v0/tasks", headers={"x-api-key": key}, timeout=30, json={
        "name": "colour", "instructions": "Name the usual colour of the thing.",
        "inputs": [{"name": "thing", "type": "string"}, {"name": "place", "type": "string"}],
        "outputs": [{"name": "colour", "type": "string", "max_length": 20}],
        "max_tokens": 32}).json()
    csv_path = tmp_path / "rows.csv"
    csv_path.write_text("id,place,thing,unused\nr1,garden,grass,x\nr2,sky,cloud,y\n"
                        "r3,sea,water,z\n")
    env = environment(tmp_path, MILLRACE_BASE_URL=deployment.base_url, MILLRACE_API_KEY=key)
    code, _, stderr = run("submit", "--task", task["id"], "--csv", str(csv_path),
                          "--uuid-column", "nope", env=env)
    assert code == 2 and "no column nope" in stderr

    code, stdout, stderr = run("submit", "--task", task["id"], "--csv", str(csv_path),
                               "--uuid-column", "id", "--wait", "--out", str(tmp_path),
                               "--json", env=env)
    final = json.loads(stdout.strip().splitlines()[-1])
    counts = final["request_counts"]
    assert final["status"] == "completed" and counts["total"] == 3
    assert code == (3 if counts["failed"] else 0), stderr
    rows = httpx.get(f"{root}/v0/batch/{final['id']}/results", headers={"x-api-key": key},
                     timeout=30).json()
    assert sorted(r["data_uuid"] for r in rows) == ["r1", "r2", "r3"]
    # each row's inputs in the task's slot order, whatever the CSV's column order
    sent = httpx.get(f"{deployment.base_url}/files/{final['input_file_id']}/content",
                     headers={"x-api-key": key}, timeout=30).text
    assert sent.index("thing: grass") < sent.index("place: garden")


def test_the_model_is_set_and_bad_lines_are_left_to_the_gateway(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text('{"custom_id": "a", "method": "POST", "url": "/v1/embeddings", '
                    '"body": {"input": "x"}}\n\nnot json\n[1]\n')
    out = io.BytesIO()
    assert prepare(path, "m", out) == ("/v1/embeddings", 3)
    first, *rest = out.getvalue().decode().splitlines()
    assert json.loads(first)["body"] == {"input": "x", "model": "m"}
    assert rest == ["not json", "[1]"]
