"""Record flwr-datasets' splits of fixed labels into flwr_partitions.json, which tests/test_partition.py compares
ravan_ray.data.partition's splits with (flwr-datasets is not a dependency: it pins datasets < 5).

Run in a separate environment: python3.11 -m venv /tmp/flwr && /tmp/flwr/bin/pip install flwr-datasets==0.6.1 &&
/tmp/flwr/bin/python tests/golden/record_flwr_partitions.py"""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path

import numpy as np
from datasets import Dataset
from flwr_datasets.partitioner import (ExponentialPartitioner, IidPartitioner, InnerDirichletPartitioner,
                                       LinearPartitioner, NaturalIdPartitioner, PathologicalPartitioner,
                                       ShardPartitioner, SquarePartitioner)

N, CLASSES, SEED = 500, 10, 5
labels = np.random.default_rng(123).integers(0, CLASSES, N)
users = np.random.default_rng(321).integers(0, 7, N)


def split(partitioner, order=None) -> list[list[int]]:
    """Each partition's row indices (of ``labels``), sorted; ``order``: the dataset handed over is the rows in this
    order (the shuffle flwr-datasets leaves to the dataset)."""
    order = np.arange(N) if order is None else order
    partitioner.dataset = Dataset.from_dict({"idx": order.tolist(), "label": labels[order].tolist(),
                                             "user": users[order].tolist()})
    return [sorted(partitioner.load_partition(i)["idx"]) for i in range(partitioner.num_partitions)]


shuffle = np.random.default_rng(SEED).permutation(N)  # ravan_ray's seeded shuffle of iid and the quantity skews
sizes = [len(p) for p in np.array_split(np.arange(N), 8)]
record = {
    "flwr_datasets": version("flwr-datasets"), "seed": SEED, "labels": labels.tolist(), "users": users.tolist(),
    "splits": {
        "iid": split(IidPartitioner(8), shuffle),
        "pathological_2": split(PathologicalPartitioner(8, "label", 2, seed=SEED)),
        "pathological_3": split(PathologicalPartitioner(12, "label", 3, seed=SEED)),
        "shard": split(ShardPartitioner(8, "label", num_shards_per_partition=2, seed=SEED)),
        "natural": split(NaturalIdPartitioner("user")),
        "inner_dirichlet": split(InnerDirichletPartitioner(sizes, "label", 0.5, seed=SEED)),
        "linear": split(LinearPartitioner(6), shuffle),
        "square": split(SquarePartitioner(6), shuffle),
        "exponential": split(ExponentialPartitioner(4), shuffle),
    },
}
(Path(__file__).parent / "flwr_partitions.json").write_text(json.dumps(record) + "\n")
