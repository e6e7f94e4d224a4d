"""The run directory's result files: metrics.csv (one row per round), clients.csv and summary.json, and the
:class:`RunLog` that writes them as a run's rounds finish.

Each is rewritten whole through a temporary file and ``os.replace`` every round, so a crash or a kill
leaves the previous complete file, never a half-written one.
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import math
import os
import sys
import contextlib
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from ravan_ray.methods import method_columns


# metrics.csv's columns: these, with the task's own metrics (Task.metrics: test_accuracy and test_loss
# for classification, test_exact_match and test_f1 for QA, ...) after train_loss, and the registered methods' own
# (FederatedMethod.metrics_columns: Ravan's heads_trained) after clients.
ROUND_COLUMNS = ["round", "wall_s", "round_s", "train_loss"]
FEDERATION_COLUMNS = ["uplink_bytes", "downlink_bytes", "agg_error", "effective_rank", "clients"]
OUTCOME_COLUMNS = [
    "failed_clients", "dropped_clients", "rejected_uploads", "server_restarts", "agg_s", "eval_s",
    # differential privacy (empty without it): epsilon spent so far at privacy.delta, the share of clients (client
    # mode) or examples (sample mode) whose norm exceeded the clip norm this round, that clip norm, and (client mode)
    # the median norm of the clients' updates before clipping: a diagnostic for choosing the clip norm, not noised
    "epsilon", "clip_fraction", "clip_norm", "update_norm",
]
DEFAULT_TASK_METRICS = {"test_accuracy": "max", "test_loss": "min"}
COUNT_COLUMNS = {"round", "uplink_bytes", "downlink_bytes", "clients", "failed_clients", "dropped_clients",
                 "rejected_uploads", "server_restarts", "offline_clients", "late_clients"}
# Columns that measure time: they differ between otherwise identical runs.
TIMING_COLUMNS = ("wall_s", "round_s", "agg_s", "eval_s")


VALIDATION_PREFIX = "val_"
CLIENT_METRICS_FILE = "client_metrics.csv"  # federation.client_eval's per-(round, client) rows


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


def metric_columns(task_metrics: Iterable[str] = DEFAULT_TASK_METRICS, extra: Iterable[str] = ()) -> list[str]:
    """metrics.csv's columns; ``extra``: those of the features a run turns on (the simulated system's,
    ravan_ray/system.py), after the federation's and the methods'."""
    return [*ROUND_COLUMNS, *task_metrics, *FEDERATION_COLUMNS, *method_columns(), *extra, *OUTCOME_COLUMNS]


def write_metrics(path: str | Path, rows: Iterable[dict[str, Any]],
                  task_metrics: Iterable[str] = DEFAULT_TASK_METRICS, extra: Iterable[str] = ()) -> None:
    columns = metric_columns(task_metrics, extra)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: _cell(key, row.get(key)) for key in columns})
    atomic_write_text(path, buffer.getvalue())


class RunFilesError(ValueError):
    """A run directory's result files are damaged, or another run is writing to it; one line."""


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """metrics.csv back as dicts of floats (empty cells -> NaN); round as int. A damaged file (a row cut
    mid-line, a cell that is not a number) raises :class:`RunFilesError` naming the file and line."""
    with open(path, newline="") as handle:
        rows = []
        reader = csv.DictReader(handle)
        for raw in reader:
            try:
                if None in raw or None in raw.values():  # a row with too many or too few cells
                    raise ValueError("wrong number of cells")
                row = {k: (float(v) if v != "" else math.nan) for k, v in raw.items()}
                row["round"] = int(row["round"])
            except ValueError as error:
                raise RunFilesError(f"{path} is damaged at line {reader.line_num} ({error})") from None
            rows.append(row)
        return rows


def write_table(path: str | Path, records: list[dict[str, Any]]) -> None:
    """A per-client log (clients.csv): columns are the union of the records' keys."""
    import pandas as pd  # here, not at the top: the server actor imports this module and needs no pandas (0.4 s)

    atomic_write_text(path, pd.DataFrame.from_records(records).to_csv(index=False) if records else "")


def read_table(path: str | Path, before_round: int) -> list[dict[str, Any]]:
    """The records of an earlier attempt at a run, up to (not including) ``before_round``."""
    import pandas as pd  # as in write_table

    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return []
    try:
        frame = pd.read_csv(path)
    except (ValueError, pd.errors.ParserError) as error:
        raise RunFilesError(f"{path} is damaged ({' '.join(str(error).split())})") from None
    if "round" not in frame.columns:
        raise RunFilesError(f"{path} is damaged (no round column)")
    return frame[frame["round"] < before_round].to_dict("records")


def summarize(config: Any, rows: list[dict[str, Any]], wall_s: float, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """summary.json: the task's metrics (final = last evaluated round, best = best evaluated round by the
    metric's own direction: highest accuracy, lowest loss), traffic, time and fault counts. ``metric``
    names the task's primary metric, by which reports and sweeps rank runs. A run with a validation split
    has ``final_val_*`` / ``best_val_*`` beside them (the val_* columns of metrics.csv)."""
    from ravan_ray.tasks import task_class

    from ravan_ray.client_eval import client_columns

    task = task_class(config.model.task)
    summary: dict[str, Any] = {"method": config.method.name, "task": task.name, "metric": task.primary_metric}
    summary.update(method_facts(config))
    metrics = task.metrics
    if any(not _missing(r.get(validation_name(task.primary_metric))) for r in rows):
        metrics = with_validation(task.metrics)
    mean, p10, std = client_columns(task.primary_metric)
    if any(not _missing(r.get(mean)) for r in rows):  # federation.client_eval (its spread: a final value only)
        metrics = {**metrics, mean: task.metrics[task.primary_metric], p10: task.metrics[task.primary_metric]}
    for name, direction in metrics.items():
        values = [r[name] for r in rows if not _missing(r.get(name))]
        summary[f"final_{name}"] = values[-1] if values else None
        summary[f"best_{name}"] = (max(values) if direction == "max" else min(values)) if values else None
    if mean in metrics:
        values = [r[std] for r in rows if not _missing(r.get(std))]
        summary[f"final_{std}"] = values[-1] if values else None
    summary.update({
        "rounds": len(rows),
        "total_uplink_bytes": int(sum(r.get("uplink_bytes") or 0 for r in rows)),
        "total_downlink_bytes": int(sum(r.get("downlink_bytes") or 0 for r in rows)),
        "wall_s": wall_s,
        "failed_clients": int(sum(r.get("failed_clients") or 0 for r in rows)),
        "dropped_clients": int(sum(r.get("dropped_clients") or 0 for r in rows)),
        "rejected_uploads": int(sum(r.get("rejected_uploads") or 0 for r in rows)),
    })
    if getattr(config, "system", None) is not None and config.system.active:  # the simulated devices' totals
        summary.update({k: int(sum(_count(r.get(k)) for r in rows)) for k in ("offline_clients", "late_clients")})
        summary["simulated_s"] = float(sum(_count(r.get("simulated_round_s")) for r in rows))
    if getattr(config, "privacy", None) is not None:
        from ravan_ray.privacy import build_mechanism

        spent = [r["epsilon"] for r in rows if not _missing(r.get("epsilon"))]
        summary.update(build_mechanism(config).summary(spent[-1] if spent else None))
    summary.update(extra or {})
    return summary


def method_facts(config: Any) -> dict[str, Any]:
    """What a report needs to read a run's row right: whether its method read the clients' compute levels
    (``budget_aware``: false means every client trained alike, whatever ``compute.distribution`` said) and the
    client weighting its server used (``aggregation_weights``: the configured one or the method's reference's)."""
    from ravan_ray.methods import method_class

    method = method_class(config.method.name)
    return {"budget_aware": method.budget_aware, "aggregation_weights": method.aggregation_weighting(config)}


def write_summary(path: str | Path, summary: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(summary, indent=2, default=float) + "\n")


def _count(value: Any) -> float:
    return 0.0 if _missing(value) else value


def _missing(value: Any) -> bool:
    return value is None or value == "" or (isinstance(value, float) and math.isnan(value))


LOCK_FILE = ".lock"


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold the run directory for one writer: a second run or resume on it is refused instead of overwriting
    the first's files. An flock dies with its process, so a killed run leaves no lock behind; the pid written
    into the lock file only names the holder in the message."""
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    try:
        with _locked(run_dir, path):
            yield
    finally:
        if created and [p.name for p in run_dir.iterdir()] == [LOCK_FILE]:  # refused before it wrote anything
            with contextlib.suppress(OSError):  # another process took the directory over meanwhile
                path.unlink()
                run_dir.rmdir()


@contextlib.contextmanager
def _locked(run_dir: Path, path: Path) -> Iterator[None]:
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise RunFilesError(f"{run_dir} is in use by another run (pid {holder}); wait for it to end or use "
                                f"another --output") from None
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class RunLog:
    """A run's record as its rounds finish: each finished round's row appended to metrics.csv, its clients'
    attempts to clients.csv, summary.json rewritten, the row sent to the experiment trackers
    (ravan_ray/trackers.py), and the progress line (a bar on a terminal; one line per round on stderr without
    one, as in a Ray job or CI, unless TQDM_DISABLE is set)."""

    def __init__(self, config: Any, run_dir: Path, task_metrics: Iterable[str], first_round: int = 1,
                 checkpoint_rows: Optional[list[dict[str, Any]]] = None, trackers: Any = None):
        from ravan_ray.tasks import task_class

        self.config, self.run_dir, self.task_metrics = config, Path(run_dir), list(task_metrics)
        self.trackers = trackers  # ravan_ray.trackers.Trackers: the experiment trackers, or None
        self.first_round = first_round
        self.rows = self._earlier_rows(checkpoint_rows)
        self.clients = read_table(self.run_dir / "clients.csv", before_round=first_round)
        # federation.client_eval: one row per (round, client) of the per-client evaluation (client_metrics.csv)
        self.client_metrics = read_table(self.run_dir / CLIENT_METRICS_FILE, before_round=first_round)
        from ravan_ray.system import system_columns

        self.extra_columns = system_columns(config)
        self.wall_offset = self.rows[-1]["wall_s"] if self.rows else 0.0
        primary = task_class(config.model.task).primary_metric
        self.shown = [(_progress_name(primary), primary)]  # the progress line's score

    def start(self) -> None:
        """The rounds begin: open the trackers' runs, start the clock (wall_s leaves out setting up data, model
        and actors) and the progress line."""
        from tqdm.auto import tqdm

        if self.trackers:  # before the clock starts: opening a tracker's run is not the run's time
            self.trackers.start(self.config)
        self.started = time.perf_counter()
        self.progress = tqdm(total=self.config.federation.rounds, initial=self.first_round - 1,
                             desc=self.config.method.name, unit="round", disable=None)

    def _earlier_rows(self, checkpoint_rows: Optional[list[dict[str, Any]]]) -> list[dict[str, Any]]:
        """The rows of the rounds before ``first_round`` that a resumed run continues: those its checkpoint
        holds (metrics.csv may have lost rows since, or be gone), else metrics.csv's, which must then hold
        every one of them: a resumed run never continues a shorter history."""
        if self.first_round == 1:
            return []
        if checkpoint_rows is not None:
            return [row for row in checkpoint_rows if row["round"] < self.first_round]
        metrics = self.run_dir / "metrics.csv"
        rows = [r for r in read_metrics(metrics) if r["round"] < self.first_round] if metrics.exists() else []
        if [r["round"] for r in rows] != list(range(1, self.first_round)):
            raise RunFilesError(f"{metrics} lacks rows of rounds 1-{self.first_round - 1}, which its checkpoint "
                                f"(written before checkpoints kept them) cannot restore; start the run again")
        return rows

    def record(self, row: dict[str, Any], client_log: list[dict[str, Any]], server_restarts: int) -> None:
        """Add a finished round (its row gets the run's wall clock and the server restarts so far); ``write``
        puts it in the files."""
        from ravan_ray.client_eval import CLIENT_METRICS_KEY

        row["wall_s"] = self.wall_offset + time.perf_counter() - self.started
        row["server_restarts"] = server_restarts
        self.client_metrics.extend({"round": row["round"], **entry} for entry in row.pop(CLIENT_METRICS_KEY, ()))
        self.rows.append(row)
        self.clients.extend(client_log)

    def write_files(self) -> None:
        """Rewrite metrics.csv, clients.csv and summary.json with the rounds recorded so far."""
        write_metrics(self.run_dir / "metrics.csv", self.rows, self.task_metrics, self.extra_columns)
        write_table(self.run_dir / "clients.csv", self.clients)
        if self.client_metrics:
            write_table(self.run_dir / CLIENT_METRICS_FILE, self.client_metrics)
        write_summary(self.run_dir / "summary.json", self.summary())

    def write(self) -> None:
        """Rewrite the files with the rounds recorded so far, and show the last one on the progress line."""
        row = self.rows[-1]
        self.write_files()
        if self.trackers:
            self.trackers.log_round(row)
        self.progress.update(1)
        self.progress.set_postfix(loss=f"{row['train_loss']:.3f}",
                                  **{short: _fmt(row.get(m)) for short, m in self.shown})
        if self.progress.disable and not os.environ.get("TQDM_DISABLE"):  # no terminal (a Ray job, CI)
            scores = " ".join(f"{short} {_fmt(row.get(m))}" for short, m in self.shown)
            print(f"{self.config.method.name} round {row['round']}/{self.config.federation.rounds} loss "
                  f"{row['train_loss']:.3f} {scores} ({row['round_s']:.1f} s)", file=sys.stderr, flush=True)

    def rewind(self, next_round: int) -> None:
        """Forget the rounds from ``next_round`` on (they are played again after a server restart)."""
        self.rows = [r for r in self.rows if r["round"] < next_round]
        self.clients = [entry for entry in self.clients if entry["round"] < next_round]
        self.client_metrics = [entry for entry in self.client_metrics if entry["round"] < next_round]
        self.progress.n = next_round - 1

    def summary(self) -> dict[str, Any]:
        return summarize(self.config, self.rows, self.rows[-1]["wall_s"] if self.rows else 0.0)

    def finish(self) -> None:
        """Every round is in: the trackers get the summary and the run's files (curves.png drawn for them)."""
        if self.trackers:
            self.trackers.finish(self.summary())

    def close(self) -> None:
        """The run ends, finished or not: trackers not finished by then log a failed run."""
        self.progress.close()
        if self.trackers:
            self.trackers.abort()


def _progress_name(metric: str) -> str:
    """The progress line's name of a task's primary metric ("loss" is the round's training loss)."""
    return {"test_accuracy": "acc", "test_exact_match": "em", "test_f1": "f1"}.get(metric, metric)


def _fmt(value: Any) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"
