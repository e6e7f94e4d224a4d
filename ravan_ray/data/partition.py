"""Splitting a dataset's examples across clients: iid, label-Dirichlet (Hsu, Qi,
Brown 2019, arXiv 1909.06335; Dirichlet(0.3) is the non-IID split of Raje et al. 2025, arXiv 2506.05568), and the partitioners
federated-learning papers name after flwr-datasets (Flower's dataset library): pathological k classes per client,
shards, natural ids, inner Dirichlet, and linear / square / exponential quantity skew.

Why not flwr-datasets itself: it works on Hugging Face ``Dataset`` objects, needs Python >= 3.11 and pins
``datasets < 5`` (installing it downgrades the ``datasets`` this package runs on), and it neither enforces a minimum
client size nor says which client fell short. The algorithms are short; they are written here on numpy label
arrays, making flwr-datasets' random draws in its order from ``numpy.random.default_rng(seed)``, so that on the same
labels and seed a split here holds the same rows as flwr-datasets' (tests/test_partition.py checks this against
splits recorded with flwr-datasets 0.6.1). ``iid`` and ``dirichlet`` are this platform's own and unchanged."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import numpy as np

from ravan_ray.data.errors import DataError

if TYPE_CHECKING:
    import pandas as pd

#: Kinds that split by the label array (the task's classes, or the column data.partition.label_field names); the
#: others need no labels. natural makes one client per distinct value of that array.
LABEL_KINDS = ("dirichlet", "pathological", "shard", "inner_dirichlet", "natural")
#: Quantity skew (flwr-datasets' Linear / Square / ExponentialPartitioner): client i (1-based) holds a share of the
#: rows proportional to f(i), labels iid.
QUANTITY_SKEW = {"linear": lambda x: x, "square": np.square, "exponential": np.exp}
PARTITION_KINDS = ("iid", "dirichlet", "pathological", "shard", "natural", "inner_dirichlet", *QUANTITY_SKEW)
#: What a split that leaves rows to no client leaves out (the driver says so in one line).
LEFT_OUT = {"pathological": "the rows of classes no client drew", "shard": "the rows after the last whole shard"}
DIRICHLET_TRIES = 200  # fresh draws before a min_size that no draw meets is reported (about a second for 1,000 clients)


def partition(labels: np.ndarray, num_clients: int, kind: str = "dirichlet", alpha: float = 0.3,
              min_size: int = 1, seed: int = 0, max_tries: int = DIRICHLET_TRIES, classes_per_client: int = 2,
              shards_per_client: int = 2, column: str = "the labels") -> list[np.ndarray]:
    """Split sample indices across ``num_clients``: one sorted int64 index array per client; the same seed gives
    the same split. ``iid``, ``dirichlet``, ``natural``, ``inner_dirichlet`` and the quantity skews give every index
    to exactly one client; ``pathological`` leaves out the classes no client drew and ``shard`` the rows after the
    last whole shard (as flwr-datasets does). ``column``: what the labels are, for messages ("column 'user'").

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
    The others: see :func:`pathological`, :func:`shards`, :func:`natural`, :func:`inner_dirichlet`,
    :func:`quantity_skew`. A client left with fewer than ``min_size`` rows is one error naming the clients and
    what to change.
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
    if kind != "dirichlet":
        if kind == "pathological":
            parts = pathological(labels, num_clients, classes_per_client, rng, column)
        elif kind == "shard":
            parts = shards(labels, num_clients, shards_per_client, rng)
        elif kind == "natural":
            parts = natural(labels, num_clients, column)
        elif kind == "inner_dirichlet":
            _check_alpha(alpha, kind)
            parts = inner_dirichlet(labels, num_clients, float(alpha), rng)
        else:
            parts = quantity_skew(n, num_clients, QUANTITY_SKEW[kind], rng)
        parts = [np.sort(np.asarray(part, dtype=np.int64)) for part in parts]
        check_sizes(parts, min_size, kind, column)
        return parts

    _check_alpha(alpha, kind)
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


def _check_alpha(alpha: float, kind: str) -> None:
    if not (isinstance(alpha, (int, float, np.floating)) and math.isfinite(alpha) and alpha > 0):
        raise DataError(f"{kind} alpha must be a finite number > 0, got {alpha!r}")


def pathological(labels: np.ndarray, num_clients: int, classes_per_client: int, rng: np.random.Generator,
                 column: str = "the labels") -> list[np.ndarray]:
    """Each client draws ``classes_per_client`` distinct classes uniformly at random (flwr-datasets'
    PathologicalPartitioner, class_assignment_mode="random"; the k-classes-per-client split of McMahan et al.
    2017 / Li et al. 2022's "#C=k"); each class's rows (in index order) are cut into near-equal consecutive parts,
    one per client that drew it, in client order. Classes no client drew are left out."""
    classes = np.unique(labels)
    if not isinstance(classes_per_client, (int, np.integer)) or classes_per_client < 1:
        raise DataError(f"data.partition.classes_per_client must be a positive integer, got {classes_per_client!r}")
    if classes_per_client > len(classes):
        raise DataError(f"data.partition.classes_per_client={classes_per_client} is more than the {len(classes)} "
                        f"classes of {column} in the training rows; use at most {len(classes)}")
    drawn = [rng.choice(classes, size=classes_per_client, replace=False) for _ in range(num_clients)]
    holders = {c: [client for client in range(num_clients) if c in drawn[client]] for c in classes.tolist()}
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c, clients in holders.items():
        rows = np.flatnonzero(labels == c)
        if len(clients) > len(rows):
            raise DataError(f"the pathological split gives class {c!r} of {column} to {len(clients)} clients but it "
                            f"has {len(rows)} rows; use fewer clients or fewer data.partition.classes_per_client")
        for client, chunk in zip(clients, np.array_split(rows, len(clients)) if clients else []):
            parts[client].append(chunk)
    return [np.concatenate(p) if p else np.zeros(0, dtype=np.int64) for p in parts]


def shards(labels: np.ndarray, num_clients: int, shards_per_client: int, rng: np.random.Generator) -> list[np.ndarray]:
    """McMahan et al. 2017's shards (flwr-datasets' ShardPartitioner with num_shards_per_partition): the rows sorted
    by label (stably), cut into shards of n // (num_clients x shards_per_client) rows, each client given
    ``shards_per_client`` shards drawn at random without replacement. The rows after the last whole shard (fewer
    than num_clients x shards_per_client) are left out."""
    if not isinstance(shards_per_client, (int, np.integer)) or shards_per_client < 1:
        raise DataError(f"data.partition.shards_per_client must be a positive integer, got {shards_per_client!r}")
    n, used = len(labels), num_clients * shards_per_client
    size = n // used
    if size < 1:
        raise DataError(f"the shard split needs {used} shards (num_clients x data.partition.shards_per_client) of "
                        f"at least one row but the training rows are {n}; use fewer clients or shards per client")
    by_label = np.argsort(labels, kind="stable")
    chosen = rng.permutation(n // size)[:used]
    return [np.concatenate([by_label[s * size:(s + 1) * size] for s in own])
            for own in np.split(chosen, num_clients)]


def natural(labels: np.ndarray, num_clients: int, column: str = "the labels") -> list[np.ndarray]:
    """One client per distinct value of the labels (a user, an author, a source dataset: flwr-datasets'
    NaturalIdPartitioner), the values in sorted order: client i holds the rows of the i-th smallest value."""
    values, owner = np.unique(labels, return_inverse=True)
    if len(values) != num_clients:
        raise DataError(f"data.partition.kind=natural makes one client per distinct value of {column}, which has "
                        f"{len(values)} in the training rows; set federation.num_clients={len(values)} "
                        f"(it is {num_clients})")
    order = np.argsort(owner, kind="stable")
    return np.split(order, np.cumsum(np.bincount(owner, minlength=len(values)))[:-1])


def inner_dirichlet(labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Equal-sized clients (sizes differ by at most one row, the first n % num_clients one larger) whose label mix
    is drawn from Dir(alpha) per client (flwr-datasets' InnerDirichletPartitioner, after Yurochkin et al. / FedLab's
    balanced Dirichlet): row by row, a random client that still has room draws a class from its own prior; a class
    whose rows are used up is taken out of every prior. A client whose prior only had used-up classes left draws
    uniformly among the remaining ones (flwr-datasets would fail there on a 0/0). About 2 n random draws: a second
    for 10,000 rows."""
    classes, class_of = np.unique(labels, return_inverse=True)
    k, n = len(classes), len(labels)
    sizes = [len(part) for part in np.array_split(np.arange(n), num_clients)]
    priors = rng.dirichlet(np.full(k, alpha), size=num_clients)
    by_class = [np.flatnonzero(class_of == c) for c in range(k)]
    left_in_class = [len(rows) for rows in by_class]
    rows_of = [np.zeros(size, dtype=np.int64) for size in sizes]
    left = dict(enumerate(sizes))
    open_clients = list(range(num_clients))
    while sum(left.values()) != 0:
        client = int(rng.choice(open_clients))
        if left[client] == 0:
            open_clients.remove(client)
            continue
        left[client] -= 1
        probabilities = priors[client]
        while True:
            c = int(rng.choice(list(range(k)), p=probabilities))
            if left_in_class[c] == 0:
                priors[:, c] = 0
                totals = priors.sum(axis=1, keepdims=True)
                empty = totals[:, 0] == 0
                priors[empty] = np.asarray(left_in_class) > 0  # only used-up classes left in its prior
                priors = priors / priors.sum(axis=1, keepdims=True)
                probabilities = priors[client]
                continue
            left_in_class[c] -= 1
            rows_of[client][left[client]] = by_class[c][left_in_class[c]]
            break
    return rows_of


def quantity_skew(n: int, num_clients: int, size_of: Callable[[np.ndarray], np.ndarray],
                  rng: np.random.Generator) -> list[np.ndarray]:
    """Quantity skew, labels iid (flwr-datasets' Linear / Square / ExponentialPartitioner): client i (0-based)
    holds a share f(i + 1) / sum_j f(j + 1) of the rows, truncated to whole rows, the remainder to the last (largest)
    client; its rows are consecutive in a seeded shuffle (the shuffle of ``iid``: flwr-datasets leaves shuffling to
    the dataset beforehand)."""
    units = size_of(np.linspace(1, num_clients, num_clients))
    sizes = np.array(units / units.sum() * n, dtype=np.int64)
    sizes[-1] += n - sizes.sum()
    return np.split(rng.permutation(n), np.cumsum(sizes)[:-1])


def check_sizes(parts: list[np.ndarray], min_size: int, kind: str, column: str = "the labels") -> None:
    """One line naming the clients with fewer than ``min_size`` rows, and what would give them more."""
    small = [(client, len(rows)) for client, rows in enumerate(parts) if len(rows) < max(min_size, 1)]
    if not small:
        return
    hint = {
        "pathological": "more data.partition.classes_per_client or fewer clients",
        "shard": "fewer clients or fewer data.partition.shards_per_client",
        "natural": f"another column than {column} (a value with few rows is a small client)",
        "inner_dirichlet": "fewer clients",
        "linear": "fewer clients", "square": "data.partition.kind=linear or fewer clients",
        "exponential": "data.partition.kind=linear or square, or fewer clients",
    }.get(kind, "fewer clients")
    shown = ", ".join(f"client {client} ({size})" for client, size in small[:10]) + (", ..." if len(small) > 10 else "")
    smallest = min(size for _, size in small)
    raise DataError(f"the {kind} split leaves {len(small)} of {len(parts)} clients with fewer than "
                    f"data.partition.min_size={max(min_size, 1)} rows: {shown}; use {hint}"
                    + (f", or data.partition.min_size <= {smallest}" if smallest > 0 else ""))


def label_histogram(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> pd.DataFrame:
    """Samples per class (columns 0..num_classes-1) held by each client (rows, index "client")."""
    # Imported here, not at the top: every actor imports this module, and none needs pandas (0.4 s a process).
    import pandas as pd

    labels = np.asarray(labels)
    counts = np.stack([np.bincount(labels[p], minlength=num_classes)[:num_classes] for p in parts]) if parts \
        else np.zeros((0, num_classes), dtype=np.int64)
    return pd.DataFrame(counts.astype(np.int64), index=pd.RangeIndex(len(parts), name="client"),
                        columns=list(range(num_classes)))
