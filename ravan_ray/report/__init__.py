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
protocol; ``selected.csv``, ``candidates.csv`` and ``chosen.csv`` (the run chosen per setting and seed) hold the
numbers. ``--per-seed`` repeats the choice in every seed on that seed's validation metric alone (what a sweep
that halves and extends its grids per seed does, ravan_ray/sweep_search.py). Runs that got through more rounds
are compared first (successive halving stopped the others for being worse at a rung). The best row per column
is compared with every other per seed with a Student-t interval (scipy.stats.t) on the mean paired difference;
a chosen value at the end of the values tried (three or more) is marked (edge).

Tables: per task, method, budget mix and data partition for every report, and one per ablation each
method declares for its own runs (``FederatedMethod.report_tables``: Ravan's heads, initialisation, head
scoring, scaling). For the heads plot, N is the per-matrix trainable budget and d the adapted matrices'
dimension of the narrowest adapted layer, as the method recorded them in the run's ``resolved.method``
(``budget_per_matrix``, ``layer_shapes``); a run without that record gets N from the budget rule every
method shares (ravan_ray/methods/budget.py) and d from the model's config where it is available offline.
The marker is where Ravan's heads reach full rank (``full_rank_heads``, sqrt(N h) = d).

A score whose method does not read compute levels (summary.json's ``budget_aware``: false: every client trained
its full budget) under a mix that gives some client less is marked † in every table, with a footnote: a budget-mix
table compares such a method with others that did see the budgets.

The rooms: ``runs.py`` reads run directories, ``tables.py`` groups them into configurations and writes
markdown tables, ``selection.py`` selects on the validation split, ``plots.py`` draws the PNGs (and a run's
own curves.png); :func:`write_report` here puts report.md together.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

from ravan_ray.report.plots import plot_budget_mix, plot_heads, plot_per_round, plot_run
from ravan_ray.report.runs import (IGNORED_MIX_MARK, IGNORED_MIX_NOTE, ReportError, display, find_runs, in_percent,
                                   metric_label, read_runs, score_name, task_metrics)
from ravan_ray.report.selection import choose, select_configurations, selection_markdown
from ravan_ray.report.tables import (marked, markdown_table, pivot_markdown, report_tables, score_cell, short_name,
                                     summarise, varying_keys)

__all__ = ["ReportError", "choose", "find_runs", "markdown_table", "plot_run", "read_runs", "select_configurations",
           "summarise", "write_report"]


def write_report(dirs: list[Path], output: Optional[Path] = None, select: Sequence[str] = (),
                 select_on: str = "final", rows: Sequence[str] = (), per_seed: bool = False) -> Path:
    """Find the runs under ``dirs``, write report.md, report.csv, runs.csv and PNGs; returns report.md.
    ``select``: config keys tuned on the validation split (e.g. optimizer.lr): report.md then opens with the
    selected table (:func:`select_configurations`; ``per_seed``: chosen in every seed on its own), and
    candidates.csv / selected.csv / chosen.csv hold its numbers."""
    dirs = [Path(d) for d in dirs]
    if per_seed and not select:
        raise ReportError("--per-seed goes with --select KEY (the key chosen per seed)")
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
        candidates, selected, chosen = select_configurations(runs, rounds, list(select), keys, score, select_on,
                                                             per_seed)
        candidates.to_csv(output / "candidates.csv", index=False)
        selected.to_csv(output / "selected.csv", index=False)
        chosen.to_csv(output / "chosen.csv", index=False)
        selection_lines = selection_markdown(runs, candidates, selected, chosen, list(select), keys, score,
                                             select_on, per_seed, rows)

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
    header = [short_name(k) for k in keys] + (["metric"] if score == "score" else []) + [
        "n", "seeds", f"final {score_text}", f"best {score_text}"] + [
        f"final {metric_label(m, in_percent(m, runs))}" for m in others] + ["uplink MB", "wall s"]
    metric_of = runs.groupby(keys, dropna=False)["metric"].first() if keys and score == "score" else None
    table = []
    for _, row in summary.iterrows():
        n = int(row["n"])
        label = [display(row[k]) for k in keys]
        if metric_of is not None:
            label.append(metric_of.loc[tuple(row[k] for k in keys) if len(keys) > 1 else row[keys[0]]])
        table.append(label + [
            n, row["seeds"],
            score_cell(row[f"final_{score}_mean"], row[f"final_{score}_std"], n, percent) + marked(row),
            score_cell(row[f"best_{score}_mean"], row[f"best_{score}_std"], n, percent)] + [
            score_cell(row[f"final_{m}_mean"], row[f"final_{m}_std"], n, in_percent(m, runs)) for m in others] + [
            f"{row['total_uplink_bytes_mean'] / 1e6:.3g}", f"{row['wall_s_mean']:.1f}"])
    all_configurations = markdown_table(header, table)
    lines += [all_configurations, ""] + ([IGNORED_MIX_NOTE, ""] if IGNORED_MIX_MARK in all_configurations else [])

    skipped, single = [], []
    for title, row_keys in report_tables(runs):
        present = [k for k in row_keys if k in keys]
        if not present:
            single.append(" / ".join(f"`{k}`" for k in row_keys))
            continue
        col_keys = [k for k in keys if k not in present]
        if title.startswith("Final score per budget mix") and "method.name" in col_keys:
            col_keys = ["method.name"] + [k for k in col_keys if k != "method.name"]
        heading = title.replace("score", score.replace("_", " ") if score != "score" else "score")
        pivot = pivot_markdown(summary, present, col_keys, score, percent)
        lines += [f"## {heading}", "", pivot, ""] + ([IGNORED_MIX_NOTE, ""] if IGNORED_MIX_MARK in pivot else [])

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
        [r["run"], r.get("seed"), score_cell(r[f"final_{score}"], math.nan, 1, percent).replace(" (1)", ""), r["rounds"]]
        for _, r in runs.iterrows()]), ""]
    path = output / "report.md"
    path.write_text("\n".join(lines))
    return path
