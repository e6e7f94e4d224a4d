"""Text-to-text with an encoder-decoder (``AutoModelForSeq2SeqLM``; the paper's T5-Base on 20 Newsgroups):
``data.source_field`` -> ``data.target_field``, teacher-forced cross-entropy, exact match of the greedy
generation.

Classification as generation, how T5 is used on 20 Newsgroups: when the target column holds class ids
(integers, named by a ``ClassLabel`` feature or ``label_names.json``), the model is taught to generate the
class *name* ("rec.sport.hockey"); a text target column is used as it is. Those class ids are also what
the Dirichlet partition splits on; a text target has no classes, so the split then needs
``data.partition.label_field`` or falls back to iid.

Lengths: sources are cut to ``data.max_length`` tokens, targets to ``data.max_target_length`` (with the
tokenizer's end token, which T5's tokenizer appends). Metrics: ``test_loss`` (mean cross-entropy per
target token) and ``test_accuracy``: the share of test sources whose greedy generation, decoded without
special tokens and stripped of surrounding white space, equals the target text stripped alike;
``data.max_new_tokens`` bounds the generation (unset: the longest test target's length in tokens; 0: no
generation, test_accuracy empty).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
from pydantic import Field
from torch import nn

from ravan_ray.data import DataError, as_texts, encode_labels, is_class_id, tokenize
from ravan_ray.models import load_tokenizer
from ravan_ray.tasks.base import (Arrays, GenerationOptions, Task, TaskData, batches, greedy_exact_match, object_array,
                                  mean_of_row_means, take, to_device, token_losses)
from ravan_ray.tasks.causal_lm import IGNORE


class Seq2SeqOptions(GenerationOptions):
    source_field: str = "text"
    # An integer target with class names is generated as the class name.
    target_field: str = "label"
    max_target_length: int = Field(32, ge=1, le=8192)


class Seq2Seq(Task):
    name = "seq2seq"
    auto_class = "AutoModelForSeq2SeqLM"
    options_model = Seq2SeqOptions
    new_head = False
    metrics = {"test_accuracy": "max", "test_loss": "min"}
    primary_metric = "test_accuracy"

    def prepare(self) -> TaskData:
        d = self.options
        splits = self.load_splits(label_field=d.target_field)
        splits.require({"source_field": d.source_field, "target_field": d.target_field})
        split_names = ("train", *splits.evaluation_splits)
        raw = {split: splits.column(split, d.target_field) for split in split_names}
        own_labels = None
        if all(v is not None and is_class_id(v) for v in sum(raw.values(), [])):
            ids, names = encode_labels(sum(raw.values(), []), d.target_field, splits.where, splits.label_names)
            per_split = dict(zip(split_names, np.split(ids, np.cumsum([len(raw[s]) for s in split_names])[:-1])))
            targets = {split: [names[i] for i in per_split[split]] for split in split_names}
            own_labels = (per_split["train"], names)
        else:
            targets = {split: as_texts(raw[split]) for split in split_names}
        tokenizer = self.tokenizer()
        prepared = {split: self.encode(as_texts(splits.column(split, d.source_field)), targets[split], tokenizer)
                    for split in split_names}
        if d.max_new_tokens != 0:
            for split in splits.evaluation_splits:
                prepared[split]["references"] = object_array([t.strip() for t in targets[split]])
            # Generation length from the test split alone, so a validation split changes nothing in test.
            longest = int((prepared["test"]["labels"] != IGNORE).sum(axis=1).max())
            self.info["max_new_tokens"] = int(d.max_new_tokens if d.max_new_tokens is not None else longest)
        labels, names = self.partition_labels(splits, own_labels)
        return TaskData(prepared["train"], prepared["test"], self.info, labels, names,
                        validation=prepared.get("validation"))

    def tokenizer(self):
        tokenizer = load_tokenizer(self.config.model.name)
        tokenizer.padding_side = "right"
        if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
            raise DataError(f"the tokenizer of model.name '{self.config.model.name}' needs a pad and an end-of-sequence "
                            f"token for text-to-text training")
        self.info["pad_token_id"] = int(tokenizer.pad_token_id)
        self.info["eos_token_ids"] = [int(tokenizer.eos_token_id)]
        return tokenizer

    def encode(self, sources: list[str], targets: list[str], tokenizer) -> Arrays:
        arrays = tokenize(sources, tokenizer, self.config.data.max_length)
        arrays.pop("token_type_ids", None)  # encoder-decoders take none
        labels = tokenizer(text_target=targets, max_length=self.options.max_target_length, truncation=True,
                           padding="max_length", return_tensors="np")
        arrays["labels"] = np.where(labels["attention_mask"] == 1, labels["input_ids"], IGNORE).astype(np.int64)
        return arrays

    # ----------------------------------------------------------------- every process
    def batch(self, data: Arrays, rows: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]:
        inputs = take(data, rows, device, ["input_ids", "attention_mask"])
        labels = data["labels"][rows]
        length = max(1, int((labels != IGNORE).sum(axis=1).max()))  # targets are right-padded too
        inputs["labels"] = to_device(np.ascontiguousarray(labels[:, :length]), device)
        return inputs

    def row_losses(self, model: nn.Module, inputs: dict[str, torch.Tensor],
                   widths: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row, the target tokens' cross-entropy summed, and their number (the model builds its decoder
        inputs from the labels, shifted right, as in training alone)."""
        return token_losses(model(**inputs).logits, inputs["labels"])

    def example_loss(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Under DP-SGD: each example's mean over its own target tokens, then the mean over examples (the
        training loss is a token mean over the whole batch, in which one example's gradient would depend on the
        other examples' token counts)."""
        return mean_of_row_means(self.row_losses(model, inputs))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: dict[str, Any], batch_size: int, device: torch.device) -> dict[str, float]:
        loss_sum, tokens = 0.0, 0
        for rows in batches(len(data["labels"]), batch_size):
            inputs = self.batch(data, rows, device)
            counted = int((inputs["labels"] != IGNORE).sum())
            loss_sum += float(model(**inputs).loss) * counted
            tokens += counted
        metrics = {"test_loss": loss_sum / max(tokens, 1)}
        if "references" in data:
            metrics["test_accuracy"] = greedy_exact_match(model, data, batch_size, device, self.info,
                                                          self.decoding_tokenizer(),
                                                          ("input_ids", "attention_mask"), continues_prompt=False)
        return metrics

    def model_overrides(self) -> dict[str, Any]:
        return {"pad_token_id": self.info["pad_token_id"]}
