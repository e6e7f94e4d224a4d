"""The report's PNGs (score per round, by budget mix, gain vs heads, effective rank, per-client fairness) and a
run's own curves.png and partition.png."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from ravan_ray.budgets import MIXES
from ravan_ray.report.runs import LOWER_IS_BETTER, displayed, metric_label
from ravan_ray.report.tables import in_order, short_name

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
    panels = in_order(list({tuple(r) for r in displayed(data[panel_keys]).itertuples(index=False)})) if panel_keys else [()]
    if len(panels) > 6:  # too many panels to read: one panel, a line per configuration
        line_keys, panel_keys, panels = keys, [], [()]
    plt = _plt()
    cols = min(3, len(panels))
    rows_n = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(5.2 * cols, 3.8 * rows_n), squeeze=False, sharey=True)
    for ax, panel in zip(axes.flat, panels):
        subset = data
        for key, value in zip(panel_keys, panel):
            subset = subset[displayed(subset[key]) == str(value)]
        labels = (displayed(subset[line_keys]).agg(", ".join, axis=1) if line_keys
                  else pd.Series("all runs", index=subset.index))
        for label in in_order(list(labels.unique())):
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
            ax.set_title(", ".join(f"{short_name(k)}={v}" for k, v in zip(panel_keys, panel)), fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, title=" / ".join(short_name(k) for k in line_keys) or None, title_fontsize=7)
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
    mixes = in_order(list(displayed(summary[mix]).unique()))
    mixes = [m for m in MIXES if m in mixes] + [m for m in mixes if m not in MIXES]
    labels = (displayed(summary[other]).agg(", ".join, axis=1) if other
              else pd.Series("all", index=summary.index))
    series = in_order(list(labels.unique()))
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(mixes) * max(1, len(series)) ** 0.5 + 2), 4.2))
    width = 0.8 / len(series)
    x = np.arange(len(mixes))
    for i, label in enumerate(series):
        part = summary[labels == label].set_index(displayed(summary[labels == label][mix]))
        scale = 100.0 if percent else 1.0
        mean = [scale * part.loc[m, f"final_{score}_mean"] if m in part.index else np.nan for m in mixes]
        std = [scale * np.nan_to_num(part.loc[m, f"final_{score}_std"]) if m in part.index else 0 for m in mixes]
        ax.bar(x + (i - (len(series) - 1) / 2) * width, mean, width, yerr=std, capsize=3, label=label)
    ax.set_xticks(x, mixes)
    ax.set_xlabel("client budget mix")
    ax.set_ylabel(f"final {metric_label(score, percent)}")
    ax.set_title(f"Final {score.replace('_', ' ')} by budget mix (mean over seeds, ±1 std)", fontsize=11)
    if other:
        ax.legend(fontsize=7, title=" / ".join(short_name(k) for k in other), title_fontsize=7,
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
    labels = (displayed(summary[other]).agg(", ".join, axis=1) if other else pd.Series("", index=summary.index))
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label in in_order(list(labels.unique())):
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
    from ravan_ray.methods.ravan.budget import full_rank_heads

    # past full_rank_heads the update's total rank can no longer grow
    ticks = {int(v) for v in summary[heads].astype(float)}
    marks = runs[["d_model", "budget_per_matrix"]].dropna().drop_duplicates()
    for _, mark in marks.iterrows():
        n, d = int(mark["budget_per_matrix"]), int(mark["d_model"])
        h_star = full_rank_heads(n, d)
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
        ax.legend(fontsize=7, title=" / ".join(short_name(k) for k in other) or None, title_fontsize=7, loc="best")
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


def plot_partition(histogram: pd.DataFrame, path: Path, title: str) -> Path:
    """A run's partition.png: rows per class held by each client (a heat map, clients down, classes across, each
    client's row scaled to its own largest class so that small clients' mixes show too) beside each client's
    size. ``histogram``: clients x classes counts (columns: the class names)."""
    counts = histogram.to_numpy(dtype=float)
    sizes = counts.sum(axis=1)
    shares = counts / np.maximum(counts.max(axis=1, keepdims=True), 1)
    clients, classes = counts.shape
    plt = _plt()
    height = min(12.0, max(3.0, 0.18 * clients + 1.5))
    fig, (heat, bars) = plt.subplots(1, 2, figsize=(min(16.0, max(6.0, 0.12 * classes + 5)), height), sharey=True,
                                     gridspec_kw={"width_ratios": [4, 1]})
    image = heat.imshow(shares, aspect="auto", cmap="viridis", interpolation="nearest", vmin=0, vmax=1)
    heat.set_xlabel(f"class ({classes})")
    heat.set_ylabel("client")
    heat.yaxis.get_major_locator().set_params(integer=True)
    if classes <= 30:
        heat.set_xticks(range(classes), [str(c) for c in histogram.columns], rotation=90, fontsize=6)
    bar = fig.colorbar(image, ax=heat, fraction=0.04, pad=0.01)
    bar.set_label("share of the client's\nlargest class", fontsize=7)
    bars.barh(range(clients), sizes, color="tab:blue")
    bars.set_xlabel("rows")
    bars.grid(axis="x", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)


def plot_fairness(runs: pd.DataFrame, keys: list[str], path: Path, metric: str, percent: bool = True) -> Optional[str]:
    """The distribution over clients of the per-client ``metric`` (client_metrics.csv of runs with
    federation.client_eval) at each run's last evaluated round: a box per method (the seeds' clients pooled) and a
    point per client, a panel per combination of the other differing keys (as the per-round plots); returns a reason
    when no run has per-client metrics."""
    from ravan_ray.results import CLIENT_METRICS_FILE

    box_keys, panel_keys = _line_groups(keys)
    values: dict[tuple[str, str], list[float]] = {}
    for _, run in runs.iterrows():
        file = Path(run["run_dir"]) / CLIENT_METRICS_FILE
        table = pd.read_csv(file) if file.is_file() else pd.DataFrame()
        if metric not in table or table.empty:
            continue
        last = table[table["round"] == table["round"].max()]
        panel = ", ".join(f"{short_name(k)}={_brief(run[k])}" for k in panel_keys)
        box = ", ".join(_brief(run[k]) for k in box_keys) or "all runs"
        values.setdefault((panel, box), []).extend(last[metric].astype(float).tolist())
    if not values:
        return "no run evaluated its clients (federation.client_eval)"
    panels = in_order(list({panel for panel, _ in values}))
    scale = 100.0 if percent else 1.0
    plt = _plt()
    cols = min(3, len(panels))
    rows_n = math.ceil(len(panels) / cols)
    boxes_most = max(sum(1 for panel, _ in values if panel == p) for p in panels)
    fig, axes = plt.subplots(rows_n, cols, figsize=(max(4.5, 0.9 * boxes_most + 1.5) * cols, 4.0 * rows_n),
                             squeeze=False, sharey=True)
    rng = np.random.default_rng(0)  # jitter only, so the points of one box do not sit on one line
    for ax, panel in zip(axes.flat, panels):
        names = in_order([box for p, box in values if p == panel])
        ax.boxplot([scale * np.asarray(values[panel, n]) for n in names], whis=(10, 90), showfliers=False)
        for i, name in enumerate(names, start=1):
            points = scale * np.asarray(values[panel, name])
            ax.scatter(i + rng.uniform(-0.18, 0.18, len(points)), points, s=8, alpha=0.5, color="tab:blue")
        ax.set_xticks(range(1, len(names) + 1), names, rotation=30 if len(names) > 3 else 0,
                      ha="right" if len(names) > 3 else "center", fontsize=8)
        ax.set_ylabel(f"per-client {metric_label(metric, percent)}")
        if panel:
            ax.set_title(panel, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle("Per-client score of the last evaluated global model\n(a point per client; box: quartiles, "
                 "whiskers: 10th-90th percentile)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def _brief(value) -> str:
    """A config value as a label: a file path by its last part (data.path's folder)."""
    text = displayed(pd.Series([value])).iloc[0]
    return Path(text).name if "/" in text else text
