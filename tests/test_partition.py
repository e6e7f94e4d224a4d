"""The partitioners FL papers compare with by flwr-datasets' names: each one's shape (classes per client, sizes,
natural ids), determinism, agreement with flwr-datasets on the same labels and seed, and bad values as one line
with exit code 2 through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ravan_ray.cli import main
from ravan_ray.data import DataError, make_synthetic, partition
from ravan_ray.data.partition import PARTITION_KINDS

from conftest import TINY_OVERRIDES

RECORDED = json.loads((Path(__file__).parent / "golden" / "flwr_partitions.json").read_text())
# (labels, clients, keys) of each split recorded with flwr-datasets (tests/golden/record_flwr_partitions.py)
FLWR_CASES = {
    "iid": ("labels", 8, {"kind": "iid"}),
    "pathological_2": ("labels", 8, {"kind": "pathological", "classes_per_client": 2}),
    "pathological_3": ("labels", 12, {"kind": "pathological", "classes_per_client": 3}),
    "shard": ("labels", 8, {"kind": "shard", "shards_per_client": 2}),
    "natural": ("users", 7, {"kind": "natural"}),
    "inner_dirichlet": ("labels", 8, {"kind": "inner_dirichlet", "alpha": 0.5}),
    "linear": ("labels", 6, {"kind": "linear"}),
    "square": ("labels", 6, {"kind": "square"}),
    "exponential": ("labels", 4, {"kind": "exponential"}),
}


def ours(case: str) -> list[np.ndarray]:
    column, clients, keys = FLWR_CASES[case]
    return partition(np.array(RECORDED[column]), clients, seed=RECORDED["seed"], min_size=1, **keys)


@pytest.mark.parametrize("case", FLWR_CASES)
def test_each_split_holds_the_rows_flwr_datasets_gives_on_the_same_labels_and_seed(case):
    # iid and the quantity skews are flwr-datasets' on the dataset in our seeded shuffle (it leaves shuffling to the
    # dataset); Dirichlet has no flwr-datasets twin: ours is FedLab's and stays as it was (tests/golden/)
    assert [part.tolist() for part in ours(case)] == RECORDED["splits"][case]


@pytest.mark.parametrize("case", ["pathological_2", "shard", "natural", "inner_dirichlet", "square"])
def test_the_live_flwr_datasets_agrees_too_where_it_is_installed(case):
    partitioner = pytest.importorskip("flwr_datasets.partitioner")
    from datasets import Dataset

    labels, users, seed = np.array(RECORDED["labels"]), np.array(RECORDED["users"]), RECORDED["seed"]
    theirs = {
        "pathological_2": lambda: partitioner.PathologicalPartitioner(8, "label", 2, seed=seed),
        "shard": lambda: partitioner.ShardPartitioner(8, "label", num_shards_per_partition=2, seed=seed),
        "natural": lambda: partitioner.NaturalIdPartitioner("user"),
        "inner_dirichlet": lambda: partitioner.InnerDirichletPartitioner(
            [len(p) for p in np.array_split(labels, 8)], "label", 0.5, seed=seed),
        "square": lambda: partitioner.SquarePartitioner(6),
    }[case]()
    order = np.random.default_rng(seed).permutation(len(labels)) if case == "square" else np.arange(len(labels))
    theirs.dataset = Dataset.from_dict({"idx": order, "label": labels[order], "user": users[order]})
    assert [p.tolist() for p in ours(case)] == [sorted(theirs.load_partition(i)["idx"])
                                                for i in range(theirs.num_partitions)]


# ------------------------------------------------------------------ hand-checked small cases
def test_pathological_gives_each_client_exactly_its_classes_and_cuts_a_shared_class_in_client_order():
    labels = np.repeat(np.arange(5), 12)
    parts = partition(labels, 6, "pathological", classes_per_client=2, min_size=1, seed=1)
    assert all(len(np.unique(labels[p])) == 2 for p in parts)
    # the draws are flwr-datasets': each client's rng.choice(classes, 2, replace=False), in client order
    rng = np.random.default_rng(1)
    drawn = [set(rng.choice(np.arange(5), 2, replace=False).tolist()) for _ in range(6)]
    assert [set(np.unique(labels[p]).tolist()) for p in parts] == drawn
    for c in range(5):  # a class held by k clients: k consecutive near-equal runs of its rows, the first client first
        holders = [i for i in range(6) if c in drawn[i]]
        runs = [parts[i][labels[parts[i]] == c] for i in holders]
        assert np.concatenate(runs).tolist() == np.flatnonzero(labels == c).tolist()
        assert max(map(len, runs)) - min(map(len, runs)) <= 1


def test_shard_sorts_by_label_cuts_whole_shards_and_leaves_the_remainder_out():
    labels = np.array([3, 1, 2, 0, 1, 3, 2, 0, 0, 1, 2])  # 11 rows, 2 clients x 2 shards: shards of 2, 3 rows left
    parts = partition(labels, 2, "shard", shards_per_client=2, min_size=1, seed=0)
    by_label = np.argsort(labels, kind="stable")
    chosen = np.random.default_rng(0).permutation(11 // 2)[:4]
    assert [p.tolist() for p in parts] == [sorted(by_label[[r for s in own for r in (2 * s, 2 * s + 1)]].tolist())
                                           for own in np.split(chosen, 2)]
    assert sum(map(len, parts)) == 8


def test_natural_makes_one_client_per_distinct_value_in_sorted_order():
    users = np.array([7, 3, 7, 9, 3, 3])
    assert [p.tolist() for p in partition(users, 3, "natural", min_size=1)] == [[1, 4, 5], [0, 2], [3]]


def test_natural_with_another_client_count_says_the_count_in_one_line():
    with pytest.raises(DataError, match=r"has 3 in the training rows; set federation.num_clients=3 \(it is 2\)"):
        partition(np.array([7, 3, 7, 9, 3, 3]), 2, "natural", min_size=1, column="column 'user'")


@pytest.mark.parametrize("kind,shares", [("linear", [1, 2, 3, 4]), ("square", [1, 4, 9, 16])])
def test_quantity_skew_sizes_follow_the_clients_index_and_labels_stay_iid(kind, shares):
    parts = partition(np.zeros(100, dtype=int), 4, kind, min_size=1, seed=2)
    expected = (np.array(shares) / sum(shares) * 100).astype(int)
    expected[-1] += 100 - expected.sum()
    assert [len(p) for p in parts] == expected.tolist()
    shuffle = np.random.default_rng(2).permutation(100)  # iid's own shuffle, cut in consecutive blocks
    assert [p.tolist() for p in parts] == [sorted(b.tolist()) for b in np.split(shuffle, np.cumsum(expected)[:-1])]


def test_exponential_skew_grows_each_client_by_a_factor_e():
    sizes = [len(p) for p in partition(np.zeros(10_000, dtype=int), 5, "exponential", min_size=1)]
    assert all(2.6 < b / a < 2.85 for a, b in zip(sizes, sizes[1:]))


def test_inner_dirichlet_gives_equal_sizes_with_skewed_label_mixes():
    labels = np.repeat(np.arange(10), 100)
    parts = partition(labels, 10, "inner_dirichlet", alpha=0.1, min_size=1, seed=4)
    assert [len(p) for p in parts] == [100] * 10
    top_share = [np.bincount(labels[p], minlength=10).max() / len(p) for p in parts]
    assert np.mean(top_share) > 0.4  # alpha 0.1: a dominant class per client (iid would give ~0.15)


# ------------------------------------------------------------------ properties of every kind
LABELS = make_synthetic(600, 12, seed=0).train_labels


@pytest.mark.parametrize("kind", [k for k in PARTITION_KINDS if k not in ("natural", "exponential")])
def test_every_split_is_a_function_of_the_seed_disjoint_and_sorted(kind):
    first = partition(LABELS, 10, kind, min_size=1, seed=11)
    assert all(np.array_equal(a, b) for a, b in zip(first, partition(LABELS, 10, kind, min_size=1, seed=11)))
    assert any(not np.array_equal(a, b) for a, b in zip(first, partition(LABELS, 10, kind, min_size=1, seed=12)))
    rows = np.concatenate(first)
    assert len(rows) == len(np.unique(rows)) and all(np.all(np.diff(p) > 0) for p in first)
    assert all(p.dtype == np.int64 for p in first)
    if kind not in ("pathological", "shard"):  # the two that may leave rows out (as flwr-datasets does)
        assert len(rows) == len(LABELS)


@settings(max_examples=30, deadline=None)
@given(k=st.integers(1, 5), clients=st.integers(2, 12), seed=st.integers(0, 10_000))
def test_pathological_holds_at_most_k_classes_per_client_and_exactly_k_where_every_class_has_rows(k, clients, seed):
    labels = np.repeat(np.arange(6), 20)
    parts = partition(labels, clients, "pathological", classes_per_client=k, min_size=1, seed=seed)
    assert all(len(np.unique(labels[p])) == k for p in parts)


@settings(max_examples=30, deadline=None)
@given(shards_per_client=st.integers(1, 4), clients=st.integers(1, 10), seed=st.integers(0, 10_000))
def test_every_shard_client_holds_the_same_number_of_rows(shards_per_client, clients, seed):
    parts = partition(LABELS, clients, "shard", shards_per_client=shards_per_client, min_size=1, seed=seed)
    size = len(LABELS) // (clients * shards_per_client)
    assert [len(p) for p in parts] == [size * shards_per_client] * clients


def test_a_client_below_min_size_is_named_with_what_to_change():
    with pytest.raises(DataError) as error:
        partition(np.zeros(1000, dtype=int), 8, "square", min_size=8)
    message = str(error.value)
    assert "the square split leaves 1 of 8 clients with fewer than data.partition.min_size=8 rows: client 0 (4)" \
        in message and "data.partition.kind=linear" in message and "\n" not in message


def test_classes_per_client_beyond_the_classes_is_one_line():
    with pytest.raises(DataError, match="classes_per_client=13 is more than the 12 classes of the labels"):
        partition(LABELS, 4, "pathological", classes_per_client=13, min_size=1)


# ------------------------------------------------------------------ through the CLI: one line, exit code 2
def run_cli(tmp_path, *overrides: str) -> int:
    args = [arg for o in [*TINY_OVERRIDES, *overrides] for arg in ("--set", o)]
    return main(["run", *args, "--output", str(tmp_path / "run")])


@pytest.fixture
def users_data(tmp_path):
    """The synthetic task as local JSONL files with a natural id: a ``user`` column of 4 values."""
    data = make_synthetic(240, 60, seed=0)
    folder = tmp_path / "users"
    folder.mkdir()
    for split, texts, labels in (("train", data.train_texts, data.train_labels),
                                 ("test", data.test_texts, data.test_labels)):
        with open(folder / f"{split}.jsonl", "w") as out:
            for i, (text, label) in enumerate(zip(texts, labels)):
                out.write(json.dumps({"text": text, "label": int(label), "user": f"user{i % 4}"}) + "\n")
    return folder


@pytest.mark.parametrize("overrides,says", [
    (("data.partition.kind=pathological", "data.partition.classes_per_client=13"),
     "data.partition.classes_per_client=13 is more than the 12 classes of the class label in the training rows; "
     "use at most 12"),
    (("data.partition.kind=natural",), "data.partition.kind=natural needs data.partition.label_field"),
    (("data.partition.kind=exponential", "federation.num_clients=6"),
     "the exponential split leaves"),
])
def test_a_bad_partition_setting_is_one_line_and_exit_code_2(tmp_path, capsys, overrides, says):
    assert run_cli(tmp_path, *overrides) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err, err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_a_missing_natural_id_column_is_one_line_and_exit_code_2(tmp_path, capsys, users_data):
    assert run_cli(tmp_path, f"data.path={users_data}", "data.partition.kind=natural",
                   "data.partition.label_field=author", "federation.num_clients=4") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "data.partition.label_field 'author' is not a column" in err, err


def test_a_natural_split_with_another_client_count_is_one_line_with_the_count(tmp_path, capsys, users_data):
    assert run_cli(tmp_path, f"data.path={users_data}", "data.partition.kind=natural",
                   "data.partition.label_field=user", "federation.num_clients=6") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "column 'user', which has 4 in the training rows; set " \
        "federation.num_clients=4 (it is 6)" in err, err


def test_a_natural_split_runs_one_client_per_user_and_draws_the_partition(ray_session, tiny_config, tmp_path,
                                                                          users_data):
    import pandas as pd

    from ravan_ray.federation import prepare_data, run_federation

    config = tiny_config(f"data.path={users_data}", "data.partition.kind=natural", "data.partition.label_field=user",
                         "federation.num_clients=4", "federation.rounds=1")
    data = prepare_data(config)
    users = np.array([f"user{i % 4}" for i in range(240)])
    assert [set(users[rows].tolist()) for rows in data.partitions] == [{f"user{u}"} for u in range(4)]
    run_federation(config, tmp_path / "run")
    assert (tmp_path / "run" / "partition.png").stat().st_size > 0
    assert pd.read_csv(tmp_path / "run" / "client_budgets.csv")["samples"].tolist() == [60] * 4
