"""How every service process starts: its flags, its settings, its logs, its exit codes.

Each service's `main.py` hands `run` its name, its own flags and its body; `python -m
gateway` and `millrace gateway` end up here alike.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from setproctitle import setproctitle

from millrace import logs
from millrace.errors import MillraceError, SettingsError
from millrace.settings import Settings, service_links

# flags whose value overrides the setting of the same name
OVERRIDES = ("data_dir", "log_level", "port", "host", "engine", "model", "replicas")


def common_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags every process of the `millrace` command takes."""
    parser.add_argument("--data-dir", type=Path, help="MILLRACE_DATA_DIR")
    parser.add_argument("--log-level", help="MILLRACE_LOG_LEVEL")
    return parser


def settings_of(args: argparse.Namespace) -> Settings:
    """The settings, with what the command line gives over the environment."""
    overrides: dict[str, Any] = {}
    for flag in OVERRIDES:
        value = getattr(args, flag, None)
        if value is not None:
            overrides[flag] = value
    return Settings.load(**overrides)


def refuse(exc: SettingsError) -> NoReturn:
    """A bad setting: one line on stderr and exit code 2, as for a bad command line."""
    sys.stderr.write(f"millrace: {exc}\n")
    sys.exit(2)


def configure(args: argparse.Namespace) -> Settings:
    """Settings and logs of a process, refusing a bad setting; Kubernetes' service-link
    variables are named and ignored."""
    try:
        settings = settings_of(args)
    except SettingsError as exc:
        refuse(exc)
    logs.configure(settings)
    if links := service_links():
        logging.getLogger("millrace").warning(
            "ignoring %s: Kubernetes service links, not settings (set enableServiceLinks: "
            "false in the pod spec to drop them)", ", ".join(links))
    return settings


def finish(body: Callable[[], int | None]) -> NoReturn:
    """Run a process's body; its errors become exit codes and one log line."""
    try:
        sys.exit(body() or 0)
    except SettingsError as exc:
        refuse(exc)
    except MillraceError as exc:
        logging.getLogger("millrace").error("%s", exc)
        sys.exit(getattr(exc, "exit_code", 1))


def run(name: str, argv: Sequence[str] | None, description: str,
        flags: Callable[[argparse.ArgumentParser], object],
        body: Callable[[Settings], int | None]) -> NoReturn:
    """Start service `name`: parse its flags, load its settings, name the process
    `millrace <name> …`, run `body` until it returns or fails."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = common_flags(argparse.ArgumentParser(prog=f"millrace {name}", description=description))
    flags(parser)
    args = parser.parse_args(argv)
    setproctitle(" ".join(["millrace", name, *argv]))
    settings = configure(args)
    finish(lambda: body(settings))
