"""Loading a dataset's splits: every task reads them through :func:`load_splits`, then takes the columns it
needs. The sources are listed in the package docstring (ravan_ray/data/__init__.py)."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ravan_ray.data.errors import DataError, one_line
from ravan_ray.data.instructions import (BUILTIN_INSTRUCTION_DATASETS, classification_as_instructions,
                                         default_instruction)
from ravan_ray.data.splits import Splits
from ravan_ray.data.synthetic import make_synthetic
from ravan_ray.logs import quiet_logger

SUPPORTED_EXTENSIONS = {".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# Datasets shipped inside the package: name -> folder with train.jsonl.gz, test.jsonl.gz, label_names.json.
BUILTIN_DATASETS = {"banking77": Path(__file__).parents[1] / "data_files" / "banking77"}
TEST_SPLIT_NAMES = ("test", "validation", "valid", "dev")


def load_splits(data_config: Any, seed: int, label_field: str | None = None) -> Splits:
    """Load the dataset ``data_config`` names (module docstring lists the sources) as train and test
    splits. ``test_fraction`` is split off (seeded shuffle) only when the source has no test split;
    ``max_*_samples`` take a seeded subsample of a split. ``label_field``: a column that, where a source
    ships an unlabelled test split (GLUE's test, all -1), makes that split be passed over.

    Validation: ``validation_split`` names a split of the source (a hub split, or a file stem beside
    train.* in a local folder); ``validation_fraction`` holds that share of the training rows out instead,
    after ``max_train_samples`` subsampling and before anything is partitioned over clients, with its own
    stream of the run seed (so the test split and the subsample do not move). A plain random draw, not
    stratified: that is what a practitioner holding out part of the clients' pooled data would do, and a
    Dirichlet-skewed federation gives no better-defined stratum."""
    d = data_config
    if d.path is not None:
        splits = _load_local(Path(d.path), d, seed)
    elif d.name == "synthetic":
        splits = _synthetic_splits(seed)
    elif d.name in BUILTIN_DATASETS:
        splits = _builtin_splits(d.name)
    elif d.name in BUILTIN_INSTRUCTION_DATASETS:
        splits = _builtin_splits(BUILTIN_INSTRUCTION_DATASETS[d.name])
    elif not d.name:
        raise DataError("data.name is empty: use 'synthetic', a Hugging Face dataset id, or set data.path")
    else:
        splits = _load_hub(d, label_field)
    if splits.test is None:
        splits.train, splits.test = _split_off_test(splits.train, d.test_fraction, seed, splits.where)
    if splits.train.num_rows == 0:
        raise DataError(f"{splits.where} has no rows")
    if splits.test.num_rows == 0:
        raise DataError(f"the test split of {splits.where} has no rows")
    rng = np.random.default_rng([seed, 1])  # its own stream, so subsampling does not shift the split
    splits.train = _subsample(splits.train, d.max_train_samples, rng)
    splits.test = _subsample(splits.test, d.max_test_samples, rng)
    if d.validation_split is not None:
        splits.validation = _named_split(d, d.validation_split, splits.where)
    elif d.validation_fraction > 0:
        splits.train, splits.validation = _hold_out(splits.train, d.validation_fraction, seed, splits.where)
    if splits.validation is not None and splits.validation.num_rows == 0:
        raise DataError(f"the validation split of {splits.where} has no rows")
    if d.as_instructions or (d.path is None and d.name in BUILTIN_INSTRUCTION_DATASETS):
        splits = classification_as_instructions(splits, d.instruction or default_instruction(d))
    return splits


def _hold_out(train: Any, fraction: float, seed: int, where: str) -> tuple[Any, Any]:
    """(the training rows that stay, the validation rows): ``fraction`` of the rows, at least one."""
    n = train.num_rows
    if n < 2:
        raise DataError(f"{where} has only {n} training row; need at least 2 to hold out a validation split")
    n_val = min(max(int(round(n * fraction)), 1), n - 1)
    order = np.random.default_rng([seed, 2]).permutation(n)  # stream 2: not the test split's, nor the subsample's
    return train.select(np.sort(order[n_val:])), train.select(np.sort(order[:n_val]))


def _named_split(d: Any, name: str, where: str) -> Any:
    """``data.validation_split``: a split of a hub dataset, or NAME.csv/.jsonl/... in a local folder."""
    if d.path is not None:
        path = Path(d.path)
        found = _find_split_file(path, name) if path.is_dir() and not is_image_folder(path) else None
        if found is None:
            raise DataError(f"data.validation_split '{name}': no {name}.csv/.jsonl/.json/.parquet in {path}")
        return _read_file(found)
    if d.name == "synthetic" or d.name in BUILTIN_DATASETS or d.name in BUILTIN_INSTRUCTION_DATASETS:
        raise DataError(f"data.validation_split '{name}': {where} has only train and test; "
                        f"use data.validation_fraction instead")
    import datasets

    with _offline_from_env():
        all_splits = datasets.load_dataset(d.name, d.subset) if d.subset else datasets.load_dataset(d.name)
    if name not in all_splits:
        raise DataError(f"data.validation_split '{name}' is not a split of {where}; splits: {list(all_splits)}")
    return all_splits[name]


def _synthetic_splits(seed: int) -> Splits:
    import datasets

    data = make_synthetic(seed=seed)
    train = datasets.Dataset.from_dict({"text": data.train_texts, "label": data.train_labels.tolist()})
    test = datasets.Dataset.from_dict({"text": data.test_texts, "label": data.test_labels.tolist()})
    return Splits(train, test, "the synthetic dataset", list(data.label_names))


def _builtin_splits(name: str) -> Splits:
    import datasets

    folder = BUILTIN_DATASETS[name]
    with _quiet_datasets():
        splits = datasets.load_dataset("json", data_files={s: str(folder / f"{s}.jsonl.gz") for s in ("train", "test")})
    return Splits(splits["train"], splits["test"], f"the {name} dataset", _read_label_names(folder / "label_names.json"))


def _split_off_test(train: Any, test_fraction: float, seed: int, where: str) -> tuple[Any, Any]:
    n = train.num_rows
    if n < 2:
        raise DataError(f"{where} has only {n} row; need at least 2 to split off a test set")
    n_test = min(max(int(round(n * test_fraction)), 1), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    return train.select(np.sort(order[n_test:])), train.select(np.sort(order[:n_test]))


def _subsample(ds: Any, limit: int | None, rng: np.random.Generator) -> Any:
    if limit is None or limit >= ds.num_rows:
        return ds
    return ds.select(np.sort(rng.choice(ds.num_rows, size=int(limit), replace=False)))


def _find_split_file(directory: Path, stem: str) -> Path | None:
    found = [directory / f"{stem}{ext}" for ext in SUPPORTED_EXTENSIONS if (directory / f"{stem}{ext}").is_file()]
    if len(found) > 1:
        raise DataError(f"{directory} has more than one {stem} file ({', '.join(p.name for p in found)}); keep one")
    return found[0] if found else None


def is_image_folder(path: Path) -> bool:
    """The ``imagefolder`` layout: ``train/<class>/*.png`` (and ``test/<class>/...``)."""
    return path.is_dir() and (path / "train").is_dir() and any(p.is_dir() for p in (path / "train").iterdir())


def _load_local(path: Path, d: Any, seed: int) -> Splits:
    if not path.exists():
        raise DataError(f"data path {path} does not exist")
    if is_image_folder(path):
        return _load_image_folder(path)
    if path.is_dir():
        train_file = _find_split_file(path, d.train_split or "train")
        test_names = (d.test_split,) if d.test_split else TEST_SPLIT_NAMES
        test_file = next((f for stem in test_names if (f := _find_split_file(path, stem))), None)
        if d.test_split and test_file is None:
            raise DataError(f"data.test_split '{d.test_split}': no {d.test_split}.csv/.jsonl/.json/.parquet in {path}")
        if train_file is None:
            candidates = sorted(p for p in path.iterdir() if p.suffix.lower() in SUPPORTED_EXTENSIONS)
            if len(candidates) != 1:
                raise DataError(
                    f"directory {path} needs a train.csv/.jsonl/.json/.parquet file, an image folder layout "
                    f"(train/<class>/*.png), or exactly one data file; found {[p.name for p in candidates] or 'none'}"
                )
            train_file, test_file = candidates[0], None
        names_file = path / "label_names.json"
    else:
        train_file, test_file, names_file = path, None, path.parent / "label_names.json"
    train = _read_file(train_file)
    test = _read_file(test_file) if test_file is not None else None
    names = _read_label_names(names_file) if names_file.is_file() else None
    return Splits(train, test, str(path), names)


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """A local file loads in a blink; its progress bars are only noise, and so is the builders' log line
    about a file it cannot read (our one line says it, naming the row)."""
    import logging

    import datasets.utils

    bars_were_on = not datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()
    try:
        with quiet_logger("datasets", logging.CRITICAL):
            yield
    finally:
        if bars_were_on:
            datasets.utils.enable_progress_bars()


def _read_file(file: Path) -> Any:
    builder = SUPPORTED_EXTENSIONS.get(file.suffix.lower())
    if builder is None:
        raise DataError(f"unsupported data file {file.name}: use one of {', '.join(SUPPORTED_EXTENSIONS)}")
    if file.stat().st_size == 0:
        raise DataError(f"{file} is empty")
    import datasets

    try:
        with _quiet_datasets():
            ds = datasets.load_dataset(builder, data_files=str(file), split="train")
    except Exception as e:  # the builders raise many types (ArrowInvalid, DatasetGenerationError, ...)
        if "corresponds to no data" in str(e):  # a header-only csv
            raise DataError(f"{file} has no rows") from e
        # our own account of where it goes wrong, else the library's (whose row numbers count within a block)
        raise DataError(f"could not read {file}: {_first_bad_line(file, builder) or one_line(e)}") from e
    if ds.num_rows == 0:
        raise DataError(f"{file} has no rows")
    return ds


def _first_bad_line(file: Path, builder: str) -> str:
    """Where a text data file the builder could not read goes wrong, as "line N ...": the first byte that is
    not UTF-8, the first JSON Lines line that is not JSON, the first CSV row whose number of cells differs
    from the header's. The builders read in blocks, and the row numbers in their messages count from a
    block's start. "" where it is not found this way (a parquet file, a damaged block of a valid-looking one)."""
    if builder == "parquet":
        return ""
    raw = file.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[:error.start].count(b"\n") + 1
        return f"line {line} (byte {error.start}) is not UTF-8 text"
    if builder == "json" and file.suffix.lower() == ".jsonl":
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError as error:
                    return f"line {number} is not JSON ({error.msg}, column {error.colno})"
    elif builder == "json":
        try:
            json.loads(text)
        except json.JSONDecodeError as error:
            return f"not JSON at line {error.lineno}, column {error.colno} ({error.msg})"
    elif builder == "csv":
        import csv

        rows = csv.reader(text.splitlines())
        width = len(next(rows, []))
        for row in rows:
            if row and len(row) != width:
                return f"line {rows.line_num} has {len(row)} cells, the header {width}"
    return ""


def _load_image_folder(path: Path) -> Splits:
    import datasets

    try:
        with _quiet_datasets():
            splits = datasets.load_dataset("imagefolder", data_dir=str(path))
    except Exception as e:
        raise DataError(f"could not read the image folder {path}: {one_line(e)}") from e
    feature = splits["train"].features.get("label")
    if feature is None:  # the builder makes a label column only when there are two class folders or more
        classes = sorted(p.name for p in (path / "train").iterdir() if p.is_dir())
        raise DataError(f"image folder {path} has {len(classes)} class ({', '.join(classes)}) in train/; "
                        f"classification needs at least 2 class folders")
    names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
    test = next((splits[s] for s in TEST_SPLIT_NAMES if s in splits), None)
    return Splits(splits["train"], test, f"image folder {path}", names)


def _read_label_names(file: Path) -> list[str]:
    try:
        names = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"could not read {file}: {one_line(e)}") from e
    if isinstance(names, dict):  # {"0": "name", ...}
        try:
            names = [names[k] for k in sorted(names, key=int)]
        except ValueError as e:
            raise DataError(f"{file} must be a list of names or a dict from class id to name") from e
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise DataError(f"{file} must be a JSON list of class names")
    return names


@contextlib.contextmanager
def _offline_from_env() -> Iterator[None]:
    """Both libraries read the offline switches at import time; read them again now, so setting them
    after import (in a test, or in a script before calling us) still keeps the call off the network."""
    import datasets.config
    import huggingface_hub.constants as hub_constants

    offline = any(os.environ.get(k, "").upper() in ("1", "ON", "YES", "TRUE")
                  for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    saved = datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE
    if offline:
        datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


def _load_hub(d: Any, label_field: str | None) -> Splits:
    import datasets

    name = d.name
    where = f"dataset '{name}'" + (f" ({d.subset})" if d.subset else "")
    try:
        with _offline_from_env():
            splits = datasets.load_dataset(name, d.subset) if d.subset else datasets.load_dataset(name)
    except Exception as e:
        raise DataError(f"{where} could not be loaded from the Hugging Face hub (offline and not cached?): "
                        f"{one_line(e)}") from e
    if not isinstance(splits, datasets.DatasetDict) or len(splits) == 0:
        raise DataError(f"{where} has no splits")
    if d.train_split:
        if d.train_split not in splits:
            raise DataError(f"data.train_split '{d.train_split}' is not a split of {where}; splits: {list(splits)}")
        train = splits[d.train_split]
    elif "train" in splits:
        train = splits["train"]
    elif len(splits) == 1:
        train = next(iter(splits.values()))
    else:
        raise DataError(f"{where} has no 'train' split; set data.train_split (splits: {list(splits)})")
    test = None
    if d.test_split:
        if d.test_split not in splits:
            raise DataError(f"data.test_split '{d.test_split}' is not a split of {where}; splits: {list(splits)}")
        test = splits[d.test_split]
    else:
        for split in TEST_SPLIT_NAMES:  # some benchmarks (GLUE) ship an unlabelled test split (-1): skip those
            if split in splits and splits[split] is not train and not _unlabelled(splits[split], label_field):
                test = splits[split]
                break
    feature = train.features.get(label_field) if label_field else None
    names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
    return Splits(train, test, where, names)


def _unlabelled(split: Any, label_field: str | None) -> bool:
    if not label_field or label_field not in split.column_names or split.num_rows == 0:
        return False
    return all(v == -1 for v in split[label_field])
