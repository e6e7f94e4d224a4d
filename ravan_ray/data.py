"""Data every task shares: load a dataset's splits (synthetic default, local files, image folders,
Hugging Face hub ids), split it across clients (iid or label-Dirichlet, PAPER.md section 4), tokenize.

Sources, chosen by :func:`load_splits` from the ``data`` config section:

- ``name="banking77"`` (the default): Banking77, 77 intents of customer queries to a bank, shipped with
  the package under CC BY 4.0 (``ravan_ray/data_files/banking77/README.md``); no network needed.
- ``name="synthetic"`` (tests): a 12-class text task generated here from the seed, see
  :func:`make_synthetic`.
- ``path=`` a local csv / jsonl / json / parquet file, a directory holding ``train.*`` and ``test.*``
  (the layout of ``shared/data/*``: fields ``text``, ``label``, ``label_name`` and a ``label_names.json``
  beside them), or an image folder (``train/<class>/*.png``, ``test/<class>/*.png``). Read with
  ``datasets.load_dataset("csv" | "json" | "parquet" | "imagefolder")``.
- any other ``name``: a Hugging Face hub dataset id (``subset`` picks its configuration, ``train_split``
  / ``test_split`` its splits), via ``datasets.load_dataset``. Offline (``HF_HUB_OFFLINE`` /
  ``HF_DATASETS_OFFLINE``, read at call time) only the local cache is tried.

A task (ravan_ray/tasks/) takes the columns it needs from the splits. Every problem a user can cause
raises :class:`DataError` with a one-line message (the CLI prints it and exits with code 2). Nothing here
imports Ray: clients get plain arrays.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd

SUPPORTED_EXTENSIONS = {".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# Datasets shipped inside the package: name -> folder with train.jsonl.gz, test.jsonl.gz, label_names.json.
BUILTIN_DATASETS = {"banking77": Path(__file__).parent / "data_files" / "banking77"}
TEST_SPLIT_NAMES = ("test", "validation", "valid", "dev")
PARTITION_KINDS = ("iid", "dirichlet")


class DataError(ValueError):
    """A data problem the user can fix; the message is one line naming it."""


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


# --------------------------------------------------------------------------------------------------
# The synthetic task
# --------------------------------------------------------------------------------------------------

TOPICS: dict[str, dict[str, list[str]]] = {
    "sports": {
        "nouns": ["match", "derby", "cup final", "tournament", "team", "coach", "striker", "referee",
                  "stadium", "marathon", "tennis match", "season opener", "goalkeeper", "playoff game"],
        "contexts": ["at the stadium", "in the second half", "during the playoffs", "on the pitch",
                     "after the penalty shootout", "in extra time", "at the training ground", "at the away game"],
        "activities": ["watched the derby", "played five-a-side football", "went to the basketball game",
                       "ran the city marathon", "followed the cup final", "trained with the squad",
                       "coached the youth team", "played a doubles tennis match"],
    },
    "finance": {
        "nouns": ["stock", "portfolio", "bank", "loan", "mortgage", "dividend", "investment fund", "budget",
                  "bond", "pension plan", "savings account", "tax return", "credit card", "earnings report"],
        "contexts": ["after the interest rate change", "on the trading floor", "this fiscal quarter",
                     "at the bank branch", "after the market closed", "in my brokerage account",
                     "during the earnings call", "before the tax deadline"],
        "activities": ["rebalanced my portfolio", "applied for a mortgage", "bought some index funds",
                       "filed my tax return", "met with a financial advisor", "opened a savings account",
                       "read the quarterly earnings report", "refinanced the car loan"],
    },
    "cooking": {
        "nouns": ["recipe", "soup", "pasta", "oven", "sauce", "bread", "dessert", "chef", "stew", "pastry",
                  "omelette", "curry", "roast chicken", "cookbook"],
        "contexts": ["in the kitchen", "after simmering for an hour", "with fresh garlic and basil",
                     "at the dinner party", "straight out of the oven", "at the cooking class",
                     "with homemade stock", "on the stove"],
        "activities": ["baked sourdough bread", "made a vegetable curry", "tried a new pasta recipe",
                       "cooked dinner for my family", "roasted a whole chicken", "took a cooking class",
                       "made soup from scratch", "baked a lemon tart"],
    },
    "travel": {
        "nouns": ["flight", "hotel", "train journey", "airport", "beach resort", "tour guide", "itinerary",
                  "cruise", "hostel", "road trip", "museum tour", "layover", "rental car", "boarding process"],
        "contexts": ["during the layover", "on our holiday", "at the check-in desk", "after landing",
                     "on the way to the coast", "in the old town", "at the border crossing",
                     "during our week abroad"],
        "activities": ["flew to Lisbon", "booked a hotel by the sea", "took the night train",
                       "went on a road trip", "visited the old town", "backpacked through the mountains",
                       "went on a cruise", "rented a car at the airport"],
    },
}
SENTIMENTS = ("positive", "negative", "neutral")

_POS = ["great", "excellent", "wonderful", "fantastic", "superb", "delightful", "impressive", "brilliant",
        "enjoyable", "outstanding", "amazing", "lovely"]
_NEG = ["terrible", "awful", "disappointing", "horrible", "dreadful", "frustrating", "poor", "miserable",
        "annoying", "disastrous", "unpleasant", "boring"]
_NEU = ["average", "ordinary", "okay", "unremarkable", "standard", "typical", "fairly routine",
        "about as expected"]
_DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "the weekend", "next week", "early june"]

# Predicates that follow a subject ("the flight ___" / "it ___"). Half of the positive and negative
# ones carry their sentiment through a negated word of the opposite polarity, and the neutral ones
# mix both polarities, so counting sentiment words does not give the label.
_PREDICATES = {
    "positive": ["was {pos}", "was really {pos}", "turned out {pos}", "was not {neg} at all",
                 "was never {neg}", "was anything but {neg}", "was not {neg} in the slightest"],
    "negative": ["was {neg}", "was really {neg}", "turned out {neg}", "was not {pos} at all",
                 "was never {pos}", "was anything but {pos}", "was far from {pos}"],
    "neutral": ["was {neu}", "was pretty {neu}", "was neither {pos} nor {neg}",
                "was not {pos} but not {neg} either", "had both {pos} and {neg} moments",
                "was {pos} in parts and {neg} in others", "is scheduled for {day}", "was moved to {day}"],
}
# Verb phrases that take the subject as object ("I ___ the flight").
_VERBS = {
    "positive": ["loved", "really enjoyed", "was thrilled with", "cannot complain about",
                 "was not disappointed by", "would happily recommend", "have nothing bad to say about"],
    "negative": ["hated", "did not enjoy", "was fed up with", "was not impressed by", "would never recommend",
                 "regret choosing", "have nothing good to say about"],
    "neutral": ["have no strong opinion about", "feel indifferent about", "have mixed feelings about",
                "want to ask a question about", "need more details on", "wrote down some notes about",
                "neither loved nor hated"],
}
_LEADS = ["", "", "", "honestly, ", "to be fair, ", "last weekend ", "yesterday ", "in my opinion, ",
          "for what it is worth, ", "as far as I can tell, ", "well, ", "so "]
_TRAILS = ["", "", "", " overall", " this time", " if you ask me", " to be honest", " as usual"]
# A clause that names another topic without judging it: a single off-topic keyword is a distractor,
# never the label.
_DISTRACTORS = [", even though my friend kept talking about the {x}", " while I was reading about the {x}",
                ", and later I checked on the {x}", " right after dealing with the {x}",
                " (unrelated, but the {x} comes up next week)", ", not that the {x} matters here"]


def _synthetic_sentence(rng: np.random.Generator, topic: str, sentiment: str) -> str:
    def pick(options: Sequence[str]) -> str:
        return options[int(rng.integers(len(options)))]

    words = TOPICS[topic]
    subject = "the " + pick(words["nouns"])
    context = " " + pick(words["contexts"]) if rng.random() < 0.7 else ""
    frame = int(rng.integers(3))
    if frame == 0:
        body = f"{subject}{context} {pick(_PREDICATES[sentiment])}"
    elif frame == 1:
        body = f"I {pick(words['activities'])}{context} and it {pick(_PREDICATES[sentiment])}"
    else:
        body = f"I {pick(_VERBS[sentiment])} {subject}{context}"
    body = body.format(pos=pick(_POS), neg=pick(_NEG), neu=pick(_NEU), day=pick(_DAYS))
    distractor = ""
    if rng.random() < 0.35:
        other = pick([t for t in TOPICS if t != topic])
        distractor = pick(_DISTRACTORS).format(x=pick(TOPICS[other]["nouns"]))
    text = f"{pick(_LEADS)}{body}{pick(_TRAILS)}{distractor}."
    return text[0].upper() + text[1:]


def make_synthetic(train_size: int = 4000, test_size: int = 1000, seed: int = 0) -> TextClassificationData:
    """A 12-class text task generated from ``seed``: topic (sports, finance, cooking, travel) x
    sentiment (positive, negative, neutral); label ``t * 3 + s``, named ``"sports/positive"`` etc.

    Each sentence is one of three frames, ``<subject> [<context>] <predicate>``,
    ``I <activity> [<context>] and it <predicate>`` or ``I <verb> <subject> [<context>]``, with an
    optional lead ("honestly, ") and trail (" overall"). Subject, context and activity come from the
    topic's vocabulary; predicate and verb carry the sentiment, often through negation ("was not great
    at all" is negative, "was never boring" positive) or a mix of both polarities ("was great in parts
    and awful in others" is neutral). A third of the sentences add a clause naming a noun of another
    topic ("while I was reading about the mortgage"). So neither a single keyword nor a bag of
    sentiment words gives the label: the model must find the main clause's topic and the scope of
    the negation. Sentences are 8-30 words (under ~40 word pieces), classes are balanced, every text
    is unique across train and test, and the same seed gives the same data (numpy ``Generator``).
    """
    label_names = [f"{t}/{s}" for t in TOPICS for s in SENTIMENTS]
    num_classes = len(label_names)
    if train_size < num_classes or test_size < num_classes:
        raise DataError(
            f"synthetic data needs at least {num_classes} train and test rows (one per class), "
            f"got train_size={train_size}, test_size={test_size}"
        )
    rng = np.random.default_rng(seed)
    # Balanced labels in a seeded order, so every class is in both splits.
    labels = [rng.permutation(np.arange(n) % num_classes).astype(np.int64) for n in (train_size, test_size)]
    topics, seen, texts = list(TOPICS), set(), []
    for split_labels in labels:
        split_texts = []
        for label in split_labels:
            topic, sentiment = topics[label // len(SENTIMENTS)], SENTIMENTS[label % len(SENTIMENTS)]
            for _ in range(1000):
                text = _synthetic_sentence(rng, topic, sentiment)
                if text not in seen and 8 <= len(text.split()) <= 30:
                    break
            else:  # the vocabulary has ~10^6 sentences per class; reaching this means a huge size
                raise DataError(f"could not generate {train_size + test_size} distinct synthetic sentences")
            seen.add(text)
            split_texts.append(text)
        texts.append(split_texts)
    return TextClassificationData(texts[0], labels[0], texts[1], labels[1], label_names)


# --------------------------------------------------------------------------------------------------
# Loading: every task reads its splits through load_splits, then takes the columns it needs
# --------------------------------------------------------------------------------------------------


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
    if d.name == "synthetic" or d.name in BUILTIN_DATASETS:
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
    """A local file loads in a blink; its progress bars are only noise."""
    import datasets.utils

    bars_were_on = not datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()
    try:
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
        raise DataError(f"could not read {file}: {_one_line(e)}") from e
    if ds.num_rows == 0:
        raise DataError(f"{file} has no rows")
    return ds


def _load_image_folder(path: Path) -> Splits:
    import datasets

    try:
        with _quiet_datasets():
            splits = datasets.load_dataset("imagefolder", data_dir=str(path))
    except Exception as e:
        raise DataError(f"could not read the image folder {path}: {_one_line(e)}") from e
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
        raise DataError(f"could not read {file}: {_one_line(e)}") from e
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
                        f"{_one_line(e)}") from e
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


def encode_labels(raw: list, label_field: str, where: str, known_names: list[str] | None) -> tuple[np.ndarray, list[str]]:
    """Class ids for the values of a label column. Integer labels are class ids (named by ``known_names``
    when given, else "0", "1", ...); any other labels are names, mapped to ids in sorted order (or in
    ``known_names`` order when that lists them all). Encode train and test together, so both share one
    id space."""
    missing = sum(v is None for v in raw)
    if missing:
        raise DataError(f"{missing} rows of {where} have no value in label field '{label_field}'")

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


def is_class_id(value: Any) -> bool:
    return (isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))) or (
        isinstance(value, float) and value.is_integer())


def as_texts(values: list) -> list[str]:
    """A text column as strings (a missing value is the empty text)."""
    return ["" if v is None else str(v) for v in values]


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    text = lines[0] if lines else type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


# --------------------------------------------------------------------------------------------------
# Partitioning across clients
# --------------------------------------------------------------------------------------------------


DIRICHLET_TRIES = 200  # fresh draws before a min_size that no draw meets is reported (about a second for 1,000 clients)


def partition(labels: np.ndarray, num_clients: int, kind: str = "dirichlet", alpha: float = 0.3,
              min_size: int = 1, seed: int = 0, max_tries: int = DIRICHLET_TRIES) -> list[np.ndarray]:
    """Split sample indices across ``num_clients``: one sorted int64 index array per client, together
    covering every index exactly once; the same seed gives the same split.

    ``"iid"``: a seeded shuffle cut into near-equal parts (sizes differ by at most 1).
    ``"dirichlet"``: the label-Dirichlet split of Hsu et al. 2019 as implemented in FedLab/FedML: for
    each class draw proportions p ~ Dir(alpha * 1) over clients and cut the class's shuffled indices
    at those proportions; clients already holding more than n / num_clients samples get no share of
    later classes (keeps client sizes from running away). The whole draw is repeated (up to
    ``max_tries`` fresh draws) until every client has at least ``min_size`` samples. Smaller alpha
    gives each client fewer dominant classes; large alpha approaches iid. A draw only counts samples
    (the index arrays are cut once, for the draw that is kept), so even 1,000 clients are decided in
    about a second; when no draw meets ``min_size`` the error says what would: the smallest client of
    the best draw, and an alpha for which a draw did.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise DataError(f"labels must be a 1-D array, got shape {labels.shape}")
    n = len(labels)
    if not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise DataError(f"num_clients must be a positive integer, got {num_clients!r}")
    if num_clients > n:
        raise DataError(f"cannot split {n} samples across {num_clients} clients: more clients than samples")
    if kind not in PARTITION_KINDS:
        raise DataError(f"unknown partition kind '{kind}'; allowed: {', '.join(PARTITION_KINDS)}")
    if min_size < 0:
        raise DataError(f"min_size must be >= 0, got {min_size}")
    if num_clients * min_size > n:
        raise DataError(
            f"cannot give each of {num_clients} clients at least min_size={min_size} samples from a dataset of {n}; "
            f"use data.partition.min_size <= {n // num_clients} or fewer clients"
        )
    rng = np.random.default_rng(seed)

    if kind == "iid":
        return [np.sort(part).astype(np.int64) for part in np.array_split(rng.permutation(n), num_clients)]

    if not (isinstance(alpha, (int, float, np.floating)) and math.isfinite(alpha) and alpha > 0):
        raise DataError(f"dirichlet alpha must be a finite number > 0, got {alpha!r}")
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    best = -1
    for _ in range(max_tries):
        shuffled, counts = _dirichlet_draw(by_class, num_clients, float(alpha), n, rng)
        smallest = int(counts.sum(axis=0).min())
        if smallest >= min_size:
            return _cut(shuffled, counts, num_clients)
        best = max(best, smallest)
    hint = _working_alpha(by_class, num_clients, float(alpha), n, min_size, seed)
    raise DataError(
        f"no Dirichlet(alpha={alpha}) split of a dataset of {n} samples gave each of {num_clients} clients "
        f"at least min_size={min_size} samples in {max_tries} draws (the best gave its smallest client {best}); "
        f"use data.partition.min_size <= {best}"
        + (f", data.partition.alpha >= {hint:g}" if hint is not None else "") + " or fewer clients"
    )


def _dirichlet_draw(by_class: list[np.ndarray], num_clients: int, alpha: float, n: int,
                    rng: np.random.Generator) -> tuple[list[np.ndarray], np.ndarray]:
    """One draw: each class's shuffled indices and how many of them each client gets, (classes, clients)."""
    sizes = np.zeros(num_clients, dtype=np.int64)
    shuffled, counts = [], np.zeros((len(by_class), num_clients), dtype=np.int64)
    for c, idx in enumerate(by_class):
        idx = rng.permutation(idx)
        p = rng.dirichlet(np.full(num_clients, alpha))
        p = p * (sizes < n / num_clients)
        if not p.sum() > 0:  # tiny alpha can put all mass on full clients; spread over the rest
            p = (sizes < n / num_clients).astype(float)
        cuts = (np.cumsum(p / p.sum()) * len(idx)).astype(np.int64)[:-1]
        counts[c] = np.diff(np.concatenate([[0], cuts, [len(idx)]]))
        sizes += counts[c]
        shuffled.append(idx)
    return shuffled, counts


def _cut(shuffled: list[np.ndarray], counts: np.ndarray, num_clients: int) -> list[np.ndarray]:
    chunks: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for idx, class_counts in zip(shuffled, counts):
        for client, chunk in enumerate(np.split(idx, np.cumsum(class_counts)[:-1])):
            chunks[client].append(chunk)
    return [np.sort(np.concatenate(parts)).astype(np.int64) for parts in chunks]


def _working_alpha(by_class: list[np.ndarray], num_clients: int, alpha: float, n: int, min_size: int,
                   seed: int, tries: int = 20) -> float | None:
    """The smallest of alpha x 2, x 4, ... (up to 1,000) for which one of a few draws meets min_size."""
    rng = np.random.default_rng([seed, 7])
    candidate = alpha
    while candidate < 1000:
        candidate *= 2
        for _ in range(tries):
            _, counts = _dirichlet_draw(by_class, num_clients, candidate, n, rng)
            if counts.sum(axis=0).min() >= min_size:
                return float(f"{candidate:.2g}")
    return None


def label_histogram(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> pd.DataFrame:
    """Samples per class (columns 0..num_classes-1) held by each client (rows, index "client")."""
    labels = np.asarray(labels)
    counts = np.stack([np.bincount(labels[p], minlength=num_classes)[:num_classes] for p in parts]) if parts \
        else np.zeros((0, num_classes), dtype=np.int64)
    return pd.DataFrame(counts.astype(np.int64), index=pd.RangeIndex(len(parts), name="client"),
                        columns=list(range(num_classes)))


# --------------------------------------------------------------------------------------------------
# Tokenization
# --------------------------------------------------------------------------------------------------


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
