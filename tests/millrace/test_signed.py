"""Gateway-signed download URLs: a signature opens its own file until it expires, and
nothing else."""

from __future__ import annotations

import time
from urllib.parse import parse_qs, urlsplit

import pytest
from pydantic import SecretStr

from millrace import signed
from millrace.errors import InvalidRequestError, PermissionDeniedError
from millrace.settings import Settings

SETTINGS = Settings(webhook_signing_key=SecretStr("whsec_" + "a" * 32), signed_url_ttl_s=60)


def test_a_signed_url_opens_its_file_until_it_expires() -> None:
    url, expires = signed.sign(SETTINGS, "http://gw.example/", "file-1")
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    assert (parts.netloc, parts.path) == ("gw.example", "/signed/files/file-1")
    assert int(query["expires"][0]) == expires and expires - time.time() <= 60
    signed.check(SETTINGS, "file-1", expires, query["signature"][0])


@pytest.mark.parametrize("change", ["other file", "later expiry", "bad signature",
                                    "other key"])
def test_anything_else_is_refused(change: str) -> None:
    expires = int(time.time()) + 60
    signature = signed.signature(SETTINGS, "file-1", expires)
    file_id, when, settings = "file-1", expires, SETTINGS
    if change == "other file":
        file_id = "file-2"
    elif change == "later expiry":
        when = expires + 3600
    elif change == "bad signature":
        signature = signature[:-1] + ("0" if signature[-1] != "0" else "1")
    else:
        settings = SETTINGS.model_copy(
            update={"webhook_signing_key": SecretStr("whsec_" + "b" * 32)})
    with pytest.raises(PermissionDeniedError, match="not valid"):
        signed.check(settings, file_id, when, signature)


def test_an_expired_url_is_refused_even_with_its_own_signature() -> None:
    expires = int(time.time()) - 1
    with pytest.raises(PermissionDeniedError, match="expired"):
        signed.check(SETTINGS, "file-1", expires, signed.signature(SETTINGS, "file-1", expires))


def test_without_a_signing_key_nothing_is_signed() -> None:
    with pytest.raises(InvalidRequestError) as refused:
        signed.sign(Settings(webhook_signing_key=None), "http://gw.example", "file-1")
    assert refused.value.code == "signing_disabled"
