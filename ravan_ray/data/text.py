"""What the text tasks share: the text-classification splits as plain lists and arrays, and tokenizing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ravan_ray.data.errors import DataError


@dataclass
class TextClassificationData:
    train_texts: list[str]
    train_labels: np.ndarray  # int64, values in [0, num_classes)
    test_texts: list[str]
    test_labels: np.ndarray
    label_names: list[str]
    train_pairs: list[str] | None = None  # the second text of each pair (sentence-pair tasks)
    test_pairs: list[str] | None = None
    # The validation split's, where the run holds one out (data.validation_fraction / validation_split).
    validation_texts: list[str] | None = None
    validation_labels: np.ndarray | None = None
    validation_pairs: list[str] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def __post_init__(self) -> None:
        if len(self.train_texts) != len(self.train_labels) or len(self.test_texts) != len(self.test_labels):
            raise DataError(
                f"texts and labels differ in length (train {len(self.train_texts)} vs {len(self.train_labels)}, "
                f"test {len(self.test_texts)} vs {len(self.test_labels)})"
            )



def as_texts(values: list) -> list[str]:
    """A text column as strings (a missing value is the empty text)."""
    return ["" if v is None else str(v) for v in values]



# Beyond this share of unknown tokens a tokenizer does not fit the text (a vocabulary of another language,
# files of another model): most words would train as one and the same token.
UNKNOWN_TOKEN_LIMIT = 0.5


def check_vocabulary(tokenizer: Any, texts: list[str], where: str, model_name: str, sample: int = 200) -> None:
    """Refuse a tokenizer that reads most of the first ``sample`` texts as its unknown token."""
    unknown_id = tokenizer.unk_token_id
    if unknown_id is None:  # byte-level tokenizers (GPT-2, LLaMA's) have none: they cover every text
        return
    ids = tokenizer([str(t) for t in texts[:sample]], add_special_tokens=False)["input_ids"]
    total = sum(len(row) for row in ids)
    unknown = sum(token == unknown_id for row in ids for token in row)
    if total and unknown / total > UNKNOWN_TOKEN_LIMIT:
        raise DataError(f"the tokenizer of model.name '{model_name}' reads {unknown / total:.0%} of the tokens of "
                        f"{where} as its unknown token {tokenizer.unk_token!r}: it does not fit this text (another "
                        f"model's or language's vocabulary?)")


def tokenize(texts: list[str], tokenizer: Any, max_length: int, text_pairs: list[str] | None = None,
             chunk_size: int = 4096) -> dict[str, np.ndarray]:
    """Pad/truncate to exactly ``max_length`` with the tokenizer's batch call, in chunks so a large
    dataset never holds more than one chunk's Python encodings at a time. Returns ``input_ids``,
    ``attention_mask`` and, where the tokenizer makes them (BERT), ``token_type_ids``: they tell the two
    texts of a pair apart. ``text_pairs``: the second text of each pair (GLUE's hypothesis, question)."""
    if max_length < 1:
        raise DataError(f"max_length must be >= 1, got {max_length}")
    keys = ("input_ids", "attention_mask", "token_type_ids")
    out: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(texts), chunk_size):
        pairs = None if text_pairs is None else list(text_pairs[start:start + chunk_size])
        enc = tokenizer(list(texts[start:start + chunk_size]), pairs, padding="max_length",
                        truncation="longest_first", max_length=max_length, return_tensors="np")
        for key in keys:
            if key in enc:
                out.setdefault(key, []).append(np.asarray(enc[key], dtype=np.int64))
    if not out:
        return {key: np.zeros((0, max_length), dtype=np.int64) for key in keys[:2]}
    return {key: np.concatenate(chunks) for key, chunks in out.items()}
