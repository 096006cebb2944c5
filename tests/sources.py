"""The project's own source, parsed with `ast` in a fresh interpreter.

At the end of a 32-minute test session, `ast.parse` in the test process itself once failed
with CPython 3.11.7's `SystemError: AST constructor recursion depth mismatch` on a plain
module: an error inside the AST converter, reported by that check instead of itself (the
state that caused it, left by some earlier test, was not pinned down). A child process
parses from a clean state and hands the trees back pickled.
"""

from __future__ import annotations

import ast
import pickle
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_PARSE = """
import ast, pickle, sys
paths = sys.stdin.read().split("\\n")
sys.stdout.buffer.write(pickle.dumps({p: ast.parse(open(p).read(), p) for p in paths if p}))
"""


def parsed(paths: list[Path]) -> dict[Path, ast.Module]:
    """Each file's tree."""
    listed = "\n".join(map(str, paths)).encode()
    out = subprocess.run([sys.executable, "-c", _PARSE], input=listed, capture_output=True,
                         check=True, timeout=120).stdout
    trees: dict[str, ast.Module] = pickle.loads(out)  # our own child's output
    return {Path(p): tree for p, tree in trees.items()}


def python_files(*packages: str) -> list[Path]:
    """Every module of these top-level packages (or files), sorted."""
    found: list[Path] = []
    for package in packages:
        path = ROOT / package
        found += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return found
