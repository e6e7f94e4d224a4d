"""What every source gives a task: a dataset's splits (:class:`Splits`), and its label columns as class ids
(:func:`encode_labels`). Below both the sources (sources.py) and the instruction layout (instructions.py), which
each build splits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ravan_ray.data.errors import DataError


@dataclass
class Splits:
    """A dataset's train and test splits as ``datasets.Dataset`` objects (columns untouched)."""

    train: Any
    test: Any
    where: str  # how messages name the source: "dataset 'nyu-mll/glue'", "/data/news.jsonl"
    # Names of the integer class ids of ``data.label_field``, where the source gives them (a
    # ``label_names.json`` beside local files, a ``ClassLabel`` feature on the hub or in an image folder).
    label_names: list[str] | None = None
    # Rows for model selection (data.validation_fraction / data.validation_split); None without one.
    validation: Any = None

    @property
    def evaluation_splits(self) -> tuple[str, ...]:
        """The splits a task prepares for evaluation: test, and validation where there is one."""
        return ("test",) if self.validation is None else ("test", "validation")

    def split(self, name: str) -> Any:
        return {"train": self.train, "test": self.test, "validation": self.validation}[name]

    def require(self, fields: dict[str, str | None], splits: tuple[str, ...] | None = None) -> None:
        """One line naming the first field (by its config key) that a split lacks (default: every split)."""
        for role, field in fields.items():
            for split_name in splits or ("train", *self.evaluation_splits):
                split = self.split(split_name)
                if field is not None and field not in split.column_names:
                    raise DataError(f"data.{role} '{field}' is not a column of {self.where} ({split_name} split); "
                                    f"available columns: {split.column_names}")

    def column(self, split: str, field: str) -> list:
        return list(self.split(split)[field])  # (not ds.data: after a select() that is still the whole table)



def encode_labels(raw: list, label_field: str, where: str, known_names: list[str] | None) -> tuple[np.ndarray, list[str]]:
    """Class ids for the values of a label column. Integer labels are class ids (named by ``known_names``
    when given, else "0", "1", ...); any other labels are names, mapped to ids in sorted order (or in
    ``known_names`` order when that lists them all). Encode train and test together, so both share one
    id space."""
    missing = sum(v is None for v in raw)
    if missing:
        raise DataError(f"{missing} rows of {where} have no value in label field '{label_field}'")

    # A number that is not a class id (3.5, NaN) would make every label a name: "1.0" in one split and "1"
    # in another then become two classes. Numbers are class ids, or the column is refused.
    not_ids = [(row, v) for row, v in enumerate(raw) if _is_number(v) and not is_class_id(v)]
    if not_ids:
        row, value = not_ids[0]
        raise DataError(f"label field '{label_field}' of {where} has {len(not_ids)} values that are not class ids "
                        f"(e.g. {value!r} in row {row + 1}); labels must be integer class ids or class names")
    if all(is_class_id(v) for v in raw):
        ids = np.asarray(raw, dtype=np.int64)
        if ids.min() < 0:
            raise DataError(f"label field '{label_field}' of {where} has negative class ids (e.g. {ids.min()})")
        if known_names is not None:
            if ids.max() >= len(known_names):
                raise DataError(
                    f"label field '{label_field}' of {where} has class id {ids.max()} but only "
                    f"{len(known_names)} label names are given"
                )
            return ids, list(known_names)
        return ids, [str(i) for i in range(int(ids.max()) + 1)]

    strings = [str(v) for v in raw]
    distinct = set(strings)
    names = list(known_names) if known_names is not None and distinct <= set(known_names) else sorted(distinct)
    index = {n: i for i, n in enumerate(names)}
    return np.array([index[s] for s in strings], dtype=np.int64), names


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, (bool, np.bool_))


def is_class_id(value: Any) -> bool:
    return (isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))) or (
        isinstance(value, float) and value.is_integer())
