"""Pre-signed download URLs: a file's content without an API key, for a short time.

On an `s3://` store the URL is S3's own (SigV4, `FileStore.presign`). On a local store the
gateway signs it: `/signed/files/<id>?expires=<unix s>&signature=<hex>`, an HMAC-SHA256 over
the file id and the expiry under a key derived from the webhook signing key (nothing new to
keep secret). A signature for one file opens no other; an expired one gets a 403.
"""

from __future__ import annotations

import hashlib
import hmac
import time

from millrace.errors import InvalidRequestError, PermissionDeniedError
from millrace.settings import Settings


def _key(settings: Settings) -> bytes:
    if settings.webhook_signing_key is None:
        raise InvalidRequestError(
            "Pre-signed URLs need MILLRACE_WEBHOOK_SIGNING_KEY on this deployment "
            "(`millrace up` makes one).", code="signing_disabled")
    secret = settings.webhook_signing_key.get_secret_value().encode()
    return hmac.new(secret, b"millrace signed download urls", hashlib.sha256).digest()


def signature(settings: Settings, file_id: str, expires: int) -> str:
    return hmac.new(_key(settings), f"{file_id}:{expires}".encode(), hashlib.sha256).hexdigest()


def sign(settings: Settings, base_url: str, file_id: str) -> tuple[str, int]:
    """(URL, expires_at) of a gateway-signed download of `file_id`."""
    expires = int(time.time()) + settings.signed_url_ttl_s
    url = (f"{base_url.rstrip('/')}/signed/files/{file_id}?expires={expires}"
           f"&signature={signature(settings, file_id, expires)}")
    return url, expires


def check(settings: Settings, file_id: str, expires: int, given: str) -> None:
    """Nothing, or a 403: a signature that is wrong, for another file, or past its time."""
    expected = signature(settings, file_id, expires).encode()
    if not hmac.compare_digest(expected, given.encode("utf-8", "replace")):
        raise PermissionDeniedError("This download URL's signature is not valid.")
    if expires < time.time():
        raise PermissionDeniedError("This download URL has expired; ask for a new one.")
