"""Grouping runs into configurations (the keys that differ, seeds aside), their statistics over seeds, and
markdown tables of them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pandas as pd

from ravan_ray.report.runs import IGNORED_MIX_MARK, TRAFFIC_COLUMNS, displayed, metric_label

# Keys that never change what a run computes (or are its identity): not used to tell configurations apart.
IGNORED_PREFIXES = ("resources.", "output.")
IGNORED_KEYS = {"seed", "name", "federation.eval_batch_size"}
SHORT_NAMES = {
    "method.name": "method", "compute.distribution": "budget mix", "data.partition.kind": "partition",
    "data.partition.alpha": "alpha", "method.heads": "heads", "method.init": "init",
    "method.scoring": "scoring", "method.scaling": "scaling", "method.lora_rank": "lora rank",
    "method.budget": "budget", "optimizer.lr": "lr", "model.name": "model", "data.name": "data",
}
@dataclass(frozen=True)
class ReportTable:
    """One table of a report: ``rows``, the keys that form its rows; every other differing key becomes a column,
    ``leading`` ones first. "score" in the title becomes the score's name ("test accuracy")."""

    title: str
    rows: tuple[str, ...]
    leading: tuple[str, ...] = ()

    def columns(self, keys: list[str]) -> list[str]:
        """The table's column keys among the differing ``keys``: the other keys, the leading ones first."""
        others = [k for k in keys if k not in self.rows]
        return [k for k in self.leading if k in others] + [k for k in others if k not in self.leading]


# Each method's own ablations (FederatedMethod.report_tables) come between the federation's tables and the data's.
FEDERATION_TABLES = [
    ReportTable("Final score per task", ("model.task",)),
    ReportTable("Final score per method", ("method.name",)),
    ReportTable("Final score per budget mix and method", ("compute.distribution",), leading=("method.name",)),
]
DATA_TABLES = [ReportTable("Final score per data partition", ("data.partition.kind", "data.partition.alpha"))]


def report_tables(runs: pd.DataFrame) -> list[ReportTable]:
    """The tables a report over ``runs`` may hold: every method's, and those of the runs' methods."""
    from ravan_ray.methods import method_class

    ablations: dict[str, str] = {}
    for name in in_order(list(runs["method.name"].dropna().unique())) if "method.name" in runs else []:
        try:
            ablations.update(method_class(str(name)).report_tables)
        except ValueError:  # a method this version does not know: its runs still get the shared tables
            continue
    return FEDERATION_TABLES + [ReportTable(f"Final score per {what}", (key,)) for key, what in ablations.items()] + \
        DATA_TABLES


def varying_keys(runs: pd.DataFrame) -> list[str]:
    """Config keys whose value differs between runs, seeds and bookkeeping aside. A method's option differs only
    when the runs of the methods that read it differ in it (the others show it unset, see
    :func:`~ravan_ray.report.runs.others_options`)."""
    from ravan_ray.config import registered_options

    options = {f"method.{key}" for model in registered_options("method").values() for key in model.model_fields}
    config_columns = [c for c in runs.columns if "." in c or c in ("seed", "name")]
    keys = []
    for column in config_columns:
        if column in IGNORED_KEYS or column.startswith(IGNORED_PREFIXES):
            continue
        values = runs[column].dropna() if column in options else runs[column]
        if displayed(values).nunique(dropna=False) > 1:
            keys.append(column)
    preferred = list(SHORT_NAMES)  # the method first, then the ablation axes
    return sorted(keys, key=lambda k: (preferred.index(k) if k in preferred else len(preferred), k))


def short_name(key: str) -> str:
    return SHORT_NAMES.get(key, ".".join(key.split(".")[-2:]))


def in_order(values: list[Any]) -> list[Any]:
    try:
        return sorted(values)
    except TypeError:
        return sorted(values, key=str)



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
    if "ignored_mix" in frame:
        out["ignored_mix"] = grouped["ignored_mix"].agg(lambda s: bool(s.fillna(False).astype(bool).any()))
    out = out.reset_index()
    if not keys:
        out = out.drop(columns="_all")
    return out


def score_cell(mean: float, std: float, n: int, percent: bool = True) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    scale, digits = (100.0, 2) if percent else (1.0, 4)
    text = f"{scale * mean:.{digits}f}"
    if n > 1 and std is not None and not math.isnan(std):
        text += f" ± {scale * std:.{digits}f}"
    return f"{text} ({n})"


def marked(configuration: pd.Series) -> str:
    """The mark of a configuration whose method ignored its budget mix
    (:data:`~ravan_ray.report.runs.IGNORED_MIX_MARK`), else nothing."""
    return f" {IGNORED_MIX_MARK}" if bool(configuration.get("ignored_mix", False)) else ""


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def pivot_markdown(summary: pd.DataFrame, row_keys: list[str], col_keys: list[str], score: str = "test_accuracy",
                   percent: bool = True) -> str:
    """Rows: values of ``row_keys``; columns: combinations of ``col_keys``; cells: the final score."""
    rows_seen = in_order(list({tuple(r) for r in displayed(summary[row_keys]).itertuples(index=False)}))
    cols_seen = in_order(list({tuple(r) for r in displayed(summary[col_keys]).itertuples(index=False)})) if col_keys else [()]
    header = [" / ".join(short_name(k) for k in row_keys)] + (
        [", ".join(f"{short_name(k)}={v}" for k, v in zip(col_keys, col)) for col in cols_seen]
        if col_keys else [f"final {metric_label(score, percent)}"])
    table = []
    for row_value in rows_seen:
        line = [" / ".join(str(v) for v in row_value)]
        for col_value in cols_seen:
            match = summary
            for key, value in zip(row_keys + col_keys, row_value + col_value):
                match = match[displayed(match[key]) == str(value)]
            if match.empty:
                line.append("–")
            else:
                first = match.iloc[0]
                cell = score_cell(first[f"final_{score}_mean"], first[f"final_{score}_std"], int(first["n"]), percent)
                line.append(cell + marked(first))
        table.append(line)
    return markdown_table(header, table)
