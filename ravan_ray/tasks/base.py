"""The task protocol: the second seam, beside the method protocol. A task says what is learned; the
method says how it is federated; neither sees the other.

A task is a small class, one file per task (``ravan_ray/tasks/``), in the spirit of a PEFT task type or
a Flower ClientApp's train / evaluate. It says:

- how its data is loaded and prepared, once, in the driver (:meth:`Task.prepare`): tokenised or
  image-decoded into row-aligned numpy arrays that every client slices its own rows from, plus what
  the Dirichlet partition splits on;
- which model class and head it builds (:attr:`Task.auto_class`, :attr:`Task.new_head`, and
  :meth:`Task.model_overrides` for settings such as ``num_labels`` read off the data);
- how one batch becomes a loss (:meth:`Task.batch`, :meth:`Task.loss`);
- how the global model is evaluated, and which metrics that writes (:meth:`Task.evaluate`,
  :attr:`Task.metrics`);
- which keys of the ``data:`` section it reads beyond the shared ones (:attr:`Task.options_model`, an
  :class:`ravan_ray.config.Options` model in its file, read through ``self.options``).

The driver, the actors and :class:`ravan_ray.training.ModelHost` only call these hooks, so adding a task
is adding one file and one line in ``tasks/__init__.py``.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Sequence

import numpy as np
import torch
from torch import nn

from pydantic import Field

from ravan_ray.config import Options, RunConfig
from ravan_ray.data import DataError, Splits, encode_labels, is_class_id, load_splits
from ravan_ray.models import LoadedModel, check_model_fits, load_model, model_skeleton, torch_dtype

Arrays = dict[str, np.ndarray]


@dataclass
class TaskData:
    """What a task prepares once in the driver."""

    train: Arrays  # row-aligned arrays: a client trains on its rows of each
    test: dict[str, Any]  # what evaluate reads: row-aligned arrays, plus what the task keeps beside them
    # JSON-able facts every process needs to build the same model (num_labels, a pad token id, ...);
    # recorded in the run's config.yaml under resolved.task.
    info: dict[str, Any]
    # One class id per training *example* for the Dirichlet split, and the names of those ids;
    # None where the task has no labels and no data.partition.label_field was given (the split is then iid).
    partition_labels: Optional[np.ndarray] = None
    partition_names: list[str] = field(default_factory=list)
    # The example each training row comes from, where one example makes several rows (a long QA context
    # cut into windows): the partition then splits examples, so an example's rows stay with one client.
    train_examples: Optional[np.ndarray] = None
    # The validation split, prepared exactly as ``test`` is (evaluate reads it the same way); None without one.
    validation: Optional[dict[str, Any]] = None

    @property
    def num_examples(self) -> int:
        if self.train_examples is not None:
            return int(self.train_examples.max()) + 1 if len(self.train_examples) else 0
        return rows_in(self.train)


#: the training array holding, for a task whose example makes several rows (TaskData.train_examples), each row's
#: example: DP-SGD's privacy unit is the example, not the row (ravan_ray/privacy/dp_sgd.py)
EXAMPLE_KEY = "example_of_row"


def rows_in(arrays: Arrays) -> int:
    return len(next(iter(arrays.values())))


def mean_of_row_means(row_losses: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The mean over rows of each row's own mean loss (its loss sum over its own count, from
    :meth:`Task.row_losses`): each row's gradient depends on that row alone, as DP-SGD's clipping needs."""
    sums, counts = row_losses
    return (sums / counts.clamp_min(1)).mean()


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, (the cross-entropy summed over its target tokens, their number): labels of -100 do not count.
    transformers' token-mean loss of a batch is the sum of the first over the sum of the second."""
    per_token = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100,
                                                  reduction="none")
    return per_token.sum(1), (labels != -100).sum(1).to(per_token.dtype)


class Task(ABC):
    """Base class of every task. Subclasses set the class attributes and override ``prepare`` and
    ``evaluate`` (and ``batch`` / ``loss`` where plain HF inputs and ``model(**inputs).loss`` do not fit)."""

    name: ClassVar[str] = ""
    #: The transformers auto class that builds the model, e.g. "AutoModelForSequenceClassification".
    auto_class: ClassVar[str] = ""
    #: True when the task adds layers the pretrained model lacks (a classifier): its head parameters.
    new_head: ClassVar[bool] = True
    #: The metrics evaluate returns, in metrics.csv's column order: name -> "max" or "min" (which is better).
    metrics: ClassVar[dict[str, str]] = {}
    #: The metric that summary.json, reports and sweep schedulers rank runs by.
    primary_metric: ClassVar[str] = ""
    #: The arrays a training batch feeds the model (``batch`` takes these keys from the data).
    input_keys: ClassVar[tuple[str, ...]] = ("input_ids", "attention_mask", "token_type_ids", "labels")
    #: The task's own keys under ``data:`` (the fields it reads from its data, ...).
    options_model: ClassVar[type[Options]] = Options
    #: True when :meth:`evaluate` reads data shaped as the training arrays, so that a client's own training rows can
    #: be its test rows (``federation.client_eval``); False where evaluation needs what training rows lack
    #: (generation references, QA's context windows with their answers).
    evaluates_training_rows: ClassVar[bool] = False

    def __init__(self, config: RunConfig, info: Optional[dict[str, Any]] = None):
        self.config = config
        self.options = config.data.options(self.options_model)
        self.info: dict[str, Any] = dict(info or {})
        #: the frozen base's dtype (``model.dtype``); forward passes run under autocast in it where it is a half one
        self.dtype = torch_dtype(config.model.dtype)

    # ----------------------------------------------------------------- driver
    @abstractmethod
    def prepare(self) -> TaskData:
        """Load the data and turn it into arrays, once, in the driver (sets ``self.info``)."""

    def load_splits(self, label_field: Optional[str] = None) -> Splits:
        return load_splits(self.config.data, self.config.seed, label_field)

    def partition_labels(self, splits: Splits, own: Optional[tuple[np.ndarray, list[str]]] = None):
        """(class id per training example, names) for the Dirichlet split: ``data.partition.label_field``
        when set, else the task's ``own`` labels, else (None, [])."""
        field_name = self.config.data.partition.label_field
        if field_name:
            splits.require({"partition.label_field": field_name}, ("train",))
            return encode_labels(splits.column("train", field_name), field_name, splits.where, None)
        return own if own is not None else (None, [])

    # ----------------------------------------------------------------- every process
    def model_overrides(self) -> dict[str, Any]:
        """Settings of the model's config that come from the data (``num_labels``, ``pad_token_id``)."""
        return {}

    def transformers_class(self):
        import transformers

        return getattr(transformers, self.auto_class)

    def check_model(self) -> None:
        """Refuse, before any data is prepared, a model whose architecture the task's model class has no
        class for (a LLaMA for image classification); reads only the model's config."""
        check_model_fits(self.transformers_class(), self.config.model.name, self.name)

    def load_model(self) -> LoadedModel:
        m = self.config.model
        return load_model(self.transformers_class(), m.name, self.name, self.config.seed, self.new_head,
                          self.dtype, **self.model_overrides())

    def skeleton(self) -> nn.Module:
        """The model's architecture without weights (meta device)."""
        return model_skeleton(self.transformers_class(), self.config.model.name, self.name, **self.model_overrides())

    def batch(self, data: Arrays, rows: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]:
        """The model inputs of these rows of the training data."""
        return take(data, rows, device, [k for k in self.input_keys if k in data])

    def loss(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**inputs).loss

    def example_loss(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The loss under DP-SGD (``privacy.mode: sample``): the mean over rows of a loss of each row alone, so that
        Opacus' per-example gradient of a row (the gradient of the mean, times the batch size) is that row's own
        gradient, bounded by the clip norm. Default: :meth:`loss`, which is such a mean for a task whose loss is
        the mean of its rows' losses; a task whose loss pools its rows (a token mean over the batch) overrides it
        (:func:`mean_of_row_means`)."""
        return self.loss(model, inputs)

    def row_losses(self, model: nn.Module, inputs: dict[str, torch.Tensor],
                   widths: Optional[torch.Tensor] = None) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """override: per row of one forward pass, (loss summed over what the row counts, what it counts: 1 for a
        classified row, its target tokens for a generated one), such that any group of rows' sums over its counts is
        :meth:`loss` of that group alone. A cohort (ravan_ray/cohort.py) takes each client's loss from them.
        ``widths``: per row, the token width of its client's own batch (a cohort pads to its widest). None: the task
        has none, and a cohort's clients train one by one."""
        return None

    def collate(self, parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Several clients' batches as one: rows concatenated, token arrays right-padded to the widest (token ids
        with the pad token, which decoder-only classifiers look for; labels with -100, which no loss counts;
        masks with 0, so no real token attends to the padding)."""
        merged = {}
        for key in parts[0]:
            tensors = [part[key] for part in parts]
            if tensors[0].dim() >= 2 and key in self.padded_keys:
                width = max(t.shape[1] for t in tensors)
                fill = {"input_ids": self.info.get("pad_token_id", 0), "labels": -100}.get(key, 0)
                tensors = [torch.nn.functional.pad(t, (0, width - t.shape[1]), value=fill) for t in tensors]
            merged[key] = torch.cat(tensors)
        return merged

    #: the token arrays whose second axis is the sequence (padded by :meth:`collate`)
    padded_keys: ClassVar[tuple[str, ...]] = ("input_ids", "attention_mask", "token_type_ids", "labels")

    @abstractmethod
    def evaluate(self, model: nn.Module, data: dict[str, Any], batch_size: int, device: torch.device) -> dict[str, float]:
        """The task's metrics (the keys of :attr:`metrics`) of ``model`` on the test data."""

    def preprocessor(self):
        """override: what turns a user's raw input into the model's input, saved beside an exported model
        (``ravan-ray export``): the model's tokenizer here; a tokenizer without a pad token gets the one the model's
        config was built with (``pad_token_id`` in the task's info), as the task padded with it."""
        from ravan_ray.models import load_tokenizer

        tokenizer = load_tokenizer(self.config.model.name)
        if tokenizer.pad_token_id is None and self.info.get("pad_token_id") is not None:
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(int(self.info["pad_token_id"]))
        return tokenizer

    def decoding_tokenizer(self):
        """The model's tokenizer, loaded once per process on first use (evaluation decodes with it)."""
        if not hasattr(self, "_decoding_tokenizer"):
            from ravan_ray.models import load_tokenizer

            self._decoding_tokenizer = load_tokenizer(self.config.model.name)
        return self._decoding_tokenizer


def take(data: Arrays, rows: np.ndarray, device: torch.device, keys: Sequence[str],
         trim: Sequence[str] = ("input_ids", "attention_mask", "token_type_ids", "labels")) -> dict[str, torch.Tensor]:
    """These rows of ``data[key]`` as tensors on ``device``. The token arrays named in ``trim`` are cut to
    the batch's longest row (by ``attention_mask``): inputs are right-padded, so the columns dropped are
    padding in every row, and the model computes the same result with less work."""
    length = None
    if "attention_mask" in data:
        length = max(1, int(data["attention_mask"][rows].sum(axis=1).max()))
    out = {}
    for key in keys:
        array = data[key][rows]
        if length is not None and key in trim and array.ndim == 2:
            array = array[:, :length]
        out[key] = to_device(np.ascontiguousarray(array), device)
    return out


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    tensor = torch.from_numpy(array)
    if device.type == "cuda":  # pinned pages copy asynchronously: no host sync in the training loop
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor


def object_array(values: list) -> np.ndarray:
    """A 1-D numpy array of Python objects (texts, lists of gold answers), one per row, indexable by rows
    like the numeric arrays beside it (np.array would make equal-length lists a 2-D array)."""
    array = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        array[i] = value
    return array


def batches(total: int, batch_size: int):
    """Row index arrays of consecutive evaluation batches."""
    for start in range(0, total, batch_size):
        yield np.arange(start, min(total, start + batch_size))


class GenerationOptions(Options):
    """What the generating tasks (causal_lm, seq2seq) share."""

    # Tokens generated for the exact-match accuracy. None: the longest reference + 1; 0: no generation (no
    # test_accuracy; for long free-text responses where exact match means nothing).
    max_new_tokens: Optional[int] = Field(None, ge=0)


def greedy_exact_match(model: nn.Module, data: dict[str, Any], batch_size: int, device: torch.device,
                       info: dict[str, Any], tokenizer, inputs: tuple[str, str], continues_prompt: bool) -> float:
    """Share of test rows whose greedy completion, decoded without special tokens and stripped of
    surrounding white space, equals ``data["references"]`` (stripped alike). ``inputs``: the (ids, mask)
    arrays to generate from; ``continues_prompt``: a decoder-only model returns the prompt before its
    completion (prompts are then left-padded and not trimmed). Generation stops at the end tokens of
    ``info["eos_token_ids"]`` and of the model's own generation config (a chat model's end of turn), after
    at most ``info["max_new_tokens"]`` tokens."""
    from transformers import GenerationConfig

    eos = list(info["eos_token_ids"])
    model_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos += [model_eos] if isinstance(model_eos, int) else list(model_eos or [])
    # A fresh GenerationConfig: a checkpoint's sampling defaults (temperature, top_p) do not apply.
    settings = GenerationConfig(max_new_tokens=info["max_new_tokens"], do_sample=False, num_beams=1,
                                eos_token_id=sorted(set(eos)), pad_token_id=info["pad_token_id"],
                                decoder_start_token_id=getattr(model.config, "decoder_start_token_id", None))
    ids_key, mask_key = inputs
    matches = 0
    for rows in batches(len(data["references"]), batch_size):
        batch = take(data, rows, device, inputs, trim=() if continues_prompt else inputs)
        out = model.generate(input_ids=batch[ids_key], attention_mask=batch[mask_key], generation_config=settings)
        if continues_prompt:
            out = out[:, batch[ids_key].shape[1]:]
        completions = tokenizer.batch_decode(out, skip_special_tokens=True)
        matches += sum(c.strip() == r for c, r in zip(completions, data["references"][rows]))
    return matches / max(len(data["references"]), 1)


class ClassificationOptions(Options):
    label_field: str = "label"


class ClassificationTask(Task):
    """What text and image classification share: a new classifier over ``num_labels`` classes,
    accuracy and cross-entropy on the test split."""

    options_model = ClassificationOptions
    new_head = True
    metrics = {"test_accuracy": "max", "test_loss": "min"}
    primary_metric = "test_accuracy"
    evaluates_training_rows = True  # evaluate reads the training arrays' keys (inputs and labels)

    def model_overrides(self) -> dict[str, Any]:
        names = self.info["label_names"]
        return {"num_labels": len(names), "id2label": dict(enumerate(names)),
                "label2id": {name: i for i, name in enumerate(names)}}

    def class_labels(self, splits: Splits) -> tuple[dict[str, np.ndarray], list[str]]:
        """({split: class ids}, names) of ``data.label_field`` for train, test and validation (where there is
        one), encoded over all of them together."""
        field_name = self.options.label_field
        names_in_order = ("train", *splits.evaluation_splits)
        raw = {split: splits.column(split, field_name) for split in names_in_order}
        for split in names_in_order:  # each split on its own first: the row numbers are then its own
            encode_labels(raw[split], field_name, f"{splits.where} ({split} split)", splits.label_names)
        kinds = {split: "class ids" if all(is_class_id(v) for v in raw[split]) else "class names"
                 for split in names_in_order}
        if len(set(kinds.values())) > 1:  # 1 and "1" would be two classes
            raise DataError(f"label field '{field_name}' of {splits.where} holds "
                            + " but ".join(f"{kind} in the {split} split" for split, kind in kinds.items())
                            + "; use one kind of label in every split")
        ids, names = encode_labels(sum(raw.values(), []), field_name, splits.where, splits.label_names)
        if len(np.unique(ids)) < 2:
            raise DataError(f"{splits.where} has fewer than 2 classes in '{field_name}'; classification needs at least 2")
        self.info["label_names"] = names
        ends = np.cumsum([len(raw[s]) for s in names_in_order])
        by_split = dict(zip(names_in_order, np.split(ids, ends[:-1])))
        for split in splits.evaluation_splits:
            unseen = sorted(set(by_split[split].tolist()) - set(by_split["train"].tolist()))
            if unseen:  # the model cannot learn them: their rows count as errors whatever it learns
                shown = ", ".join(repr(names[i]) for i in unseen[:10]) + (", ..." if len(unseen) > 10 else "")
                print(f"ravan-ray: warning: {len(unseen)} classes of the {split} split of {splits.where} are not in "
                      f"its training rows: {shown}", file=sys.stderr)
        return by_split, names

    def row_losses(self, model: nn.Module, inputs: dict[str, torch.Tensor],
                   widths: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's cross-entropy (transformers' single-label classification loss, before its mean)."""
        logits = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits
        losses = torch.nn.functional.cross_entropy(logits.float(), inputs["labels"], reduction="none")
        return losses, torch.ones_like(losses)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: dict[str, Any], batch_size: int, device: torch.device) -> dict[str, float]:
        correct, loss_sum, total = 0, 0.0, rows_in(data)
        for rows in batches(total, batch_size):
            inputs = self.batch(data, rows, device)
            out = model(**inputs)
            correct += int((out.logits.argmax(-1) == inputs["labels"]).sum())
            loss_sum += float(out.loss) * len(rows)
        return {"test_accuracy": correct / total, "test_loss": loss_sum / total}
