"""Every service starts the same way, from its own `main.py`: `python -m <package>` and
`millrace <service>` parse the same flags, name the process `millrace <service>`, and
refuse a bad setting with one line and exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ops import SERVICES

CLEAN = {k: v for k, v in os.environ.items() if not k.startswith("MILLRACE_")}


@pytest.mark.parametrize(("command", "package"), sorted(SERVICES.items()))
def test_python_m_package_is_the_service(command: str, package: str) -> None:
    own = subprocess.run([sys.executable, "-m", package, "--help"], env=CLEAN,
                         capture_output=True, text=True, timeout=60, check=True).stdout
    via_cli = subprocess.run([sys.executable, "-m", "ops", command, "--help"], env=CLEAN,
                             capture_output=True, text=True, timeout=60, check=True).stdout
    assert own == via_cli
    assert own.startswith(f"usage: millrace {command} [-h] [--data-dir DATA_DIR]")


@pytest.mark.parametrize("package", sorted(SERVICES.values()))
def test_a_bad_setting_stops_a_service_with_one_line(package: str, tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", package, "--data-dir", str(tmp_path)],
                            env={**CLEAN, "MILLRACE_PORT": "eighty"}, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr == "millrace: MILLRACE_PORT: Input should be a valid integer, " \
                            "unable to parse string as an integer\n"
