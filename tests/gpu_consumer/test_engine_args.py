"""Engine arguments the vLLM way: millrace's defaults per build, the user's arguments after
them, everything read by vLLM's own parser; a bad one stops the worker with exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpu_consumer.engine_args import CPU_DEFAULTS, MEDIA_FETCHES_OFF, argv, parse
from millrace.errors import SettingsError
from millrace.settings import BUNDLED_CHAT_MODEL, BUNDLED_EMBEDDING_MODEL, Settings

FOLDER = "/models/m"


def test_the_gpu_build_gets_vllm_s_own_defaults() -> None:
    """No CPU-only choice: CUDA graphs stay on (no eager mode), dtype `auto`."""
    line = argv(Settings(), "m", FOLDER, cpu=False)
    assert not set(CPU_DEFAULTS) & set(line)
    args = parse(Settings(model="m=/models/m"), "m", FOLDER, cpu=False)
    assert (args.enforce_eager, args.dtype) == (False, "auto")
    assert (args.model, args.served_model_name) == (FOLDER, ["m"])
    assert args.enable_prompt_tokens_details  # every build: cached tokens are reported


def test_the_cpu_build_runs_eager_in_float32() -> None:
    args = parse(Settings(model="m=/models/m"), "m", FOLDER, cpu=True)
    assert (args.enforce_eager, args.dtype) == (True, "float32")


def test_user_arguments_win_over_millrace_s_and_a_model_s_over_everyone_s() -> None:
    settings = Settings(
        model="m=/models/m,other=/models/o",
        vllm_args="--max-model-len 8192 --gpu-memory-utilization 0.85 --dtype bfloat16 "
                  "--no-enforce-eager",
        vllm_model_args={"m": "--max-model-len 1024 --tensor-parallel-size 2"})
    args = parse(settings, "m", FOLDER, cpu=True)
    assert (args.max_model_len, args.gpu_memory_utilization) == (1024, 0.85)
    assert (args.dtype, args.enforce_eager, args.tensor_parallel_size) == ("bfloat16", False, 2)
    other = parse(settings, "other", "/models/o", cpu=True)
    assert (other.max_model_len, other.tensor_parallel_size) == (8192, 1)


def test_the_bundled_chat_model_parses_tool_calls() -> None:
    chat = parse(Settings(), BUNDLED_CHAT_MODEL, FOLDER, cpu=True)
    assert (chat.tool_call_parser, chat.enable_auto_tool_choice) == ("hermes", True)
    embed = parse(Settings(), BUNDLED_EMBEDDING_MODEL, FOLDER, cpu=True)
    assert embed.tool_call_parser is None


@pytest.mark.parametrize(("vllm_args", "message"), [
    ("--max-model-len abc", "argument --max-model-len: invalid"),
    ("--bogus 1", "unrecognized arguments: --bogus"),
    ("--dtype int3", "argument --dtype: invalid choice: 'int3'"),
    ("--model /elsewhere", "--model is set by MILLRACE_MODEL"),
    ("--served-model-name other", "--served-model-name is set by MILLRACE_MODEL"),
    ("--enable-auto-tool-choice", "--enable-auto-tool-choice requires --tool-call-parser"),
    ("--max-model-len '8k", "MILLRACE_VLLM_ARGS: No closing quotation"),
])
def test_a_bad_argument_is_vllm_s_message_in_one_line(vllm_args: str, message: str) -> None:
    with pytest.raises(SettingsError) as refused:
        parse(Settings(model="m=/models/m", vllm_args=vllm_args), "m", FOLDER, cpu=True)
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_model_arguments_must_name_a_served_model() -> None:
    with pytest.raises(SettingsError, match="MILLRACE_VLLM_MODEL_ARGS names 'gpt-5'"):
        Settings.load(vllm_model_args={"gpt-5": "--max-model-len 1024"})


@pytest.mark.parametrize(("variable", "value", "message"), [
    ("MILLRACE_VLLM_ARGS", "--max-model-len abc", "invalid human_readable_int_or_auto value"),
    # refused only when vLLM builds the model's config: before any engine starts
    ("MILLRACE_VLLM_MODEL_ARGS", '{"smollm2-135m-instruct": "--max-model-len 99999"}',
     "User-specified max_model_len (99999) is greater than the derived max_model_len"),
])
def test_a_worker_given_a_bad_argument_exits_2_with_vllm_s_message(
    tmp_path: Path, variable: str, value: str, message: str
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MILLRACE_")}
    done = subprocess.run(
        [sys.executable, "-m", "ops", "worker", "--data-dir", str(tmp_path)],
        env={**env, variable: value, "MILLRACE_KAFKA__BOOTSTRAP": "127.0.0.1:9"},
        capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("millrace: vLLM arguments of smollm2-135m-instruct: ")
    assert message in last
    assert "Traceback" not in done.stderr


def test_media_urls_in_lines_are_not_fetched_unless_their_domains_are_listed() -> None:
    """vLLM fetches an `image_url` from any host, internal ones too: millrace lists no
    domain that resolves, so a worker fetches nothing a line names (vLLM's own check, before
    any connection) until the operator lists the domains it may fetch from."""
    from vllm.multimodal.media.connector import MediaConnector
    from vllm.multimodal.media.image import ImageMediaIO

    from tests.website import serving

    args = parse(Settings(model="m=/models/m"), "m", FOLDER, cpu=True)
    assert args.allowed_media_domains == [MEDIA_FETCHES_OFF]
    with serving({"/cat.png": b"not really a png"}, content_type="image/png") as site:
        connector = MediaConnector(allowed_media_domains=args.allowed_media_domains)
        with pytest.raises(ValueError, match="must be from one of the allowed domains"):
            connector.load_from_url(f"{site.url}/cat.png", ImageMediaIO())
        assert site.hits == {}
    listed = parse(Settings(model="m=/models/m",
                            vllm_args="--allowed-media-domains cdn.example.com"),
                   "m", FOLDER, cpu=True)
    assert listed.allowed_media_domains == ["cdn.example.com"]
