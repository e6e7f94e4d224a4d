"""Checkpoints: safetensors for tensors, JSON for everything else, written atomically; no pickle.

Layout: ``DIR/checkpoints/round_NNNNN/{state.safetensors, client_states.safetensors, meta.json}``.
A checkpoint directory is written under a temporary name and renamed into place, so a crash leaves
either the previous checkpoint or the new one, never half of one. Only the latest ``keep`` are kept.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

CHECKPOINTS = "checkpoints"


class CheckpointError(ValueError):
    """A checkpoint that is missing or cannot be read, phrased as one line."""


def _dir_for(run_dir: Path, round_index: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"round_{round_index:05d}"


def save_checkpoint(run_dir: str | Path, round_index: int, state: dict[str, torch.Tensor],
                    client_states: dict[int, dict[str, torch.Tensor]], meta: dict[str, Any], keep: int = 2) -> Path:
    final = _dir_for(Path(run_dir), round_index)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "state.safetensors"))
    flat = {f"{cid}/{k}": v.contiguous() for cid, cs in client_states.items() for k, v in cs.items()}
    save_file(flat, str(tmp / "client_states.safetensors"))
    # numpy numbers among the metrics rows as the Python numbers they hold (NaN stays: an empty cell is one)
    (tmp / "meta.json").write_text(json.dumps({**meta, "round": round_index}, indent=2, default=lambda v: v.item()))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("round_") and not p.name.endswith(".tmp"))


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[int, dict[str, torch.Tensor]], dict[str, Any]]:
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
        state = load_file(str(path / "state.safetensors"))
        flat = load_file(str(path / "client_states.safetensors"))
    except Exception as error:  # OSError, JSONDecodeError, and safetensors' own error types alike
        raise CheckpointError(f"checkpoint {path} is corrupt or incomplete ({type(error).__name__})") from None
    client_states: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        cid, name = key.split("/", 1)
        client_states.setdefault(int(cid), {})[name] = value
    return state, client_states, meta


def checkpoint_at(run_dir: str | Path, round_index: int) -> Path:
    """Round ``round_index``'s checkpoint (``resume --from-round``); one line listing the rounds there are
    when it has none."""
    found = _dir_for(Path(run_dir), round_index)
    if not found.is_dir():
        rounds = [int(p.name.removeprefix("round_")) for p in list_checkpoints(run_dir)]
        raise CheckpointError(f"{run_dir} has no checkpoint of round {round_index}; checkpoints: "
                              f"{', '.join(map(str, rounds)) or 'none'}")
    return found


def discard_checkpoints_after(run_dir: str | Path, round_index: int) -> None:
    """A run resumed from an earlier checkpoint plays the later rounds again: their checkpoints go, so the
    last checkpoint is always the newest round played."""
    for path in list_checkpoints(run_dir):
        if int(path.name.removeprefix("round_")) > round_index:
            shutil.rmtree(path)


def latest_checkpoint(run_dir: str | Path) -> Optional[Path]:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None
