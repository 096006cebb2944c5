"""The checks every surface's create goes through (`gateway/intake.py`), on their own."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from gateway.intake import MIN_PRIORITY, CreateBatch, clean_filename, window_seconds
from millrace.errors import InvalidRequestError
from millrace.settings import Settings

DAY = Settings()


@pytest.mark.parametrize(("window", "seconds"), [
    ("24h", 24 * 3600), ("1h", 3600), ("30m", 1800), ("90s", 90), ("1s", 1),
    ("1440m", 86_400), ("86400s", 86_400), ("background", DAY.background_horizon_s),
])
def test_windows_up_to_a_day_and_background(window: str, seconds: int) -> None:
    assert window_seconds(window, DAY) == seconds


@pytest.mark.parametrize("window", ["25h", "86401s", "0s", "0h", "01h", "1d", "h", "", "1 h",
                                    "-1h", "1.5h", "24H", "9999999s", "Background"])
def test_any_other_window_is_refused_naming_the_parameter(window: str) -> None:
    with pytest.raises(InvalidRequestError) as refused:
        window_seconds(window, DAY)
    assert refused.value.param == "completion_window"
    assert "at most 24h" in refused.value.message


def test_the_longest_window_is_configured() -> None:
    week = Settings(max_completion_window_s=7 * 86_400, background_horizon_s=30 * 86_400)
    assert window_seconds("168h", week) == 7 * 86_400
    assert window_seconds("background", week) == 30 * 86_400
    with pytest.raises(InvalidRequestError) as refused:
        window_seconds("169h", week)
    assert "at most 168h" in refused.value.message


def test_a_background_batch_queues_below_every_priority() -> None:
    params = CreateBatch(endpoint="/v1/chat/completions", completion_window="background",
                         priority=MIN_PRIORITY)
    assert params.queue_priority < MIN_PRIORITY
    assert CreateBatch(endpoint="/v1/chat/completions", completion_window="1h",
                       priority=7).queue_priority == 7


@pytest.mark.parametrize(("given", "kept"), [
    ("batch.jsonl", "batch.jsonl"),
    ("  spaced.jsonl  ", "spaced.jsonl"),
    ("a\x00b\nc\u202ed.jsonl", "abcd.jsonl"),  # control and format characters dropped
    ("", "upload.jsonl"), (None, "upload.jsonl"), ("\x07", "upload.jsonl"),
    ("n" * 300, "n" * 255),
])
def test_filenames_are_kept_as_given_without_control_characters(given: str | None,
                                                                kept: str) -> None:
    assert clean_filename(given) == kept


def test_the_webhook_field_wins_over_metadata() -> None:
    both = CreateBatch(endpoint="/v1/chat/completions", completion_window="24h",
                       webhook_url="https://a.example/hook",
                       metadata={"webhook_url": "https://b.example/hook"})
    assert both.webhook == ("https://a.example/hook", "webhook_url")
    only_metadata = both.model_copy(update={"webhook_url": None})
    assert only_metadata.webhook == ("https://b.example/hook", "metadata.webhook_url")
    assert both.model_copy(update={"webhook_url": None, "metadata": None}).webhook is None


@pytest.mark.parametrize("metadata", [
    {f"k{i}": "v" for i in range(17)}, {"k" * 65: "v"}, {"k": "v" * 513},
])
def test_metadata_over_openai_s_bounds_is_refused(metadata: dict[str, str]) -> None:
    with pytest.raises(ValidationError):
        CreateBatch(endpoint="/v1/chat/completions", completion_window="24h",
                    metadata=metadata)


def test_unknown_fields_are_refused_not_dropped() -> None:
    with pytest.raises(ValidationError):
        CreateBatch.model_validate({"endpoint": "/v1/chat/completions",
                                    "completion_window": "24h", "urgency": 1})
