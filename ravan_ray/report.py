"""``ravan-ray report DIR [DIR ...]``: tables and plots over run and sweep directories.

Every directory holding ``metrics.csv``, ``config.yaml`` and ``summary.json`` below the given paths is
one run (a single ``ravan-ray run``, or a trial's ``run/`` inside a sweep). Runs are grouped by the
config keys that differ between them, seeds aside; each group gets the mean, the sample standard
deviation (ddof = 1, empty for a single seed) and the number of seeds n. Written to the output directory:

- ``report.md``: the tables ("mean ± std (n)" of the runs' score, in % for accuracies, exact match and F1)
  and the plots;
- ``report.csv``: one row per group (the numbers behind the tables); ``runs.csv``: one row per run;
- PNGs: the score per round (mean over seeds, ±1 std band), the final score by budget mix (grouped
  bars), the score's gain over the fewest heads vs heads with the point where sqrt(N h) = d marked, and
  the aggregated update's effective rank per round. A plot whose grouping has fewer than two values is
  skipped, with a note in report.md.

The score is each run's task's primary metric (summary.json's ``metric``: ``test_accuracy`` for
classification and seq2seq, ``test_f1`` for question answering, ``test_loss`` for instruction tuning);
every other metric its task writes is a column of "All configurations" too. When the runs are of tasks
with different primary metrics, the score columns are named ``score`` and each configuration's task says
which metric it is.

Selection (``--select KEY``, e.g. ``optimizer.lr``): the runs need a validation split (``val_*`` metrics,
``data.validation_fraction``). For every configuration of the other differing keys, the tuned value with
the best mean over seeds of the validation twin of the score is chosen (:func:`choose` is only given
validation numbers), and that configuration's test score is reported (mean ± std, n seeds), the paper's
protocol; ``selected.csv`` and ``candidates.csv`` hold the numbers. The top two per column are compared
per seed with a Student-t interval (scipy.stats.t) on the mean paired difference.

For the heads plot, N is the per-matrix trainable budget and d the adapted matrices' dimension, read from
the run's ``resolved.method`` record (``budget_per_matrix``, ``layer_shapes``) when the driver wrote them
there, else N from the config (``method.budget``, or r_L (d_in + d_out) for ``method.lora_rank``) and d
from the model (``tiny-bert``: 32, ``minilm``: 384, or the Hugging Face config's hidden size when it is
available offline).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd

from ravan_ray.config import RESOLVED_KEY, ConfigError, read_yaml
from ravan_ray.results import validation_name

RUN_FILES = ("metrics.csv", "config.yaml", "summary.json")
# Keys that never change what a run computes (or are its identity): not used to tell configurations apart.
IGNORED_PREFIXES = ("resources.", "output.")
IGNORED_KEYS = {"seed", "name", "federation.eval_batch_size"}
SHORT_NAMES = {
    "method.name": "method", "compute.distribution": "budget mix", "data.partition.kind": "partition",
    "data.partition.alpha": "alpha", "method.heads": "heads", "method.init": "init",
    "method.scoring": "scoring", "method.scaling": "scaling", "method.lora_rank": "lora rank",
    "method.budget": "budget", "optimizer.lr": "lr", "model.name": "model", "data.name": "data",
}
KNOWN_DIMS = {"tiny-bert": 32, "minilm": 384}
TRAFFIC_COLUMNS = ["total_uplink_bytes", "total_downlink_bytes", "wall_s"]
LOWER_IS_BETTER = ("loss", "perplexity")  # metric name endings that are not fractions shown in %
# (title, the keys that form the table's rows); the other differing keys become its columns.
TABLES = [  # "score" in a title becomes the score's name ("test accuracy")
    ("Final score per task", ["model.task"]),
    ("Final score per method", ["method.name"]),
    ("Final score per budget mix and method", ["compute.distribution"]),
    ("Final score per number of heads", ["method.heads"]),
    ("Final score per initialisation", ["method.init"]),
    ("Final score per head scoring", ["method.scoring"]),
    ("Final score per scaling", ["method.scaling"]),
    ("Final score per data partition", ["data.partition.kind", "data.partition.alpha"]),
]


class ReportError(ConfigError):
    """Nothing to report on, or unreadable run files; one line for the user."""


# ------------------------------------------------------------------------------------------------ reading

def _display(value) -> str:
    """A config value as shown in tables and labels; a missing one (None/NaN, e.g. a key one run leaves
    unset) as "-"."""
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def _text(values):
    """:func:`_display` over a pandas Series or DataFrame."""
    return values.map(_display)

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


def model_dim(config: dict[str, Any]) -> Optional[int]:
    """d: the adapted matrices' dimension (min(d_in, d_out), the rank ceiling)."""
    resolved = config.get(RESOLVED_KEY) or {}
    for section in (resolved.get("method") or {}, resolved.get("model") or {}, resolved):
        shapes = section.get("layer_shapes")
        if isinstance(shapes, dict) and shapes:
            return int(min(min(shape) for shape in shapes.values()))
        for key in ("d_model", "hidden_size"):
            if isinstance(section.get(key), (int, float)):
                return int(section[key])
    name = (config.get("model") or {}).get("name")
    if name in KNOWN_DIMS:
        return KNOWN_DIMS[name]
    try:
        from transformers import AutoConfig

        hf = AutoConfig.from_pretrained(name, local_files_only=True)
        return int(getattr(hf, "hidden_size", None) or getattr(hf, "d_model", None) or hf.n_embd)
    except Exception:  # not available offline: the heads plot then goes without its marker
        return None


def per_matrix_budget(config: dict[str, Any], d: Optional[int]) -> Optional[int]:
    """N, as the driver recorded it (``resolved.method.budget_per_matrix``) or from the config."""
    recorded = ((config.get(RESOLVED_KEY) or {}).get("method") or {}).get("budget_per_matrix")
    if isinstance(recorded, (int, float)):
        return int(recorded)
    method = config.get("method") or {}
    if method.get("budget"):
        return int(method["budget"])
    if method.get("lora_rank") and d:
        return int(method["lora_rank"]) * 2 * d  # r_L (d_in + d_out) for the square q / v projections
    return None


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
        label = str(run_dir.relative_to(common_root)) if common_root and run_dir.is_relative_to(common_root) \
            else str(run_dir)
        d = model_dim(config)
        row = {"run": label, "run_dir": str(run_dir)}
        row.update(_flatten({k: v for k, v in config.items() if k != RESOLVED_KEY}))
        if row.get("optimizer.lr") is None:  # unset: the method's default, which the run recorded
            row["optimizer.lr"] = (config.get(RESOLVED_KEY) or {}).get("method", {}).get("lr")
        row.update({k: summary.get(k) for k in ("rounds", "total_uplink_bytes", "total_downlink_bytes", "wall_s")})
        row["metric"] = summary.get("metric", "test_accuracy")  # runs from before tasks had a metric name
        row.update({k: v for k, v in summary.items() if k.startswith(("final_", "best_"))})
        row["final_score"], row["best_score"] = summary.get(f"final_{row['metric']}"), summary.get(f"best_{row['metric']}")
        row["d_model"] = d
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


# ------------------------------------------------------------------------------------------------ grouping
def varying_keys(runs: pd.DataFrame) -> list[str]:
    """Config keys whose value differs between runs, seeds and bookkeeping aside."""
    config_columns = [c for c in runs.columns if "." in c or c in ("seed", "name")]
    keys = []
    for column in config_columns:
        if column in IGNORED_KEYS or column.startswith(IGNORED_PREFIXES):
            continue
        if _text(runs[column]).nunique(dropna=False) > 1:
            keys.append(column)
    preferred = list(SHORT_NAMES)  # the method first, then the ablation axes
    return sorted(keys, key=lambda k: (preferred.index(k) if k in preferred else len(preferred), k))


def _short(key: str) -> str:
    return SHORT_NAMES.get(key, ".".join(key.split(".")[-2:]))


def _sort_values(values: list[Any]) -> list[Any]:
    try:
        return sorted(values)
    except TypeError:
        return sorted(values, key=str)


def config_label(row: pd.Series | dict, keys: list[str]) -> str:
    return ", ".join(f"{_short(k)}={_display(row[k])}" for k in keys) if keys else "all runs"


def summarise(runs: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Mean, sample std (ddof 1) and n over seeds for every configuration (combination of ``keys``), of
    every final / best metric and the traffic and time columns."""
    frame = runs.copy()
    if not keys:
        frame["_all"] = "all runs"
    group_keys = keys or ["_all"]
    grouped = frame.groupby(group_keys, dropna=False, sort=True)
    out = grouped.size().rename("n").to_frame()
    stats = [c for c in runs.columns if c.startswith(("final_", "best_"))] + TRAFFIC_COLUMNS
    for column in stats:
        out[f"{column}_mean"] = grouped[column].mean()
        out[f"{column}_std"] = grouped[column].std(ddof=1)
    out["seeds"] = grouped["seed"].agg(lambda s: " ".join(str(v) for v in sorted(s)))
    out = out.reset_index()
    if not keys:
        out = out.drop(columns="_all")
    return out


def _cell(mean: float, std: float, n: int, percent: bool = True) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    scale, digits = (100.0, 2) if percent else (1.0, 4)
    text = f"{scale * mean:.{digits}f}"
    if n > 1 and std is not None and not math.isnan(std):
        text += f" ± {scale * std:.{digits}f}"
    return f"{text} ({n})"


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def pivot_markdown(summary: pd.DataFrame, row_keys: list[str], col_keys: list[str], score: str = "test_accuracy",
                   percent: bool = True) -> str:
    """Rows: values of ``row_keys``; columns: combinations of ``col_keys``; cells: the final score."""
    rows_seen = _sort_values(list({tuple(r) for r in _text(summary[row_keys]).itertuples(index=False)}))
    cols_seen = _sort_values(list({tuple(r) for r in _text(summary[col_keys]).itertuples(index=False)})) if col_keys else [()]
    header = [" / ".join(_short(k) for k in row_keys)] + (
        [", ".join(f"{_short(k)}={v}" for k, v in zip(col_keys, col)) for col in cols_seen]
        if col_keys else [f"final {metric_label(score, percent)}"])
    table = []
    for row_value in rows_seen:
        line = [" / ".join(str(v) for v in row_value)]
        for col_value in cols_seen:
            match = summary
            for key, value in zip(row_keys + col_keys, row_value + col_value):
                match = match[_text(match[key]) == str(value)]
            if match.empty:
                line.append("–")
            else:
                first = match.iloc[0]
                line.append(_cell(first[f"final_{score}_mean"], first[f"final_{score}_std"], int(first["n"]), percent))
        table.append(line)
    return markdown_table(header, table)


# ------------------------------------------------------------------------------------------------ selection
SELECT_ON = ("final", "best")


def lower_is_better(metric: str) -> bool:
    return metric.endswith(LOWER_IS_BETTER)


def selection_scores(runs: pd.DataFrame, rounds: pd.DataFrame, score: str, select_on: str) -> pd.DataFrame:
    """Per run: ``selection_value``, the validation metric selection ranks by, and ``selected_test``, the
    test metric reported for it.

    ``select_on="final"``: the last evaluated round's validation metric, and the final test metric.
    ``select_on="best"``: the best evaluated round's validation metric, and the test metric *of that same
    round* (early stopping on validation). Either way the round and the configuration are chosen from
    validation numbers only; the test metric is read afterwards, at the point validation chose."""
    val = validation_name(score)
    out = runs[["run"]].copy()
    if select_on == "final":
        out["selection_value"] = runs[f"final_{val}"].to_numpy(float)
        out["selected_test"] = runs[f"final_{score}"].to_numpy(float)
        out["selected_round"] = runs["rounds"].to_numpy()
        return out
    values, tests, chosen_rounds = [], [], []
    for label in runs["run"]:
        evaluated = rounds[(rounds["run"] == label)].dropna(subset=[val]) if val in rounds else rounds.iloc[0:0]
        if evaluated.empty:
            values.append(math.nan), tests.append(math.nan), chosen_rounds.append(math.nan)
            continue
        series = evaluated[val].to_numpy(float)
        at = int(np.argmin(series) if lower_is_better(score) else np.argmax(series))  # first best round
        values.append(series[at])
        tests.append(float(evaluated[score].iloc[at]))
        chosen_rounds.append(int(evaluated["round"].iloc[at]))
    out["selection_value"], out["selected_test"], out["selected_round"] = values, tests, chosen_rounds
    return out


def choose(candidates: pd.DataFrame, setting_keys: list[str], tuned: list[str], higher_is_better: bool) -> pd.DataFrame:
    """For every setting (combination of ``setting_keys``), the row of ``candidates`` with the best
    ``selection_mean`` (the validation metric's mean over seeds); ties go to the first in sorted order.

    ``candidates`` holds only the setting keys, the tuned keys and the validation mean: this function
    cannot see a test metric, so selection cannot depend on one."""
    allowed = set(setting_keys) | set(tuned) | {"selection_mean"}
    if set(candidates.columns) - allowed:
        raise ValueError(f"choose() sees only validation columns, got {sorted(set(candidates.columns) - allowed)}")
    frame = candidates.dropna(subset=["selection_mean"])
    frame = frame.sort_values(["selection_mean", *tuned], ascending=[not higher_is_better] + [True] * len(tuned),
                              kind="stable")
    if not setting_keys:
        return frame.head(1)
    return frame.groupby(_text(frame[setting_keys]).agg("\x1f".join, axis=1), sort=False).head(1)


def select_configurations(runs: pd.DataFrame, rounds: pd.DataFrame, tuned: list[str], keys: list[str],
                          score: str, select_on: str = "final") -> tuple[pd.DataFrame, pd.DataFrame]:
    """(candidates: one row per configuration, every tuned value, its mean validation metric and test
    metric over seeds, ``chosen`` marking the selected one; selected: one row per setting of the other
    differing keys, with the chosen tuned values and the test metric's mean, std (ddof 1) and n over seeds).

    A setting's tuned values are chosen by the mean over seeds of the validation metric (see
    :func:`selection_scores` for ``select_on``); only then is the test metric of that configuration read."""
    if select_on not in SELECT_ON:
        raise ReportError(f"--select-on must be one of {', '.join(SELECT_ON)}, got '{select_on}'")
    if score == "score":
        raise ReportError("--select needs runs of one task metric; these runs rank by different metrics")
    val = validation_name(score)
    if f"final_{val}" not in runs or runs[f"final_{val}"].isna().all():
        raise ReportError(f"--select needs validation metrics ({val}); no run has them: run with "
                          f"data.validation_fraction > 0 (or data.validation_split)")
    missing = [k for k in tuned if k not in runs.columns]
    if missing:
        raise ReportError(f"--select {missing[0]}: not a config key of these runs")
    settings = [k for k in keys if k not in tuned]
    frame = runs.merge(selection_scores(runs, rounds, score, select_on), on="run")
    group_keys = settings + tuned
    grouped = frame.groupby(group_keys, dropna=False, sort=True)
    candidates = grouped.size().rename("n").to_frame()
    candidates["selection_mean"] = grouped["selection_value"].mean()
    candidates["test_mean"] = grouped["selected_test"].mean()
    candidates["test_std"] = grouped["selected_test"].std(ddof=1)
    candidates["seeds"] = grouped["seed"].agg(lambda s: " ".join(str(v) for v in sorted(s)))
    candidates = candidates.reset_index()
    picked = choose(candidates[group_keys + ["selection_mean"]], settings, tuned, not lower_is_better(score))
    candidates["chosen"] = candidates.index.isin(picked.index)
    selected = candidates[candidates["chosen"]].drop(columns="chosen").reset_index(drop=True)
    return candidates, selected


def paired_difference(frame: pd.DataFrame, first: dict[str, Any], second: dict[str, Any],
                      confidence: float = 0.95) -> dict[str, Any]:
    """The difference first - second of the per-run ``selected_test`` over the seeds both configurations
    ran (paired by seed: the same data split and client sampling), with a Student-t interval on the mean
    difference (scipy.stats.t; needs two common seeds or more)."""
    from scipy import stats

    def per_seed(config: dict[str, Any]) -> pd.Series:
        match = frame
        for key, value in config.items():
            match = match[_text(match[key]) == _display(value)]
        return match.groupby("seed")["selected_test"].mean()

    a, b = per_seed(first), per_seed(second)
    common = sorted(set(a.index) & set(b.index))
    diffs = np.array([a[s] - b[s] for s in common], dtype=float)
    out: dict[str, Any] = {"n": len(common), "mean": float(diffs.mean()) if len(diffs) else math.nan,
                           "low": math.nan, "high": math.nan}
    if len(diffs) >= 2:
        half = stats.t.ppf(0.5 + confidence / 2, len(diffs) - 1) * diffs.std(ddof=1) / math.sqrt(len(diffs))
        out["low"], out["high"] = out["mean"] - half, out["mean"] + half
    return out


def selection_markdown(runs: pd.DataFrame, rounds: pd.DataFrame, candidates: pd.DataFrame, selected: pd.DataFrame,
                       tuned: list[str], keys: list[str], score: str, select_on: str,
                       rows: Sequence[str] = ()) -> list[str]:
    """The paper-style table (rows: ``rows``, by default the method, or the first other differing key;
    columns: the remaining settings; cells: test mean ± std (n seeds) at the chosen tuned values, the best
    per column in bold), the paired interval of the top two per column, and every candidate configuration."""
    percent = in_percent(score, runs)
    scale = 100.0 if percent else 1.0
    settings = [k for k in keys if k not in tuned]
    unknown = [k for k in rows if k not in settings]
    if unknown:
        raise ReportError(f"--rows {unknown[0]}: not a key that differs between these runs "
                          f"(those are: {', '.join(settings) or 'none'})")
    row_keys = list(rows) or (["method.name"] if "method.name" in settings else settings[:1])
    col_keys = [k for k in settings if k not in row_keys]
    higher = not lower_is_better(score)
    val = validation_name(score)
    how = ("the final round's" if select_on == "final" else "the best round's (test read at that round)")
    lines = [f"## Selected on validation: {', '.join(f'`{k}`' for k in tuned)}", "",
             f"For every configuration of the other keys, the value of {', '.join(f'`{k}`' for k in tuned)} with "
             f"the best mean over seeds of {how} `{val}` is chosen; the cells are the {score.replace('_', ' ')}"
             f"{' in %' if percent else ''} of that choice, mean ± sample std (number of seeds), best per column in "
             "bold. Test metrics play no part in the choice.", ""]
    rows_seen = _sort_values(list({tuple(r) for r in _text(selected[row_keys]).itertuples(index=False)})) \
        if row_keys else [()]
    cols_seen = _sort_values(list({tuple(r) for r in _text(selected[col_keys]).itertuples(index=False)})) \
        if col_keys else [()]

    def at_edge(row: pd.Series, key: str) -> bool:
        """Whether the chosen numeric value of ``key`` is the end of the values tried for this setting."""
        tried = candidates
        for other in settings:
            tried = tried[_text(tried[other]) == _display(row[other])]
        values = pd.to_numeric(tried[key], errors="coerce").dropna().unique()
        value = pd.to_numeric(pd.Series([row[key]]), errors="coerce").iloc[0]
        return len(values) >= 3 and not math.isnan(value) and value in (values.min(), values.max())

    def lookup(row_value, col_value):
        match = selected
        for key, value in zip(row_keys + col_keys, row_value + col_value):
            match = match[_text(match[key]) == str(value)]
        return None if match.empty else match.iloc[0]

    best = {}
    for col_value in cols_seen:
        means = [(lookup(r, col_value)["test_mean"], r) for r in rows_seen if lookup(r, col_value) is not None]
        means = [(m, r) for m, r in means if not math.isnan(m)]
        if means:
            best[col_value] = (max if higher else min)(means, key=lambda x: x[0])[1]
    header = [" / ".join(_short(k) for k in row_keys) or "configuration"] + (
        [", ".join(f"{_short(k)}={v}" for k, v in zip(col_keys, col)) for col in cols_seen]
        if col_keys else [f"{metric_label(score, percent)} (chosen {', '.join(_short(k) for k in tuned)})"])
    table = []
    for row_value in rows_seen:
        line = [" / ".join(row_value) or "all runs"]
        for col_value in cols_seen:
            found = lookup(row_value, col_value)
            if found is None:
                line.append("–")
                continue
            cell = _cell(found["test_mean"], found["test_std"], int(found["n"]), percent)
            if best.get(col_value) == row_value:
                cell = f"**{cell}**"
            chosen = ", ".join(f"{_short(k)} {_display(found[k])}" + (" (edge)" if at_edge(found, k) else "")
                               for k in tuned)
            line.append(f"{cell} [{chosen}]")
        table.append(line)
    lines += [markdown_table(header, table), ""]
    if any(at_edge(row, k) for _, row in selected.iterrows() for k in tuned):
        lines += ["(edge): the chosen value is the smallest or largest of three or more tried; the best may lie "
                  "outside the grid, so widen it before trusting that row.", ""]

    per_run = runs.merge(selection_scores(runs, rounds, score, select_on), on="run")
    notes = []
    for col_value in cols_seen:
        ranked = [(lookup(r, col_value), r) for r in rows_seen if lookup(r, col_value) is not None]
        ranked = [(f, r) for f, r in ranked if not math.isnan(f["test_mean"])]
        if len(ranked) < 2:
            continue
        ranked.sort(key=lambda x: x[0]["test_mean"], reverse=higher)
        (top, top_row), (second, second_row) = ranked[0], ranked[1]
        diff = paired_difference(per_run, {k: top[k] for k in settings + tuned},
                                 {k: second[k] for k in settings + tuned})
        where = ", ".join(f"{_short(k)}={v}" for k, v in zip(col_keys, col_value))
        names = (" / ".join(top_row) or "first", " / ".join(second_row) or "second")
        unit = " points" if percent else ""
        if diff["n"] < 2:
            verdict = f"{diff['n']} common seed(s): no interval; run more seeds before calling a winner"
            text = f"{scale * diff['mean']:+.2f}{unit}"
        else:
            inside = diff["low"] <= 0 <= diff["high"]
            verdict = ("level within noise (the interval contains 0)" if inside
                       else f"{names[0]} ahead (the interval excludes 0)")
            text = (f"{scale * diff['mean']:+.2f}{unit}, 95% paired t-interval [{scale * diff['low']:+.2f}, "
                    f"{scale * diff['high']:+.2f}] over {diff['n']} seeds")
        notes.append(f"- {where + ': ' if where else ''}{names[0]} - {names[1]} = {text}: {verdict}.")
    if notes:
        lines += ["Top two per column, paired by seed (same data split and client sampling):", "", *notes, ""]

    lines += ["### Every candidate (the chosen ones marked)", ""]
    header = [_short(k) for k in settings + tuned] + ["n", "seeds", f"{select_on} {metric_label(val, percent)}",
                                                     metric_label(score, percent), "chosen"]
    listed = []
    for _, row in candidates.iterrows():
        n = int(row["n"])
        listed.append([_display(row[k]) for k in settings + tuned] + [
            n, row["seeds"], _cell(row["selection_mean"], math.nan, 1, percent).replace(" (1)", ""),
            _cell(row["test_mean"], row["test_std"], n, percent), "✓" if row["chosen"] else ""])
    lines += [markdown_table(header, listed), ""]
    return lines


# ------------------------------------------------------------------------------------------------ plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _line_groups(keys: list[str]) -> tuple[list[str], list[str]]:
    """(keys that pick a line, keys that pick a panel) for the per-round plots: lines per method when the
    method varies, one panel per combination of the other differing keys."""
    if "method.name" in keys:
        return ["method.name"], [k for k in keys if k != "method.name"]
    return keys, []


def plot_per_round(runs: pd.DataFrame, rounds: pd.DataFrame, keys: list[str], column: str, ylabel: str,
                   title: str, path: Path, percent: bool = False) -> Optional[str]:
    """Mean over seeds per round with a ±1 std band; returns a reason when there is nothing to plot."""
    if column not in rounds.columns:
        return f"no run recorded {column}"
    data = rounds.merge(runs[["run", *keys]], on="run")
    data = data[pd.to_numeric(data[column], errors="coerce").notna()]
    if data.empty:
        return f"no run recorded {column}"
    line_keys, panel_keys = _line_groups(keys)
    panels = _sort_values(list({tuple(r) for r in _text(data[panel_keys]).itertuples(index=False)})) if panel_keys else [()]
    if len(panels) > 6:  # too many panels to read: one panel, a line per configuration
        line_keys, panel_keys, panels = keys, [], [()]
    plt = _plt()
    cols = min(3, len(panels))
    rows_n = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(5.2 * cols, 3.8 * rows_n), squeeze=False, sharey=True)
    for ax, panel in zip(axes.flat, panels):
        subset = data
        for key, value in zip(panel_keys, panel):
            subset = subset[_text(subset[key]) == str(value)]
        labels = (_text(subset[line_keys]).agg(", ".join, axis=1) if line_keys
                  else pd.Series("all runs", index=subset.index))
        for label in _sort_values(list(labels.unique())):
            part = subset[labels == label]
            stats = part.groupby("round")[column].agg(["mean", "std", "count"]).sort_index()
            x = stats.index.to_numpy()
            mean = stats["mean"].to_numpy(dtype=float)
            std = stats["std"].fillna(0.0).to_numpy(dtype=float)
            scale = 100.0 if percent else 1.0
            ax.plot(x, scale * mean, marker="o", markersize=3, label=label)
            ax.fill_between(x, scale * (mean - std), scale * (mean + std), alpha=0.2)
        ax.set_xlabel("round")
        ax.set_ylabel(ylabel)
        if panel_keys:
            ax.set_title(", ".join(f"{_short(k)}={v}" for k, v in zip(panel_keys, panel)), fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, title=" / ".join(_short(k) for k in line_keys) or None, title_fontsize=7)
        ax.xaxis.get_major_locator().set_params(integer=True)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(f"{title} (mean over seeds, ±1 std)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def plot_budget_mix(summary: pd.DataFrame, keys: list[str], path: Path, score: str = "test_accuracy",
                    percent: bool = True) -> Optional[str]:
    mix = "compute.distribution"
    if mix not in keys:
        return "the budget mix (compute.distribution) takes a single value"
    other = [k for k in keys if k != mix]
    mixes = _sort_values(list(_text(summary[mix]).unique()))
    preferred = ["homogeneous", "uniform", "bell", "skewed_left", "skewed_right"]
    mixes = [m for m in preferred if m in mixes] + [m for m in mixes if m not in preferred]
    labels = (_text(summary[other]).agg(", ".join, axis=1) if other
              else pd.Series("all", index=summary.index))
    series = _sort_values(list(labels.unique()))
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(mixes) * max(1, len(series)) ** 0.5 + 2), 4.2))
    width = 0.8 / len(series)
    x = np.arange(len(mixes))
    for i, label in enumerate(series):
        part = summary[labels == label].set_index(_text(summary[labels == label][mix]))
        scale = 100.0 if percent else 1.0
        mean = [scale * part.loc[m, f"final_{score}_mean"] if m in part.index else np.nan for m in mixes]
        std = [scale * np.nan_to_num(part.loc[m, f"final_{score}_std"]) if m in part.index else 0 for m in mixes]
        ax.bar(x + (i - (len(series) - 1) / 2) * width, mean, width, yerr=std, capsize=3, label=label)
    ax.set_xticks(x, mixes)
    ax.set_xlabel("client budget mix")
    ax.set_ylabel(f"final {metric_label(score, percent)}")
    ax.set_title(f"Final {score.replace('_', ' ')} by budget mix (mean over seeds, ±1 std)", fontsize=11)
    if other:
        ax.legend(fontsize=7, title=" / ".join(_short(k) for k in other), title_fontsize=7,
                  loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def plot_heads(runs: pd.DataFrame, summary: pd.DataFrame, keys: list[str], path: Path, score: str = "test_accuracy",
               percent: bool = True) -> Optional[str]:
    heads = "method.heads"
    if heads not in keys:
        return "method.heads takes a single value"
    other = [k for k in keys if k != heads]
    labels = (_text(summary[other]).agg(", ".join, axis=1) if other else pd.Series("", index=summary.index))
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    reference_heads = None
    for label in _sort_values(list(labels.unique())):
        part = summary[labels == label].sort_values(heads)
        if len(part) < 2:
            continue  # one head count: no gain to show
        h = part[heads].astype(float).to_numpy()
        reference = part.iloc[0]
        scale = 100.0 if percent else 1.0
        gain = scale * (part[f"final_{score}_mean"].to_numpy(float) - reference[f"final_{score}_mean"])
        std = scale * part[f"final_{score}_std"].fillna(0.0).to_numpy(float)
        ax.errorbar(h, gain, yerr=std, marker="o", capsize=3, label=label or None)
    ax.axhline(0.0, color="grey", linewidth=0.8)
    # sqrt(N h) = d  <=>  h = d^2 / N: past it the update's total rank can no longer grow
    ticks = {int(v) for v in summary[heads].astype(float)}
    marks = runs[["d_model", "budget_per_matrix"]].dropna().drop_duplicates()
    for _, mark in marks.iterrows():
        h_star = float(mark["d_model"]) ** 2 / float(mark["budget_per_matrix"])
        n, d = int(mark["budget_per_matrix"]), int(mark["d_model"])
        ax.axvline(h_star, color="red", linestyle="--", linewidth=1,
                   label=f"sqrt(N h) = d at h = {h_star:.3g}\n(N = {n}, d = {d})")
        ticks.add(round(h_star, 1) if h_star != int(h_star) else int(h_star))
    ax.set_xticks(sorted(ticks))
    span = max(ticks) - min(ticks)
    ax.set_xlim(min(ticks) - 0.05 * span - 0.5, max(ticks) + 0.05 * span + 0.5)
    ax.set_xlabel("heads h (same per-matrix budget N)")
    ax.set_ylabel(f"{score.replace('_', ' ')} gain over the line's fewest heads" + (" (points)" if percent else ""))
    ax.set_title("Gain from more heads at a fixed budget (mean over seeds, ±1 std)", fontsize=11)
    if other or len(marks):
        ax.legend(fontsize=7, title=" / ".join(_short(k) for k in other) or None, title_fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def plot_run(run_dir: Path) -> Path:
    """A run's own curves, RUN/curves.png: its task's primary metric per evaluated round, and the training
    loss per round beside the test loss where the task writes one."""
    run_dir = Path(run_dir)
    metrics = pd.read_csv(run_dir / "metrics.csv")
    summary = json.loads((run_dir / "summary.json").read_text())
    metric = summary.get("metric", "test_accuracy")
    percent = not metric.endswith(LOWER_IS_BETTER)
    plt = _plt()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    evaluated = metrics.dropna(subset=[metric]) if metric in metrics else metrics.iloc[0:0]
    left.plot(evaluated["round"], (100 if percent else 1) * evaluated[metric], marker="o")
    left.set_ylabel(metric_label(metric, percent))
    left.set_title(f"{metric.replace('_', ' ')} of the global model")
    right.plot(metrics["round"], metrics["train_loss"], marker=".", label="train loss (sampled clients)")
    if "test_loss" in metrics and metric != "test_loss":
        tested = metrics.dropna(subset=["test_loss"])
        right.plot(tested["round"], tested["test_loss"], marker="o", label="test loss")
    right.set_title("loss")
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(f"{summary.get('method')} on {summary.get('task', 'text_classification')}: {run_dir.name}",
                 fontsize=10)
    fig.tight_layout()
    path = run_dir / "curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------ report
def write_report(dirs: list[Path], output: Optional[Path] = None, select: Sequence[str] = (),
                 select_on: str = "final", rows: Sequence[str] = ()) -> Path:
    """Find the runs under ``dirs``, write report.md, report.csv, runs.csv and PNGs; returns report.md.
    ``select``: config keys tuned on the validation split (e.g. optimizer.lr): report.md then opens with the
    selected table (:func:`select_configurations`), and candidates.csv / selected.csv hold its numbers."""
    dirs = [Path(d) for d in dirs]
    if not dirs:
        raise ReportError("give at least one run or sweep directory")
    run_dirs = find_runs(dirs)
    if not run_dirs:
        raise ReportError("no runs (directories with metrics.csv, config.yaml and summary.json) under "
                          + ", ".join(str(d) for d in dirs))
    output = Path(output) if output else (dirs[0] / "report" if len(dirs) == 1 else Path("report"))
    output.mkdir(parents=True, exist_ok=True)
    root = dirs[0].resolve() if len(dirs) == 1 else None
    runs, rounds = read_runs(run_dirs, root)
    keys = varying_keys(runs)
    summary = summarise(runs, keys)
    score = score_name(runs)
    selection_lines: list[str] = []
    if select:
        candidates, selected = select_configurations(runs, rounds, list(select), keys, score, select_on)
        candidates.to_csv(output / "candidates.csv", index=False)
        selected.to_csv(output / "selected.csv", index=False)
        selection_lines = selection_markdown(runs, rounds, candidates, selected, list(select), keys, score, select_on,
                                             rows)

    runs.to_csv(output / "runs.csv", index=False)
    summary.to_csv(output / "report.csv", index=False)

    percent = in_percent(score, runs)
    score_text = metric_label(score, percent)
    lines = [f"# Report: {len(runs)} run{'s' * (len(runs) != 1)} in {len(summary)} "
             f"configuration{'s' * (len(summary) != 1)}", ""]
    lines.append("Sources: " + ", ".join(f"`{d}`" for d in dirs))
    lines.append("")
    ranked_by = (f"the final {score.replace('_', ' ')}" if score != "score"
                 else "the final value of each run's task's primary metric (column `metric`)")
    lines.append(f"Scores ({'in %, ' if percent else ''}as mean ± sample std (number of seeds)) are {ranked_by}. "
                 "Configurations differ in: " + (", ".join(f"`{k}`" for k in keys) or "nothing (seeds only)") + ".")
    lines += [""] + selection_lines + ["## All configurations", ""]
    others = [m for m in task_metrics(runs) if m != score and f"final_{m}_mean" in summary]
    header = [_short(k) for k in keys] + (["metric"] if score == "score" else []) + [
        "n", "seeds", f"final {score_text}", f"best {score_text}"] + [
        f"final {metric_label(m, in_percent(m, runs))}" for m in others] + ["uplink MB", "wall s"]
    metric_of = runs.groupby(keys, dropna=False)["metric"].first() if keys and score == "score" else None
    table = []
    for _, row in summary.iterrows():
        n = int(row["n"])
        label = [_display(row[k]) for k in keys]
        if metric_of is not None:
            label.append(metric_of.loc[tuple(row[k] for k in keys) if len(keys) > 1 else row[keys[0]]])
        table.append(label + [
            n, row["seeds"],
            _cell(row[f"final_{score}_mean"], row[f"final_{score}_std"], n, percent),
            _cell(row[f"best_{score}_mean"], row[f"best_{score}_std"], n, percent)] + [
            _cell(row[f"final_{m}_mean"], row[f"final_{m}_std"], n, in_percent(m, runs)) for m in others] + [
            f"{row['total_uplink_bytes_mean'] / 1e6:.3g}", f"{row['wall_s_mean']:.1f}"])
    lines += [markdown_table(header, table), ""]

    skipped, single = [], []
    for title, row_keys in TABLES:
        present = [k for k in row_keys if k in keys]
        if not present:
            single.append(" / ".join(f"`{k}`" for k in row_keys))
            continue
        col_keys = [k for k in keys if k not in present]
        if title.startswith("Final score per budget mix") and "method.name" in col_keys:
            col_keys = ["method.name"] + [k for k in col_keys if k != "method.name"]
        heading = title.replace("score", score.replace("_", " ") if score != "score" else "score")
        lines += [f"## {heading}", "", pivot_markdown(summary, present, col_keys, score, percent), ""]

    plots = [
        ("accuracy_per_round.png", f"{score.replace('_', ' ').capitalize()} per round",
         lambda p: plot_per_round(runs, rounds, keys, score, score_text, score.replace("_", " ").capitalize(), p,
                                  percent)),
        ("accuracy_by_budget_mix.png", f"Final {score.replace('_', ' ')} by budget mix",
         lambda p: plot_budget_mix(summary, keys, p, score, percent)),
        ("heads_gain.png", f"{score.replace('_', ' ').capitalize()} gain vs heads",
         lambda p: plot_heads(runs, summary, keys, p, score, percent)),
        ("effective_rank.png", "Effective rank per round",
         lambda p: plot_per_round(runs, rounds, keys, "effective_rank", "effective rank",
                                  "Effective rank of the aggregated update", p)),
    ]
    lines += ["## Plots", ""]
    for filename, title, draw in plots:
        reason = draw(output / filename)
        if reason:
            skipped.append(f"{title} plot: {reason}")
            (output / filename).unlink(missing_ok=True)
        else:
            lines += [f"### {title}", "", f"![{title}]({filename})", ""]
    if single:
        skipped.append("Tables per " + ", ".join(single) + ": a single value in these runs")
    if skipped:
        lines += ["## Skipped", ""] + [f"- {s}" for s in skipped] + [""]
    lines += ["## Runs", "", markdown_table(["run", "seed", f"final {score_text}", "rounds"], [
        [r["run"], r.get("seed"), _cell(r[f"final_{score}"], math.nan, 1, percent).replace(" (1)", ""), r["rounds"]]
        for _, r in runs.iterrows()]), ""]
    path = output / "report.md"
    path.write_text("\n".join(lines))
    return path
