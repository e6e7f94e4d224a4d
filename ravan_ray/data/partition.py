"""Splitting a dataset's examples across clients: iid, or label-Dirichlet (Hsu, Qi, Brown 2019, arXiv 1909.06335;
Dirichlet(0.3) is the non-IID split of Raje et al. 2025, arXiv 2506.05568)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from ravan_ray.data.errors import DataError

if TYPE_CHECKING:
    import pandas as pd

PARTITION_KINDS = ("iid", "dirichlet")
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
    # Imported here, not at the top: every actor imports this module, and none needs pandas (0.4 s a process).
    import pandas as pd

    labels = np.asarray(labels)
    counts = np.stack([np.bincount(labels[p], minlength=num_classes)[:num_classes] for p in parts]) if parts \
        else np.zeros((0, num_classes), dtype=np.int64)
    return pd.DataFrame(counts.astype(np.int64), index=pd.RangeIndex(len(parts), name="client"),
                        columns=list(range(num_classes)))
