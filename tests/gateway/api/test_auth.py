"""API keys: 401 without a valid key, projects isolated, admin-only key minting."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

from tests.deployment import Deployment


def assert_envelope(response: httpx.Response, status: int, code: str | None = None) -> None:
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if code is not None:
        assert error["code"] == code


@pytest.mark.parametrize("headers", [
    {},
    {"Authorization": "Bearer sk-wrong"},
    {"x-api-key": "sk-wrong"},
    {"Authorization": "Basic abc"},
])
def test_requests_without_a_valid_key_get_401(http: httpx.Client, headers: dict[str, str]) -> None:
    for path in ("/v1/files", "/v1/batches", "/v1/models", "/v1/batches/batch_x"):
        assert_envelope(http.get(path, headers=headers), 401, "invalid_api_key")


def test_sdk_with_a_bad_key_raises_authentication_error(deployment: Deployment) -> None:
    bad = OpenAI(base_url=deployment.base_url, api_key="sk-not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.batches.list()


def test_x_api_key_header_is_accepted(http: httpx.Client, deployment: Deployment) -> None:
    response = http.get("/v1/models", headers={"x-api-key": deployment.api_key})
    assert response.status_code == 200


def test_minted_keys_see_only_their_project(
    http: httpx.Client, deployment: Deployment, client: OpenAI, tmp_path: Path
) -> None:
    admin = {"Authorization": f"Bearer {deployment.api_key}"}
    minted = http.post("/admin/api-keys", json={"project": "team-b"}, headers=admin)
    assert minted.status_code == 200
    key_b = minted.json()["key"]
    assert minted.json()["project"] == "team-b"

    path = tmp_path / "a.jsonl"
    path.write_text('{"x": 1}\n')
    file_a = client.files.create(file=(path.name, path.read_bytes()), purpose="batch")
    other = OpenAI(base_url=deployment.base_url, api_key=key_b, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        other.files.retrieve(file_a.id)
    assert file_a.id not in [f.id for f in other.files.list()]
    # a project key is not an admin key
    assert_envelope(http.post("/admin/api-keys", json={"project": "x"},
                              headers={"Authorization": f"Bearer {key_b}"}), 403)
    # keys are stored hashed: the raw key appears nowhere in Redis
    import redis

    r = redis.Redis.from_url(str(deployment.endpoints["redis_url"]))
    for k in r.scan_iter("*:key:*"):
        assert key_b.encode() not in k
        assert key_b.encode() not in b"".join(r.hvals(k))


def test_keys_create_cli_mints_a_working_key(deployment: Deployment, http: httpx.Client) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "ops", "keys", "create", "--project", "cli-team",
         "--data-dir", str(deployment.data_dir)],
        capture_output=True, text=True, check=True,
    ).stdout
    minted = json.loads(out)
    assert minted["project"] == "cli-team"
    listed = http.get("/v1/files", headers={"Authorization": f"Bearer {minted['key']}"})
    assert listed.status_code == 200 and listed.json()["data"] == []


def test_models_lists_served_names(client: OpenAI, model: str, embedding_model: str) -> None:
    assert [m.id for m in client.models.list()] == [model, embedding_model]
    assert client.models.retrieve(model).id == model
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_bad_uploads_get_400_envelopes(http: httpx.Client, deployment: Deployment) -> None:
    headers = {"Authorization": f"Bearer {deployment.api_key}"}
    no_file = http.post("/v1/files", data={"purpose": "batch"}, headers=headers)
    assert_envelope(no_file, 400)
    assert no_file.json()["error"]["param"] == "file"
    bad_purpose = http.post("/v1/files", data={"purpose": "nonsense"},
                            files={"file": ("a.jsonl", b"{}\n")}, headers=headers)
    assert_envelope(bad_purpose, 400, "invalid_value")
    not_multipart = http.post("/v1/files", content=b"raw", headers=headers)
    assert_envelope(not_multipart, 400)
    missing = http.get("/v1/files/file-nope/content", headers=headers)
    assert_envelope(missing, 404)
    unknown_route = http.get("/v1/nothing-here", headers=headers)
    assert_envelope(unknown_route, 404)
