"""The exception tree the module's docstring draws: each API error's status, OpenAI type
and code, its envelope, and what counts as an outage or a full disk."""

from __future__ import annotations

import errno
import re

import pytest

from millrace import errors
from millrace.errors import (
    APIError,
    ServiceUnavailableError,
    disk_full,
)


def drawn() -> dict[str, tuple[int, str | None]]:
    """Class → (status, code) as the docstring's tree draws it."""
    found = {}
    for name, status, code in re.findall(r"[├└]── (\w+Error)\s+(\d{3})(?: (\w+))?",
                                         errors.__doc__ or ""):
        found[name] = (int(status), code or None)
    return found


def test_every_api_error_is_in_the_tree_with_its_status_and_code() -> None:
    classes = {cls.__name__: cls for cls in APIError.__subclasses__()}
    tree = drawn()
    assert set(tree) == set(classes)
    for name, (status, code) in tree.items():
        cls = classes[name]
        assert cls.status_code == status, name
        if code is not None and code != "invalid_request_error":
            assert cls.code == code, name


def test_the_envelope_is_openai_s() -> None:
    error = errors.NotFoundError("No such File object: f", param="file_id")
    assert error.envelope().model_dump() == {"error": {
        "message": "No such File object: f", "type": "invalid_request_error",
        "param": "file_id", "code": "not_found"}}
    given = errors.InvalidRequestError("bad", param="x", code="invalid_value")
    assert given.envelope().error.code == "invalid_value"


def test_an_outage_asks_the_caller_to_come_back() -> None:
    away = ServiceUnavailableError("Redis is away")
    assert (away.status_code, away.code, away.headers) == (503, "service_unavailable",
                                                         {"retry-after": "2"})


@pytest.mark.parametrize(("exc", "full"), [
    (OSError(errno.ENOSPC, "No space left on device"), True),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), True),
    (OSError("IOError: write failed: No space left on device. Detail: [errno 28]"), True),
    (OSError(errno.ENOENT, "No such file or directory"), False),
    (ValueError("No space left on device"), False),
])
def test_a_full_disk_is_told_from_other_errors(exc: BaseException, full: bool) -> None:
    assert disk_full(exc) is full
