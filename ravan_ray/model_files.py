"""A local model directory for the cluster nodes that lack it.

``model.name`` may be a directory on the driver's machine (a fine-tuned checkpoint, a model built from a config).
On a cluster the actors load it on other machines, where that path may not exist. The driver then reads the
directory's files once and puts them in Ray's object store (as ``share_frozen_weights`` does with the weights);
an actor on a node without the directory, or with a different one at that path, writes them to a cache directory
of its node and loads from there. A node that has the same directory uses its own.

"The same" is judged by a fingerprint of every file's name and size and the contents of the small ones (configs,
tokenizers): hashing gigabytes of weights on every actor start would cost more than it protects against.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ravan_ray.smollm2 import cache_root

# Files up to this size enter the fingerprint with their contents.
SMALL_FILE_BYTES = 1 << 20


@dataclass
class ModelFiles:
    source: str  # the directory on the driver's machine, as model.name names it
    fingerprint: str
    files: dict[str, bytes]  # path relative to the directory -> contents


def _files_of(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file())


def fingerprint(directory: Path) -> str:
    digest = hashlib.sha256()
    for path in _files_of(directory):
        size = path.stat().st_size
        digest.update(f"{path.relative_to(directory).as_posix()}\0{size}\0".encode())
        if size <= SMALL_FILE_BYTES:
            digest.update(path.read_bytes())
    return digest.hexdigest()[:32]


def read_model_files(name: str) -> Optional[ModelFiles]:
    """The files of ``name`` when it is a local directory, else None (a hub id, or a built-in name)."""
    directory = Path(name).expanduser()
    if not directory.is_dir():
        return None
    files = {p.relative_to(directory).as_posix(): p.read_bytes() for p in _files_of(directory)}
    return ModelFiles(name, fingerprint(directory), files)


def model_here(name: str, shipped: Optional[ModelFiles]) -> str:
    """The path this process loads ``model.name`` from: the name itself where this machine has that directory (or
    nothing was shipped), else the shipped copy, written once per node into the cache (under a temporary name,
    renamed into place when complete, so processes starting together never read half a copy)."""
    if shipped is None:
        return name
    directory = Path(name).expanduser()
    if directory.is_dir() and fingerprint(directory) == shipped.fingerprint:
        return name
    target = cache_root() / "models" / shipped.fingerprint
    if not target.is_dir():
        partial = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}")
        for relative, contents in shipped.files.items():
            path = partial / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(contents)
        try:
            os.replace(partial, target)
        except OSError:  # another process of this node renamed its complete copy first
            shutil.rmtree(partial, ignore_errors=True)
    return str(target)


def with_model_here(config, shipped: Optional[ModelFiles]):
    """``config`` (a RunConfig) with ``model.name`` pointing where this process finds the model (:func:`model_here`)."""
    path = model_here(config.model.name, shipped)
    if path == config.model.name:
        return config
    return config.model_copy(update={"model": config.model.model_copy(update={"name": path})})
