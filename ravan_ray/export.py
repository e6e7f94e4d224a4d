"""``ravan-ray export RUN_DIR [--round N] --format peft|merged --output DIR``: a run's global model, usable outside
the platform.

The global model is rebuilt exactly as the parameter server evaluates it (:class:`ravan_ray.training.ModelHost`
loaded with a checkpoint's global state), from the run's ``config.yaml`` and ``checkpoints/round_N``; no data is
read and no Ray is started. Two formats:

- ``peft``: a PEFT LoRA directory (``adapter_config.json``, ``adapter_model.safetensors``) that
  ``peft.PeftModel.from_pretrained(base, DIR)`` loads on the pretrained model, with the task head (a new
  classifier) under ``modules_to_save``. Every LoRA-family layer is a LoRA: a plain LoRA layer's (B, A, alpha / r)
  as it is, Ravan's sum_i s_i B_i H_i A_i as one LoRA of rank h r with B' = [s_1 B_1 H_1 ... s_h B_h H_h] and
  A' = [A_1; ...; A_h] (scale 1), Fed-SB's s B R A as B' = B R, A' = A; each method says so through
  ``FederatedMethod.export_lora``. Layers of different ranks go into PEFT's ``rank_pattern`` / ``alpha_pattern``
  (lora_alpha = scale x rank, so PEFT's alpha / r is the layer's scale). Methods whose global model changes the
  layers' own weights W (FedEx-LoRA's residual, FLoRA's and FlexLoRA's merged updates, full fine-tuning) are not a
  LoRA of the pretrained model: ``--format peft`` refuses them in one line naming the reason (their
  ``merged_export_only``), and ``--format merged`` exports them. Folding such a change into a LoRA would need a
  rank up to min(d_in, d_out), no adapter any more. As a guard beyond what methods declare, the export compares
  every weight of the global model outside its adapters and task head with the pretrained model's and refuses
  when one differs.
  FedSA-LoRA, whose B's stay on the clients, exports the global model the platform evaluates (the mean of the
  round's clients' B's).
  ``base_model_name_or_path`` names the pretrained model: its hub id or local path; a model the platform built
  from a config directory (no weights, seeded initialisation) is written to ``DIR/base`` and named by that
  absolute path, so the adapter has a base to load.
- ``merged``: the model with every update merged into its weights (W + delta in float64, stored as float32: in
  bfloat16 the merge would round most of a small update away), ``save_pretrained`` with its tokenizer or image
  processor, loadable with the task's ``AutoModelFor...``.

Both write ``DIR/ravan_export.json``: the run, round, method, task, the ``AutoModelFor...`` class and the config
settings the task model needs (``num_labels``, ``pad_token_id``), i.e. how to load the export.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ravan_ray.checkpoints import CheckpointError, checkpoint_at, latest_checkpoint, load_checkpoint
from ravan_ray.config import RESOLVED_KEY, ConfigError, load_config, read_yaml
from ravan_ray.logs import quiet_transformers
from ravan_ray.models import builds_from_config, model_source
from ravan_ray.training import ModelHost

FORMATS = ("peft", "merged")
EXPORT_INFO = "ravan_export.json"
BASE_DIR = "base"  # where a config-built pretrained model is written beside its adapter


class ExportError(ValueError):
    """A run that cannot be exported in the asked format, phrased as one line."""


def global_model(run_dir: str | Path, round_index: Optional[int] = None) -> tuple[ModelHost, int]:
    """(the host holding the run's global model after round ``round_index``, that round; the last checkpoint's
    round when None), loaded as the server evaluates it, in eval mode."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"{run_dir} is not a run directory (no config.yaml)")
    config = load_config(run_dir / "config.yaml")
    task_info = (read_yaml(run_dir / "config.yaml").get(RESOLVED_KEY) or {}).get("task")
    if task_info is None:
        raise CheckpointError(f"{run_dir}/config.yaml has no {RESOLVED_KEY}.task section (what the run's data told "
                              f"the model, e.g. its classes); was it written by 'ravan-ray run'?")
    checkpoint = latest_checkpoint(run_dir) if round_index is None else checkpoint_at(run_dir, round_index)
    if checkpoint is None:
        raise CheckpointError(f"{run_dir} has no checkpoint yet (no round finished)")
    state, _, meta = load_checkpoint(checkpoint)
    host = ModelHost(config, task_info)
    host.load(state)
    host.model.eval()
    return host, int(meta["round"])


def export_run(run_dir: str | Path, output: str | Path, fmt: str, round_index: Optional[int] = None) -> Path:
    """Export the run's global model (after round ``round_index``, default the last checkpoint's) to ``output``."""
    if fmt not in FORMATS:
        raise ConfigError(f"export format {fmt!r} is unknown; choose one of: {', '.join(FORMATS)}")
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ConfigError(f"--output {output} exists and is not an empty directory")
    with quiet_transformers():  # load reports, "Writing model shards" bars, deprecations raised inside peft
        host, played = global_model(run_dir, round_index)
        if fmt == "peft":
            refuse_non_lora(host)  # before anything is written
        # Written under a temporary name and renamed into place (as checkpoints are): a failure or a kill leaves
        # no half export at --output.
        staging = output.with_name(output.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            info = export_peft(host, staging, output) if fmt == "peft" else export_merged(host, staging)
            task = host.task
            info = {"format": fmt, "run_dir": str(Path(run_dir).resolve()), "round": played,
                    "method": host.method.name, "task": task.name, "auto_class": task.auto_class,
                    "model_config": _jsonable(task.model_overrides()), **info}
            (staging / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
            if output.is_dir():
                output.rmdir()  # empty (checked above)
            os.replace(staging, output)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return output


# ------------------------------------------------------------------------------------------------------- merged
def export_merged(host: ModelHost, output: Path) -> dict[str, Any]:
    """Replace every adapter by a plain nn.Linear holding W + its update and save the model with its
    preprocessor. (The host's model is consumed: its adapters are gone afterwards.)"""
    model = host.model
    for name, layer in host.adapted.items():
        if hasattr(layer, "delta_weight"):  # an adapter; full fine-tuning's layers are plain nn.Linear already
            _replace(model, name, merged_linear(layer))
    model.float()
    model.save_pretrained(output)
    host.task.preprocessor().save_pretrained(output)
    return {"dtype": "float32", "merged_layers": sorted(host.adapted)}


@torch.no_grad()
def merged_linear(layer: nn.Module) -> nn.Linear:
    base = layer.base
    linear = nn.Linear(layer.d_in, layer.d_out, bias=base.bias is not None, device=base.weight.device,
                       dtype=torch.float32)
    linear.weight.copy_(base.weight.double() + layer.delta_weight().double())
    if base.bias is not None:
        linear.bias.copy_(base.bias)
    return linear


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


# --------------------------------------------------------------------------------------------------------- peft
def refuse_non_lora(host: ModelHost) -> None:
    """One line, before anything is written, when the method's global model is not a LoRA of the pretrained one."""
    method = host.method
    if method.merged_export_only is not None:
        raise ExportError(f"{method.name}'s global model is not a LoRA of the pretrained model "
                          f"({method.merged_export_only}); export it with --format merged")


def export_peft(host: ModelHost, output: Path, final: Path) -> dict[str, Any]:
    """The global model as a PEFT LoRA on a fresh pretrained model, saved with peft's own ``save_pretrained`` in
    ``output``, which will be renamed to ``final`` (what a config-built base is named by)."""
    from peft import LoraConfig, get_peft_model

    refuse_non_lora(host)
    method = host.method
    factors = {}
    for name, layer in host.adapted.items():
        lora = method.export_lora(layer)
        if lora is None:
            raise ExportError(f"{method.name}: layer {name} has no LoRA form; export it with --format merged")
        B, A, scale = lora
        factors[name] = (B.detach().cpu(), A.detach().cpu(), float(scale))

    pretrained = host.task.load_model()  # the very model every process of the run started from (seeded head)
    head_params = list(pretrained.head_parameters)
    check_only_adapters_changed(host, pretrained.model, head_params)

    ranks = {name: int(A.shape[0]) for name, (_, A, _) in factors.items()}
    alphas = {name: scale * ranks[name] for name, (_, _, scale) in factors.items()}
    rank, alpha = _most_common(ranks), _most_common(alphas)
    head_modules = sorted({param.rpartition(".")[0] for param in head_params})
    lora_config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none", target_modules=sorted(factors),
        # whole names, escaped: PEFT (>= 0.15) matches pattern keys as regular expressions against the end of a
        # module's name, from a dot or its start
        rank_pattern={re.escape(n): r for n, r in ranks.items() if r != rank},
        alpha_pattern={re.escape(n): a for n, a in alphas.items() if a != alpha},
        modules_to_save=head_modules or None)
    base_name = pretrained_name(host)
    if base_name is None:  # built from a config: the adapter needs this very base beside it (saved before wrapping)
        pretrained.model.save_pretrained(output / BASE_DIR)
        host.task.preprocessor().save_pretrained(output / BASE_DIR)
        base_name = str((final / BASE_DIR).resolve())
    peft_model = get_peft_model(pretrained.model, lora_config)
    inner = peft_model.base_model.model
    with torch.no_grad():
        for name, (B, A, _) in factors.items():
            layer = inner.get_submodule(name)
            layer.lora_A["default"].weight.copy_(A)
            layer.lora_B["default"].weight.copy_(B)
        global_params = dict(host.model.named_parameters())
        for param in head_params:
            module_name, _, attr = param.rpartition(".")
            wrapper = inner.get_submodule(module_name)
            getattr(wrapper.modules_to_save["default"], attr).copy_(global_params[param])
    peft_model.peft_config["default"].base_model_name_or_path = base_name
    peft_model.save_pretrained(output)
    host.task.preprocessor().save_pretrained(output)
    return {"base_model": base_name, "base_dtype": host.config.model.dtype or "float32",
            "target_modules": sorted(factors), "rank": ranks, "lora_alpha": alphas, "modules_to_save": head_modules}


def pretrained_name(host: ModelHost) -> Optional[str]:
    """What ``from_pretrained`` loads the run's pretrained model from (a hub id or an absolute local path); None
    for a model built from a config, which has no weights to load."""
    name = host.config.model.name
    if builds_from_config(name):
        return None
    source = model_source(name)
    return str(Path(source).resolve()) if Path(source).exists() else source


def check_only_adapters_changed(host: ModelHost, pretrained: nn.Module, head_params: list[str]) -> None:
    """Every weight of the global model outside its adapters and task head equals the pretrained model's, so that
    pretrained + LoRA + head is the global model exactly; one line naming the first that differs otherwise."""
    adapted = host.adapted
    global_state = host.model.state_dict()
    changed = []
    for key, value in pretrained.state_dict().items():
        if key in head_params:
            continue
        module_name, _, attr = key.rpartition(".")
        global_key = f"{module_name}.base.{attr}" if module_name in adapted and hasattr(adapted[module_name], "base") \
            else key
        mine = global_state.get(global_key)
        if mine is None or not torch.equal(mine.detach().cpu().double(), value.detach().cpu().double()):
            changed.append(key)
    if changed:
        raise ExportError(f"{host.method.name}'s global model changed {len(changed)} weight(s) outside its adapters "
                          f"(e.g. {changed[0]}), so it is not a LoRA of the pretrained model; export it with "
                          f"--format merged")


def _most_common(values: dict[str, Any]) -> Any:
    return Counter(values.values()).most_common(1)[0][0]


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(values, default=str))
