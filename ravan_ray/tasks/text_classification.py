"""Text classification, single texts or sentence pairs (GLUE's MNLI, QNLI, RTE, SST-2, ...):
``AutoModelForSequenceClassification`` with a new classifier, cross-entropy, accuracy.

Fields: ``data.text_field`` and ``data.label_field``; ``data.text_pair_field`` names the second text of
a pair (MNLI's hypothesis, QNLI's sentence), tokenised as the model's pair format (``[SEP]`` and segment
ids for BERT). Labels may be class ids (named by a ``ClassLabel`` feature or ``label_names.json``) or
names (ids in sorted order).

Decoder-only models (LLaMA-style ``...ForSequenceClassification``) classify from the last non-padding
token, which they find through ``config.pad_token_id``; their tokenizers often have no pad token. The
tokenizer's end-of-sequence token is then used as the pad token (and recorded in the model config):
inputs are right-padded, so the model reads the last real token either way. This is the choice of
transformers' own docs and of PEFT's sequence-classification examples for LLaMA. The pad token id is
always written into the model config, since some checkpoints leave it unset even where the tokenizer
has one.
"""

from __future__ import annotations

from typing import Any, Optional

from ravan_ray.data import DataError, TextClassificationData, as_texts, check_vocabulary, tokenize
from ravan_ray.models import load_tokenizer
from ravan_ray.tasks.base import ClassificationOptions, ClassificationTask, TaskData


class TextClassificationOptions(ClassificationOptions):
    text_field: str = "text"
    text_pair_field: Optional[str] = None  # the second text of a sentence pair


class TextClassification(ClassificationTask):
    name = "text_classification"
    auto_class = "AutoModelForSequenceClassification"
    options_model = TextClassificationOptions

    def prepare(self) -> TaskData:
        data = self.load_texts()
        d = self.config.data
        tokenizer = self.tokenizer()
        check_vocabulary(tokenizer, data.train_texts, self.splits.where, self.config.model.name)
        train = {**tokenize(data.train_texts, tokenizer, d.max_length, data.train_pairs), "labels": data.train_labels}
        test = {**tokenize(data.test_texts, tokenizer, d.max_length, data.test_pairs), "labels": data.test_labels}
        validation = None if data.validation_texts is None else {
            **tokenize(data.validation_texts, tokenizer, d.max_length, data.validation_pairs),
            "labels": data.validation_labels}
        labels, names = self.partition_labels(self.splits, (data.train_labels, data.label_names))
        return TaskData(train, test, self.info, labels, names, validation=validation)

    def load_texts(self) -> TextClassificationData:
        """The texts (and pairs) and class ids of both splits."""
        d = self.options
        self.splits = self.load_splits(label_field=d.label_field)
        self.splits.require({"text_field": d.text_field, "text_pair_field": d.text_pair_field, "label_field": d.label_field})
        labels, names = self.class_labels(self.splits)

        def texts(split: str):
            return as_texts(self.splits.column(split, d.text_field))

        def pairs(split: str):
            return as_texts(self.splits.column(split, d.text_pair_field)) if d.text_pair_field else None

        has_validation = self.splits.validation is not None
        return TextClassificationData(texts("train"), labels["train"], texts("test"), labels["test"], names,
                                      pairs("train"), pairs("test"),
                                      texts("validation") if has_validation else None, labels.get("validation"),
                                      pairs("validation") if has_validation else None)

    def tokenizer(self):
        tokenizer = load_tokenizer(self.config.model.name)
        tokenizer.padding_side = "right"  # take() trims padding columns from the right
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise DataError(f"the tokenizer of model.name '{self.config.model.name}' has neither a pad nor an "
                                f"end-of-sequence token to pad with")
            tokenizer.pad_token = tokenizer.eos_token
        # Recorded for the model too: some checkpoints' configs leave it unset even where the tokenizer has one.
        self.info["pad_token_id"] = int(tokenizer.pad_token_id)
        return tokenizer

    def model_overrides(self) -> dict[str, Any]:
        return {**super().model_overrides(), "pad_token_id": self.info["pad_token_id"]}
