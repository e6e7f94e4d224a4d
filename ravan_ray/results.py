"""The run directory's result files: metrics.csv (one row per round) and summary.json.

Both are rewritten whole through a temporary file and ``os.replace`` every round, so a crash or a kill
leaves the previous complete file, never a half-written one.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

# metrics.csv's columns: these, with the task's own metrics (Task.metrics: test_accuracy and test_loss
# for classification, test_exact_match and test_f1 for QA, ...) after train_loss.
ROUND_COLUMNS = ["round", "wall_s", "round_s", "train_loss"]
FEDERATION_COLUMNS = [
    "uplink_bytes", "downlink_bytes", "agg_error", "effective_rank", "clients", "heads_trained",
    "failed_clients", "dropped_clients", "rejected_uploads", "server_restarts", "agg_s", "eval_s",
    # differential privacy (empty without it): epsilon spent so far at privacy.delta, the share of clients (client
    # mode) or examples (sample mode) whose norm exceeded the clip norm this round, that clip norm, and (client mode)
    # the median norm of the clients' updates before clipping: a diagnostic for choosing the clip norm, not noised
    "epsilon", "clip_fraction", "clip_norm", "update_norm",
]
DEFAULT_TASK_METRICS = {"test_accuracy": "max", "test_loss": "min"}
COUNT_COLUMNS = {"round", "uplink_bytes", "downlink_bytes", "clients", "failed_clients", "dropped_clients",
                 "rejected_uploads", "server_restarts"}
# Columns that measure time: they differ between otherwise identical runs.
TIMING_COLUMNS = ("wall_s", "round_s", "agg_s", "eval_s")


VALIDATION_PREFIX = "val_"


def validation_name(metric: str) -> str:
    """The validation split's column of a task metric: test_accuracy -> val_accuracy."""
    return VALIDATION_PREFIX + metric.removeprefix("test_")


def with_validation(task_metrics: dict[str, str]) -> dict[str, str]:
    """The task's metrics followed by their validation twins (same direction: higher or lower is better)."""
    return {**task_metrics, **{validation_name(m): direction for m, direction in task_metrics.items()}}


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _cell(key: str, value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if key in COUNT_COLUMNS:
        return int(value)  # a resumed run reads them back as floats; write them the same either way
    return value


def metric_columns(task_metrics: Iterable[str] = DEFAULT_TASK_METRICS) -> list[str]:
    return [*ROUND_COLUMNS, *task_metrics, *FEDERATION_COLUMNS]


def write_metrics(path: str | Path, rows: Iterable[dict[str, Any]],
                  task_metrics: Iterable[str] = DEFAULT_TASK_METRICS) -> None:
    columns = metric_columns(task_metrics)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: _cell(key, row.get(key)) for key in columns})
    atomic_write_text(path, buffer.getvalue())


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """metrics.csv back as dicts of floats (empty cells -> NaN); round as int."""
    with open(path, newline="") as handle:
        rows = []
        for raw in csv.DictReader(handle):
            row = {k: (float(v) if v != "" else math.nan) for k, v in raw.items()}
            row["round"] = int(row["round"])
            rows.append(row)
        return rows


def write_table(path: str | Path, records: list[dict[str, Any]]) -> None:
    """A per-client log (clients.csv): columns are the union of the records' keys."""
    atomic_write_text(path, pd.DataFrame.from_records(records).to_csv(index=False) if records else "")


def read_table(path: str | Path, before_round: int) -> list[dict[str, Any]]:
    """The records of an earlier attempt at a run, up to (not including) ``before_round``."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return []
    frame = pd.read_csv(path)
    return frame[frame["round"] < before_round].to_dict("records")


def summarize(config: Any, rows: list[dict[str, Any]], wall_s: float, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """summary.json: the task's metrics (final = last evaluated round, best = best evaluated round by the
    metric's own direction: highest accuracy, lowest loss), traffic, time and fault counts. ``metric``
    names the task's primary metric, by which reports and sweeps rank runs. A run with a validation split
    has ``final_val_*`` / ``best_val_*`` beside them (the val_* columns of metrics.csv)."""
    from ravan_ray.tasks import task_class

    task = task_class(config.model.task)
    summary: dict[str, Any] = {"method": config.method.name, "task": task.name, "metric": task.primary_metric}
    metrics = task.metrics
    if any(not _missing(r.get(validation_name(task.primary_metric))) for r in rows):
        metrics = with_validation(task.metrics)
    for name, direction in metrics.items():
        values = [r[name] for r in rows if not _missing(r.get(name))]
        summary[f"final_{name}"] = values[-1] if values else None
        summary[f"best_{name}"] = (max(values) if direction == "max" else min(values)) if values else None
    summary.update({
        "rounds": len(rows),
        "total_uplink_bytes": int(sum(r.get("uplink_bytes") or 0 for r in rows)),
        "total_downlink_bytes": int(sum(r.get("downlink_bytes") or 0 for r in rows)),
        "wall_s": wall_s,
        "failed_clients": int(sum(r.get("failed_clients") or 0 for r in rows)),
        "dropped_clients": int(sum(r.get("dropped_clients") or 0 for r in rows)),
        "rejected_uploads": int(sum(r.get("rejected_uploads") or 0 for r in rows)),
    })
    if getattr(config, "privacy", None) is not None:
        from ravan_ray.privacy import build_mechanism

        spent = [r["epsilon"] for r in rows if not _missing(r.get("epsilon"))]
        summary.update(build_mechanism(config).summary(spent[-1] if spent else None))
    summary.update(extra or {})
    return summary


def write_summary(path: str | Path, summary: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(summary, indent=2, default=float) + "\n")


def _missing(value: Any) -> bool:
    return value is None or value == "" or (isinstance(value, float) and math.isnan(value))
