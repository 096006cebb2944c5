"""Priority and deadlines, end to end on an echo deployment whose worker admits four lines at
a time (each engine step 20 ms): a batch of higher priority, or of an earlier deadline,
created after a large one is served first, while the large one keeps a minimum share; a
key may ask for a priority above 0 only as far as an admin allows. Read from the lines' own
engine start times, so it holds on any machine."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from millrace.client import iter_results
from millrace.records import ResponseRecord
from millrace.settings import Settings
from tests.batch_flow import wait_done
from tests.conftest import chat_line, write_jsonl
from tests.deployment import Deployment, start, wait_until

IN_FLIGHT = 4
SHARE_EVERY = 4  # MILLRACE_WORKER_MIN_SHARE 0.25
MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def queue(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    dep = start(tmp_path_factory.mktemp("priority"), engine="echo", timeout=180, extra_env={
        "MILLRACE_WORKER_MAX_IN_FLIGHT": str(IN_FLIGHT), "MILLRACE_ECHO_STEP_MS": "20",
        "MILLRACE_WORKER_MIN_SHARE": str(1 / SHARE_EVERY)})
    yield dep
    assert dep.stop() == 0, "".join(dep.stderr_lines[-50:])


def submit(client: OpenAI, path: Path, tag: str, lines: int, **params: object) -> str:
    write_jsonl(path, [chat_line(f"{tag}{i}", MODEL, "Say hi.", max_tokens=4)
                       for i in range(lines)])
    with path.open("rb") as f:
        uploaded = client.files.create(file=f, purpose="batch")
    window = str(params.pop("completion_window", "24h"))
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window=window,  # type: ignore[arg-type]
                                  extra_body=params)
    wait_until(lambda: client.batches.retrieve(batch.id).status == "in_progress", 60,
               f"{tag}'s lines to be enqueued")
    return batch.id


def starts(dep: Deployment, batch_id: str, lines: int) -> list[float]:
    """When each line of the batch entered the engine, in order."""
    found: list[ResponseRecord] = list(iter_results(
        str(dep.endpoints["kafka_bootstrap"]), batch_id, expected=lines, timeout=60,
        topic_prefix=str(dep.endpoints["topic_prefix"])))
    assert len(found) == lines
    return sorted(r.finished_at - (r.engine_ms or 0) / 1000 for r in found)


def test_a_later_batch_of_higher_priority_is_served_first_and_the_first_keeps_a_share(
        queue: Deployment, tmp_path: Path) -> None:
    client = queue.sdk()
    with queue.frozen("worker"):
        big = submit(client, tmp_path / "big.jsonl", "big", 400, priority=-1)
        urgent = submit(client, tmp_path / "urgent.jsonl", "urgent", 40)
    for batch_id in (big, urgent):
        assert wait_done(client, batch_id, 300).status == "completed"
    big_starts, urgent_starts = starts(queue, big, 400), starts(queue, urgent, 40)
    first, last = urgent_starts[0], urgent_starts[-1]
    # first in first out would start the 400 big lines first: here at most the first
    # wave, read before the urgent lines were, and the big batch's share
    before = sum(1 for t in big_starts if t < first)
    assert before <= 2 * IN_FLIGHT, before
    # meanwhile the big batch still moves, by its share only: one pick in SHARE_EVERY
    # goes round the two batches (taking turns, the big one would start ~40 here)
    during = sum(1 for t in big_starts if first <= t <= last)
    assert 40 // (2 * SHARE_EVERY) - 1 <= during <= 40 // SHARE_EVERY + IN_FLIGHT, during
    assert big_starts[-1] > last  # and the rest of it after


def test_of_equal_priority_the_earlier_deadline_is_served_first(queue: Deployment,
                                                               tmp_path: Path) -> None:
    client = queue.sdk()
    with queue.frozen("worker"):
        day = submit(client, tmp_path / "day.jsonl", "day", 400)
        hour = submit(client, tmp_path / "hour.jsonl", "hour", 40, completion_window="2h")
    for batch_id in (day, hour):
        assert wait_done(client, batch_id, 300).status == "completed"
    day_starts, hour_starts = starts(queue, day, 400), starts(queue, hour, 40)
    # the first wave and the day batch's share (taking turns, ~40 would start first)
    ahead = sum(1 for t in day_starts if t < hour_starts[-1])
    assert ahead <= 2 * IN_FLIGHT + 40 // SHARE_EVERY, ahead
    assert day_starts[-1] > hour_starts[-1]


def test_a_background_batch_waits_for_every_other_batch_and_expires_late(
        queue: Deployment, tmp_path: Path) -> None:
    """`completion_window: background`: no minimum share — its lines start only once the
    lines of every other batch (of the lowest priority too) have; its window is the
    background horizon."""
    client = queue.sdk()
    with queue.frozen("worker"):
        spare = submit(client, tmp_path / "spare.jsonl", "spare", 40,
                       completion_window="background")
        low = submit(client, tmp_path / "low.jsonl", "low", 200, priority=-1000)
    for batch_id in (spare, low):
        assert wait_done(client, batch_id, 300).status == "completed"
    spare_starts, low_starts = starts(queue, spare, 40), starts(queue, low, 200)
    # what the worker had read before the low batch's lines were: its first wave at most
    early = sum(1 for t in spare_starts if t < low_starts[-1])
    assert early <= 2 * IN_FLIGHT, early
    batch = client.batches.retrieve(spare)
    assert batch.completion_window == "background"
    assert batch.expires_at == batch.created_at + Settings().background_horizon_s


def test_priority_above_0_needs_an_admin_s_grant(queue: Deployment, tmp_path: Path) -> None:
    client = queue.sdk()
    path = write_jsonl(tmp_path / "in.jsonl", [chat_line("a", MODEL, "Say hi.")])
    with path.open("rb") as f:
        file_id = client.files.create(file=f, purpose="batch").id
    body = {"input_file_id": file_id, "endpoint": "/v1/chat/completions",
            "completion_window": "24h"}
    headers = {"Authorization": f"Bearer {queue.api_key}"}
    with httpx.Client(base_url=queue.base_url.removesuffix("/v1"), headers=headers,
                      timeout=30) as http:
        refused = http.post("/v1/batches", json={**body, "priority": 3})
        assert refused.status_code == 403, refused.text
        assert refused.json()["error"]["code"] == "priority_not_allowed"
        assert refused.json()["error"]["param"] == "priority"
        too_far = http.post("/v1/batches", json={**body, "priority": 10**6})
        assert too_far.status_code == 400 and too_far.json()["error"]["param"] == "priority"
        lower = http.post("/v1/batches", json={**body, "priority": -2})  # any key may
        assert lower.status_code == 200 and lower.json()["priority"] == -2
        minted = http.post("/admin/api-keys", json={"project": "p", "max_priority": 5,
                                                    "default_priority": 2})
        assert minted.status_code == 200 and minted.json()["max_priority"] == 5
        above = http.patch(f"/admin/api-keys/{minted.json()['id']}",
                           json={"default_priority": 6})
        assert above.status_code == 400 and above.json()["error"]["param"] == "default_priority"
        unset = http.post("/v1/batches", json=body)  # no priority given: the key's default
        assert unset.status_code == 200 and unset.json()["priority"] == 0
    granted = queue.sdk(minted.json()["key"])
    with path.open("rb") as f:
        own_file = granted.files.create(file=f, purpose="batch").id
    batch = granted.batches.create(input_file_id=own_file, endpoint="/v1/chat/completions",
                                   completion_window="24h", extra_body={"priority": 5})
    assert (batch.model_extra or {})["priority"] == 5
    again = granted.batches.retrieve(batch.id)
    assert (again.model_extra or {})["priority"] == 5
    defaulted = granted.batches.create(input_file_id=own_file, endpoint="/v1/chat/completions",
                                       completion_window="24h")
    assert (defaulted.model_extra or {})["priority"] == 2
