"""Reading runs: find the run directories below the given paths, and read each one's config, summary and
metric rows into one table of runs and one of rounds."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import pandas as pd

from ravan_ray.config import RESOLVED_KEY, ConfigError, read_yaml

RUN_FILES = ("metrics.csv", "config.yaml", "summary.json")
TRAFFIC_COLUMNS = ["total_uplink_bytes", "total_downlink_bytes", "wall_s"]
LOWER_IS_BETTER = ("loss", "perplexity")  # metric name endings that are not fractions shown in %
#: The mark of a score whose method did not read the clients' compute levels under a mix that gives some below the
#: full budget (summary.json's ``budget_aware``: false), and the footnote that says so.
IGNORED_MIX_MARK = "†"
IGNORED_MIX_NOTE = (f"{IGNORED_MIX_MARK} The method does not read compute levels (summary.json `budget_aware`: false): "
                    "every client trained its full budget whatever the budget mix gave it.")


class ReportError(ConfigError):
    """Nothing to report on, or unreadable run files; one line for the user."""



def display(value) -> str:
    """A config value as shown in tables and labels; a missing one (None/NaN, e.g. a key one run leaves
    unset) as "-"."""
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def displayed(values):
    """:func:`display` over a pandas Series or DataFrame."""
    return values.map(display)

def find_runs(dirs: list[Path]) -> list[Path]:
    """Run directories at or below each given directory, each once, in path order."""
    found: dict[Path, None] = {}
    for root in dirs:
        root = Path(root)
        if not root.exists():
            raise ReportError(f"no such directory: {root}")
        candidates = [root / "metrics.csv"] + sorted(root.rglob("metrics.csv")) if root.is_dir() else []
        for metrics in candidates:
            run = metrics.parent
            if all((run / name).is_file() for name in RUN_FILES):
                found.setdefault(run.resolve(), None)
    return list(found)


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, path + "."))
        else:  # lists (levels, target modules, explicit mixes) as text, so they can be grouped on
            flat[path] = json.dumps(value) if isinstance(value, list) else value
    return flat


def method_record(config: dict[str, Any]) -> dict[str, Any]:
    """What the run's method recorded about itself (config.yaml's ``resolved.method``: ranks, the adapted layers'
    shapes [d_out, d_in] and per-matrix budgets N, ...)."""
    return (config.get(RESOLVED_KEY) or {}).get("method") or {}


def _narrowest_layer(record: dict[str, Any]) -> Optional[str]:
    shapes = record.get("layer_shapes")
    return min(shapes, key=lambda name: min(shapes[name])) if isinstance(shapes, dict) and shapes else None


def model_dim(config: dict[str, Any]) -> Optional[int]:
    """d: the adapted matrices' dimension (min(d_in, d_out), the rank ceiling) of the narrowest adapted layer,
    as the method recorded it; for a run without that record, the model's hidden size where its config is
    available offline (None otherwise: the heads plot then goes without its marker)."""
    record = method_record(config)
    layer = _narrowest_layer(record)
    if layer is not None:
        return int(min(record["layer_shapes"][layer]))
    from ravan_ray.models import offline_hidden_size

    return offline_hidden_size((config.get("model") or {}).get("name"))


def per_matrix_budget(config: dict[str, Any], d: Optional[int]) -> Optional[int]:
    """N of the narrowest adapted layer, as the method recorded it (``budget_per_matrix``); for a run without
    that record, the budget rule every method shares (ravan_ray/methods/budget.py) on a d x d matrix."""
    record = method_record(config)
    recorded = record.get("budget_per_matrix")
    if isinstance(recorded, dict) and _narrowest_layer(record) in recorded:
        return int(recorded[_narrowest_layer(record)])
    from ravan_ray.methods.budget import per_matrix_budget as shared_rule

    method = config.get("method") or {}
    settings = SimpleNamespace(budget=method.get("budget"), lora_rank=method.get("lora_rank"))
    if settings.budget or (settings.lora_rank and d):
        return shared_rule(settings, d, d)
    return None


def ignored_mix(config: dict[str, Any], summary: dict[str, Any]) -> bool:
    """True when the run's method did not read compute levels (``budget_aware`` false; for a run from before the
    flag, what its method says now) while its mix gave some client a level below the full budget."""
    aware = summary.get("budget_aware")
    if aware is None:
        from ravan_ray.methods import method_class

        try:
            aware = method_class(str((config.get("method") or {}).get("name"))).budget_aware
        except ValueError:  # a method this version does not know: nothing to say about it
            return False
    if aware:
        return False
    from ravan_ray.budgets import mix_proportions

    compute = config.get("compute") or {}
    levels = compute.get("levels") or [1.0]
    try:
        proportions = mix_proportions(compute.get("distribution", "homogeneous"), levels)
    except ValueError:
        return False
    return any(share > 0 and level < 1 for share, level in zip(proportions, levels))


def others_options(config: dict[str, Any]) -> set[str]:
    """The method options in a run's config that its own method does not read: config.yaml lists every registered
    method's options with their defaults, and a table must not say FedIT ran with Ravan's ``init: normal``
    (they are read as unset, "-"). Nothing is dropped for a method this version does not know."""
    from ravan_ray.config import registered_options

    options = registered_options("method")
    own = options.get(str((config.get("method") or {}).get("name")))
    if own is None:
        return set()
    return {key for model in options.values() for key in model.model_fields} - set(own.model_fields)


def read_runs(run_dirs: list[Path], common_root: Optional[Path] = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(runs: one row per run with its flattened config and summary, rounds: metrics.csv rows of all runs)."""
    runs, rounds = [], []
    for run_dir in run_dirs:
        try:
            config = read_yaml(run_dir / "config.yaml")
            summary = json.loads((run_dir / "summary.json").read_text())
            metrics = pd.read_csv(run_dir / "metrics.csv")
        except (ConfigError, OSError, ValueError) as error:
            raise ReportError(f"cannot read run {run_dir}: {' '.join(str(error).split())}") from None
        for name, content in (("config.yaml", config), ("summary.json", summary)):
            if not isinstance(content, dict):  # valid YAML / JSON, but a list or a number, not a run's record
                raise ReportError(f"cannot read run {run_dir}: {run_dir / name} holds a {type(content).__name__}, "
                                  f"not a mapping of names to values")
        label = str(run_dir.relative_to(common_root)) if common_root and run_dir.is_relative_to(common_root) \
            else str(run_dir)
        d = model_dim(config)
        row = {"run": label, "run_dir": str(run_dir)}
        row.update(_flatten({k: v for k, v in config.items() if k != RESOLVED_KEY}))
        row.update({f"method.{key}": None for key in others_options(config)})
        if row.get("optimizer.lr") is None:  # unset: the method's default, which the run recorded
            row["optimizer.lr"] = method_record(config).get("lr")
        row.update({k: summary.get(k) for k in ("rounds", "total_uplink_bytes", "total_downlink_bytes", "wall_s")})
        row["metric"] = summary.get("metric", "test_accuracy")  # runs from before tasks had a metric name
        row.update({k: v for k, v in summary.items() if k.startswith(("final_", "best_"))})
        row["final_score"], row["best_score"] = summary.get(f"final_{row['metric']}"), summary.get(f"best_{row['metric']}")
        row["d_model"] = d
        row["ignored_mix"] = ignored_mix(config, summary)
        row["budget_per_matrix"] = per_matrix_budget(config, d)
        runs.append(row)
        metrics.insert(0, "run", label)
        rounds.append(metrics)
    runs_df = pd.DataFrame(runs)
    for column in [c for c in runs_df.columns if c.startswith(("final_", "best_"))] + TRAFFIC_COLUMNS:
        runs_df[column] = pd.to_numeric(runs_df[column], errors="coerce")
    return runs_df, pd.concat(rounds, ignore_index=True)


def score_name(runs: pd.DataFrame) -> str:
    """The metric the tables rank by: the runs' common primary metric, or "score" when tasks differ."""
    metrics = runs["metric"].dropna().unique()
    return str(metrics[0]) if len(metrics) == 1 else "score"


def in_percent(metric: str, runs: pd.DataFrame) -> bool:
    """Accuracies, exact match and F1 are fractions, shown in %; losses and perplexities keep their scale.
    A mixed "score" is in % when none of the runs' primary metrics is a loss."""
    names = runs["metric"].dropna().unique() if metric == "score" else [metric]
    return not any(str(name).endswith(LOWER_IS_BETTER) for name in names)


def metric_label(metric: str, percent: bool) -> str:
    """"test_accuracy" -> "test accuracy %"."""
    return metric.replace("_", " ") + (" %" if percent else "")


def task_metrics(runs: pd.DataFrame) -> list[str]:
    """Every metric a run's summary has a final value of, the score first."""
    names = [c.removeprefix("final_") for c in runs.columns if c.startswith("final_") and c != "final_score"]
    return sorted(set(names), key=names.index)
