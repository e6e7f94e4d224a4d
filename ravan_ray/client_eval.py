"""Per-client evaluation (``federation.client_eval``): how the global model does on each client's own data.

The global test split says how the average client fares; personalisation and fairness papers (pfl-research,
q-FFL, Ditto) also report the clients that fare worst. Each client's rows are split once, before training, into
the rows it trains on and ``data.client_test_fraction`` of them held out as its own test rows (a seeded draw per
client, so the split is a function of (config, seed)). Every evaluation round the server evaluates the global
model on every client's held-out rows: metrics.csv gets, for the task's primary metric m,

- ``client_{m}_mean``: the mean over clients (each client counts once, whatever its size);
- ``client_{m}_p10``: the worst-off tenth's boundary: the 10th percentile over clients of a metric where higher
  is better (accuracy), the 90th of one where lower is (a loss), numpy's linear interpolation;
- ``client_{m}_std``: the standard deviation over clients (population, ddof 0);

and client_metrics.csv one row per (round, client) with every metric the task writes, its held-out rows and the
seconds its evaluation took (``eval_s``, wall clock: the cost of per-client evaluation, within metrics.csv's eval_s).

Nothing here imports Ray: the server calls :func:`evaluate_clients` with its model host.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ravan_ray.data import DataError

#: the key under which the server's evaluation returns the per-client rows (taken out before metrics.csv)
CLIENT_METRICS_KEY = "client_metrics"
STATISTICS = ("mean", "p10", "std")
_HOLD_OUT_STREAM = 0xC11E


def client_columns(metric: str) -> list[str]:
    """metrics.csv's per-client columns of a task metric: client_test_accuracy_mean, _p10, _std."""
    return [f"client_{metric}_{statistic}" for statistic in STATISTICS]


def hold_out(parts: list[np.ndarray], fraction: float, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(training rows, held-out test rows) of each client: round(fraction x its rows) of them, at least one and
    at most all but one, drawn from (seed, client). A client with a single row cannot have both: one line names
    such clients."""
    too_small = [client for client, rows in enumerate(parts) if len(rows) < 2]
    if too_small:
        shown = ", ".join(map(str, too_small[:10])) + (", ..." if len(too_small) > 10 else "")
        raise DataError(f"federation.client_eval holds out part of every client's rows, but clients {shown} have "
                        f"fewer than 2; use data.partition.min_size >= 2")
    train, test = [], []
    for client, rows in enumerate(parts):
        count = min(len(rows) - 1, max(1, int(round(fraction * len(rows)))))
        shuffled = np.random.default_rng([seed, client, _HOLD_OUT_STREAM]).permutation(rows)
        test.append(np.sort(shuffled[:count]))
        train.append(np.sort(shuffled[count:]))
    return train, test


def summarize(per_client: list[dict[str, Any]], metric: str, direction: str) -> dict[str, float]:
    """The per-client columns of ``metric`` (module docstring) from each client's metrics."""
    values = np.array([row[metric] for row in per_client], dtype=float)
    if not len(values):
        return {}
    worst_tenth = 10 if direction == "max" else 90
    mean, p10, std = (float(values.mean()), float(np.percentile(values, worst_tenth)), float(values.std()))
    return dict(zip(client_columns(metric), (mean, p10, std)))


def evaluate_clients(host: Any, state: Any, datas: list[dict[str, np.ndarray]], batch_size: int,
                     metric: str, direction: str) -> dict[str, Any]:
    """The global model ``state`` on each client's held-out rows (``datas[c]``: its rows of the training arrays,
    which the task evaluates as it does its test split): the per-client columns and, under
    :data:`CLIENT_METRICS_KEY`, one row per client."""
    rows = []
    for client, data in enumerate(datas):
        started = time.perf_counter()
        metrics = host.evaluate(state, data, batch_size)
        rows.append({"client": client, "rows": len(next(iter(data.values()))), **metrics,
                     "eval_s": time.perf_counter() - started})  # wall clock: what the evaluation costs
    return {**summarize(rows, metric, direction), CLIENT_METRICS_KEY: rows}
