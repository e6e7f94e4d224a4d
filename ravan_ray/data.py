"""Text-classification data: load it (synthetic default, local files, Hugging Face hub id), split it
across clients (iid or label-Dirichlet, PAPER.md section 4), and tokenize it.

Sources, chosen by ``load_text_classification(name, path, ...)``:

- ``name="synthetic"`` (the default, no files, no network): a 12-class task generated here from the
  seed, see :func:`make_synthetic`.
- ``path=`` a local csv / jsonl / json / parquet file, or a directory holding ``train.*`` and
  ``test.*`` (the layout of ``shared/data/*``: fields ``text``, ``label``, ``label_name`` and a
  ``label_names.json`` beside them). Read with ``datasets.load_dataset("csv" | "json" | "parquet")``.
- any other ``name``: a Hugging Face hub dataset id, via ``datasets.load_dataset(name)``. Offline
  (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``, read at call time) only the local cache is tried.

Every problem a user can cause raises :class:`DataError` with a one-line message (the CLI prints it
and exits with code 2). Nothing here imports Ray: clients get plain arrays.
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
# Loading
# --------------------------------------------------------------------------------------------------


def load_text_classification(
    name: str = "synthetic",
    path: str | os.PathLike | None = None,
    text_field: str = "text",
    label_field: str = "label",
    test_fraction: float = 0.2,
    seed: int = 0,
    max_train_samples: int | None = None,
    max_test_samples: int | None = None,
    synthetic_train_size: int = 4000,
    synthetic_test_size: int = 1000,
) -> TextClassificationData:
    """Load a text-classification dataset as plain lists and int64 label arrays (module docstring
    lists the sources). ``test_fraction`` is split off (seeded shuffle) only when the source has no
    test split; ``max_*_samples`` take a seeded subsample of a split, keeping all classes in
    ``label_names``."""
    if not (isinstance(test_fraction, (int, float)) and 0.0 < test_fraction < 1.0):
        raise DataError(f"test_fraction must be strictly between 0 and 1, got {test_fraction!r}")
    for key, value in (("max_train_samples", max_train_samples), ("max_test_samples", max_test_samples)):
        if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
            raise DataError(f"{key} must be a positive integer or None, got {value!r}")

    if path is not None:
        data = _load_local(Path(path), text_field, label_field, test_fraction, seed)
    elif name == "synthetic":
        data = make_synthetic(synthetic_train_size, synthetic_test_size, seed)
    elif not name:
        raise DataError("data.name is empty: use 'synthetic', a Hugging Face dataset id, or set data.path")
    else:
        data = _load_hub(name, text_field, label_field, test_fraction, seed)

    rng = np.random.default_rng([seed, 1])  # its own stream, so subsampling does not shift the split
    data.train_texts, data.train_labels = _subsample(data.train_texts, data.train_labels, max_train_samples, rng)
    data.test_texts, data.test_labels = _subsample(data.test_texts, data.test_labels, max_test_samples, rng)
    return data


def _subsample(texts: list[str], labels: np.ndarray, limit: int | None, rng: np.random.Generator):
    if limit is None or limit >= len(texts):
        return texts, labels
    keep = np.sort(rng.choice(len(texts), size=int(limit), replace=False))
    return [texts[i] for i in keep], labels[keep]


def _find_split_file(directory: Path, stem: str) -> Path | None:
    found = [directory / f"{stem}{ext}" for ext in SUPPORTED_EXTENSIONS if (directory / f"{stem}{ext}").is_file()]
    if len(found) > 1:
        raise DataError(f"{directory} has more than one {stem} file ({', '.join(p.name for p in found)}); keep one")
    return found[0] if found else None


def _load_local(path: Path, text_field: str, label_field: str, test_fraction: float, seed: int) -> TextClassificationData:
    if not path.exists():
        raise DataError(f"data path {path} does not exist")
    if path.is_dir():
        train_file = _find_split_file(path, "train")
        test_file = next((f for stem in TEST_SPLIT_NAMES if (f := _find_split_file(path, stem))), None)
        if train_file is None:
            candidates = sorted(p for p in path.iterdir() if p.suffix.lower() in SUPPORTED_EXTENSIONS)
            if len(candidates) != 1:
                raise DataError(
                    f"directory {path} needs a train.csv/.jsonl/.json/.parquet file (or exactly one data file); "
                    f"found {[p.name for p in candidates] or 'none'}"
                )
            train_file, test_file = candidates[0], None
        names_file = path / "label_names.json"
    else:
        train_file, test_file, names_file = path, None, path.parent / "label_names.json"

    train = _read_file(train_file, text_field, label_field)
    test = _read_file(test_file, text_field, label_field) if test_file is not None else None
    known_names = _read_label_names(names_file) if names_file.is_file() else None
    return _assemble(str(path), train, test, label_field, known_names, False, test_fraction, seed)


def _read_file(file: Path, text_field: str, label_field: str) -> tuple[list, list]:
    builder = SUPPORTED_EXTENSIONS.get(file.suffix.lower())
    if builder is None:
        raise DataError(f"unsupported data file {file.name}: use one of {', '.join(SUPPORTED_EXTENSIONS)}")
    if file.stat().st_size == 0:
        raise DataError(f"{file} is empty")
    import datasets
    import datasets.utils

    bars_were_on = not datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()  # a local file loads in a blink; its bars are only noise
    try:
        ds = datasets.load_dataset(builder, data_files=str(file), split="train")
    except Exception as e:  # the builders raise many types (ArrowInvalid, DatasetGenerationError, ...)
        if "corresponds to no data" in str(e):  # a header-only csv
            raise DataError(f"{file} has no rows") from e
        raise DataError(f"could not read {file}: {_one_line(e)}") from e
    finally:
        if bars_were_on:
            datasets.utils.enable_progress_bars()
    if ds.num_rows == 0:
        raise DataError(f"{file} has no rows")
    return _columns(ds, text_field, label_field, str(file))


def _columns(ds: Any, text_field: str, label_field: str, where: str) -> tuple[list, list]:
    for role, field in (("text_field", text_field), ("label_field", label_field)):
        if field not in ds.column_names:
            raise DataError(f"{role} '{field}' is not a column of {where}; available columns: {ds.column_names}")
    texts = ds.data.column(text_field).to_pylist()
    labels = ds.data.column(label_field).to_pylist()
    return ["" if t is None else str(t) for t in texts], labels


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


def _load_hub(name: str, text_field: str, label_field: str, test_fraction: float, seed: int) -> TextClassificationData:
    import datasets

    try:
        with _offline_from_env():
            splits = datasets.load_dataset(name)
    except Exception as e:
        raise DataError(
            f"dataset '{name}' could not be loaded from the Hugging Face hub (offline and not cached?): {_one_line(e)}"
        ) from e
    if not isinstance(splits, datasets.DatasetDict) or len(splits) == 0:
        raise DataError(f"dataset '{name}' has no splits")
    if "train" in splits:
        train_ds = splits["train"]
    elif len(splits) == 1:
        train_ds = next(iter(splits.values()))
    else:
        raise DataError(f"dataset '{name}' has no 'train' split; splits: {list(splits)}")

    feature = train_ds.features.get(label_field)
    known_names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
    train = _columns(train_ds, text_field, label_field, f"dataset '{name}'")
    test = None
    for split in TEST_SPLIT_NAMES:  # some benchmarks (GLUE) ship an unlabeled test split (-1): skip those
        if split in splits and split != "train":
            candidate = _columns(splits[split], text_field, label_field, f"dataset '{name}' split '{split}'")
            if not all(v == -1 for v in candidate[1]):
                test = candidate
                break
    return _assemble(f"dataset '{name}'", train, test, label_field, known_names, True, test_fraction, seed)


def _assemble(where: str, train: tuple[list, list], test: tuple[list, list] | None, label_field: str,
              known_names: list[str] | None, names_are_exact: bool, test_fraction: float,
              seed: int) -> TextClassificationData:
    """Encode labels over train and test together (so both share one id space), then split off a
    test set if there is none."""
    train_texts, train_raw = train
    test_texts, test_raw = test if test is not None else ([], [])
    if not train_texts:
        raise DataError(f"{where} has no rows")
    if test is not None and not test_texts:
        raise DataError(f"the test split of {where} has no rows")
    labels, names = _encode_labels(train_raw + test_raw, label_field, where, known_names)
    if len(np.unique(labels)) < 2:
        raise DataError(f"{where} has fewer than 2 classes in '{label_field}'; classification needs at least 2")
    train_labels, test_labels = labels[: len(train_texts)], labels[len(train_texts):]

    if test is None:
        n = len(train_texts)
        if n < 2:
            raise DataError(f"{where} has only {n} row; need at least 2 to split off a test set")
        n_test = min(max(int(round(n * test_fraction)), 1), n - 1)
        order = np.random.default_rng(seed).permutation(n)
        test_idx, train_idx = np.sort(order[:n_test]), np.sort(order[n_test:])
        test_texts, test_labels = [train_texts[i] for i in test_idx], train_labels[test_idx]
        train_texts, train_labels = [train_texts[i] for i in train_idx], train_labels[train_idx]
    return TextClassificationData(train_texts, train_labels, test_texts, test_labels, names)


def _encode_labels(raw: list, label_field: str, where: str, known_names: list[str] | None) -> tuple[np.ndarray, list[str]]:
    """Integer labels are class ids (named by ``known_names`` when given, else "0", "1", ...); any
    other labels are names, mapped to ids in sorted order (or in ``known_names`` order when that
    lists them all)."""
    missing = sum(v is None for v in raw)
    if missing:
        raise DataError(f"{missing} rows of {where} have no value in label field '{label_field}'")

    def is_int(v: Any) -> bool:
        return (isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))) or (
            isinstance(v, float) and v.is_integer())

    if all(is_int(v) for v in raw):
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


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    text = lines[0] if lines else type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


# --------------------------------------------------------------------------------------------------
# Partitioning across clients
# --------------------------------------------------------------------------------------------------


def partition(labels: np.ndarray, num_clients: int, kind: str = "dirichlet", alpha: float = 0.3,
              min_size: int = 1, seed: int = 0, max_tries: int = 1000) -> list[np.ndarray]:
    """Split sample indices across ``num_clients``: one sorted int64 index array per client, together
    covering every index exactly once; the same seed gives the same split.

    ``"iid"``: a seeded shuffle cut into near-equal parts (sizes differ by at most 1).
    ``"dirichlet"``: the label-Dirichlet split of Hsu et al. 2019 as implemented in FedLab/FedML: for
    each class draw proportions p ~ Dir(alpha * 1) over clients and cut the class's shuffled indices
    at those proportions; clients already holding more than n / num_clients samples get no share of
    later classes (keeps client sizes from running away). The whole draw is repeated (up to
    ``max_tries`` fresh draws) until every client has at least ``min_size`` samples. Smaller alpha
    gives each client fewer dominant classes; large alpha approaches iid.
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
            f"cannot give each of {num_clients} clients at least min_size={min_size} samples from a dataset of {n}"
        )
    rng = np.random.default_rng(seed)

    if kind == "iid":
        return [np.sort(part).astype(np.int64) for part in np.array_split(rng.permutation(n), num_clients)]

    if not (isinstance(alpha, (int, float, np.floating)) and math.isfinite(alpha) and alpha > 0):
        raise DataError(f"dirichlet alpha must be a finite number > 0, got {alpha!r}")
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        sizes = np.zeros(num_clients, dtype=np.int64)
        for idx in by_class:
            idx = rng.permutation(idx)
            p = rng.dirichlet(np.full(num_clients, float(alpha)))
            p = p * (sizes < n / num_clients)
            if not p.sum() > 0:  # tiny alpha can put all mass on full clients; spread over the rest
                p = (sizes < n / num_clients).astype(float)
            cuts = (np.cumsum(p / p.sum()) * len(idx)).astype(np.int64)[:-1]
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].append(chunk)
                sizes[client] += len(chunk)
        if sizes.min() >= min_size:
            return [np.sort(np.concatenate(chunks)).astype(np.int64) for chunks in parts]
    raise DataError(
        f"no Dirichlet(alpha={alpha}) split of a dataset of {n} samples gave each of {num_clients} clients "
        f"at least min_size={min_size} samples in {max_tries} draws; raise alpha, lower min_size or use fewer clients"
    )


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


def tokenize(texts: list[str], tokenizer: Any, max_length: int, chunk_size: int = 4096) -> dict[str, np.ndarray]:
    """Pad/truncate to exactly ``max_length`` with the tokenizer's batch call, in chunks so a large
    dataset never holds more than one chunk's Python encodings at a time."""
    if max_length < 1:
        raise DataError(f"max_length must be >= 1, got {max_length}")
    out: dict[str, list[np.ndarray]] = {"input_ids": [], "attention_mask": []}
    for start in range(0, len(texts), chunk_size):
        enc = tokenizer(list(texts[start:start + chunk_size]), padding="max_length", truncation=True,
                        max_length=max_length, return_tensors="np")
        for key in out:
            out[key].append(np.asarray(enc[key], dtype=np.int64))
    return {key: np.concatenate(chunks) if chunks else np.zeros((0, max_length), dtype=np.int64)
            for key, chunks in out.items()}
