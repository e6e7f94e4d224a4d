"""``ravan-ray report DIR [DIR ...]``: tables and plots over run and sweep directories.

Every directory holding ``metrics.csv``, ``config.yaml`` and ``summary.json`` below the given paths is
one run (a single ``ravan-ray run``, or a trial's ``run/`` inside a sweep). Runs are grouped by the
config keys that differ between them, seeds aside; each group gets the mean, the sample standard
deviation (ddof = 1, empty for a single seed) and the number of seeds n. Written to the output directory:

- ``report.md``: the tables ("mean ± std (n)" of the runs' score, in % for accuracies, exact match and F1)
  and the plots;
- ``report.csv``: one row per group (the numbers behind the tables); ``runs.csv``: one row per run;
- PNGs: the score per round (mean over seeds, ±1 std band), the final score by budget mix (grouped
  bars), the score's gain over the fewest heads vs heads with the point where sqrt(N h) = d marked,
  the aggregated update's effective rank per round, and (runs with ``federation.client_eval``) the
  fairness plot: the distribution over clients of each configuration's per-client score at its last
  evaluation (client_metrics.csv). A plot whose grouping has fewer than two values is skipped, with a
  note in report.md.

Runs with ``federation.client_eval`` have the per-client statistics of the score as columns of "All
configurations" (final client_…_mean, _p10: the worst-off tenth, _std; ravan_ray/client_eval.py).

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
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import pandas as pd

from ravan_ray.report.plots import plot_budget_mix, plot_fairness, plot_heads, plot_per_round, plot_run
from ravan_ray.report.runs import (IGNORED_MIX_MARK, IGNORED_MIX_NOTE, ReportError, display, find_runs, in_percent,
                                   metric_label, read_runs, score_name, task_metrics)
from ravan_ray.report.selection import choose, select_configurations, selection_markdown
from ravan_ray.report.tables import (marked, markdown_table, pivot_markdown, report_tables, score_cell, short_name,
                                     summarise, varying_keys)

__all__ = ["ReportError", "choose", "find_runs", "markdown_table", "plot_run", "read_runs", "select_configurations",
           "summarise", "write_report"]


def write_report(dirs: list[Path], output: Optional[Path] = None, select: Sequence[str] = (),
                 select_on: str = "final", rows: Sequence[str] = (), per_seed: bool = False,
                 against: Optional[str] = None) -> Path:
    """Find the runs under ``dirs``, write report.md, report.csv, runs.csv and PNGs; returns report.md.
    ``select``: config keys tuned on the validation split (e.g. optimizer.lr): report.md then opens with the
    selected table (:func:`select_configurations`; ``per_seed``: chosen in every seed on its own; ``against``: the
    row, as labelled there, paired with every other instead of each column's best), and candidates.csv /
    selected.csv / chosen.csv hold its numbers."""
    dirs = [Path(d) for d in dirs]
    if per_seed and not select:
        raise ReportError("--per-seed goes with --select KEY (the key chosen per seed)")
    if against is not None and not select:
        raise ReportError("--against goes with --select KEY (it names a row of the selected table)")
    run_dirs = _run_dirs(dirs)
    output = Path(output) if output else (dirs[0] / "report" if len(dirs) == 1 else Path("report"))
    output.mkdir(parents=True, exist_ok=True)
    report = Report.read(run_dirs, dirs[0].resolve() if len(dirs) == 1 else None)
    selection = report.selection(output, list(select), select_on, per_seed, rows, against) if select else []
    report.runs.to_csv(output / "runs.csv", index=False)
    report.summary.to_csv(output / "report.csv", index=False)
    configurations = report.all_configurations()
    tables, single_valued = report.pivot_tables()
    plots, not_drawn = report.plots(output)
    lines = [*report.heading(dirs), *selection, *configurations, *tables, *plots, *_skipped(not_drawn + single_valued),
             *report.runs_table()]
    path = output / "report.md"
    path.write_text("\n".join(lines))
    return path


def _run_dirs(dirs: list[Path]) -> list[Path]:
    if not dirs:
        raise ReportError("give at least one run or sweep directory")
    run_dirs = find_runs(dirs)
    if not run_dirs:
        raise ReportError("no runs (directories with metrics.csv, config.yaml and summary.json) under "
                          + ", ".join(str(d) for d in dirs))
    return run_dirs


def _skipped(skipped: list[str]) -> list[str]:
    return ["## Skipped", ""] + [f"- {s}" for s in skipped] + [""] if skipped else []


@dataclass
class Report:
    """The runs a report covers, grouped into configurations, and the sections of report.md drawn from them."""

    runs: pd.DataFrame  # one row per run: its flattened config and summary
    rounds: pd.DataFrame  # metrics.csv rows of all runs
    keys: list[str]  # the config keys that differ between runs, seeds aside
    summary: pd.DataFrame  # one row per configuration: mean, std and n over seeds
    score: str  # the runs' task's primary metric, or "score" when their tasks rank by different metrics

    @classmethod
    def read(cls, run_dirs: list[Path], root: Optional[Path]) -> "Report":
        runs, rounds = read_runs(run_dirs, root)
        keys = varying_keys(runs)
        return cls(runs, rounds, keys, summarise(runs, keys), score_name(runs))

    @property
    def percent(self) -> bool:
        return in_percent(self.score, self.runs)

    @property
    def score_text(self) -> str:
        return metric_label(self.score, self.percent)

    def selection(self, output: Path, tuned: list[str], select_on: str, per_seed: bool,
                  rows: Sequence[str], against: Optional[str] = None) -> list[str]:
        """The configurations chosen on the validation split (candidates.csv, selected.csv, chosen.csv: a row per
        configuration and seed) and their section."""
        candidates, selected, chosen = select_configurations(self.runs, self.rounds, tuned, self.keys, self.score,
                                                             select_on, per_seed)
        candidates.to_csv(output / "candidates.csv", index=False)
        selected.to_csv(output / "selected.csv", index=False)
        chosen.to_csv(output / "chosen.csv", index=False)
        return selection_markdown(self.runs, candidates, selected, chosen, tuned, self.keys, self.score, select_on,
                                  per_seed, rows, against)

    def heading(self, dirs: list[Path]) -> list[str]:
        runs, summary, score = self.runs, self.summary, self.score
        ranked_by = (f"the final {score.replace('_', ' ')}" if score != "score"
                     else "the final value of each run's task's primary metric (column `metric`)")
        return [f"# Report: {len(runs)} run{'s' * (len(runs) != 1)} in {len(summary)} "
                f"configuration{'s' * (len(summary) != 1)}", "",
                "Sources: " + ", ".join(f"`{d}`" for d in dirs), "",
                f"Scores ({'in %, ' if self.percent else ''}as mean ± sample std (number of seeds)) are {ranked_by}. "
                "Configurations differ in: " + (", ".join(f"`{k}`" for k in self.keys) or "nothing (seeds only)")
                + ".", ""]

    def all_configurations(self) -> list[str]:
        """Every configuration: its score (final and best), the task's other metrics, traffic and time."""
        runs, summary, keys, score, percent = self.runs, self.summary, self.keys, self.score, self.percent
        others = [m for m in task_metrics(runs) if m != score and f"final_{m}_mean" in summary]
        header = [short_name(k) for k in keys] + (["metric"] if score == "score" else []) + [
            "n", "seeds", f"final {self.score_text}", f"best {self.score_text}"] + [
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
        return ["## All configurations", "", *_with_mix_note(markdown_table(header, table))]

    def pivot_tables(self) -> tuple[list[str], list[str]]:
        """A table per key the report's tables pivot on (task, method, budget mix, each method's ablations, data
        partition) that differs between the runs; and the line naming those that do not."""
        lines, single = [], []
        for table in report_tables(self.runs):
            present = [k for k in table.rows if k in self.keys]
            if not present:
                single.append(" / ".join(f"`{k}`" for k in table.rows))
                continue
            heading = table.title.replace("score", self.score.replace("_", " ") if self.score != "score" else "score")
            pivot = pivot_markdown(self.summary, present, table.columns(self.keys), self.score, self.percent)
            lines += [f"## {heading}", "", *_with_mix_note(pivot)]
        return lines, (["Tables per " + ", ".join(single) + ": a single value in these runs"] if single else [])

    def plots(self, output: Path) -> tuple[list[str], list[str]]:
        """The PNGs, and why each plot that is not drawn is not (its grouping has fewer than two values)."""
        runs, rounds, keys, score, percent = self.runs, self.rounds, self.keys, self.score, self.percent
        named = score.replace("_", " ")
        plots = [
            ("accuracy_per_round.png", f"{named.capitalize()} per round",
             lambda p: plot_per_round(runs, rounds, keys, score, self.score_text, named.capitalize(), p, percent)),
            ("accuracy_by_budget_mix.png", f"Final {named} by budget mix",
             lambda p: plot_budget_mix(self.summary, keys, p, score, percent)),
            ("heads_gain.png", f"{named.capitalize()} gain vs heads",
             lambda p: plot_heads(runs, self.summary, keys, p, score, percent)),
            ("effective_rank.png", "Effective rank per round",
             lambda p: plot_per_round(runs, rounds, keys, "effective_rank", "effective rank",
                                      "Effective rank of the aggregated update", p)),
            ("fairness.png", f"Per-client {named} (fairness)",
             lambda p: plot_fairness(runs, keys, p, score, percent) if score != "score"
             else "the runs' tasks have different primary metrics"),
        ]
        lines, not_drawn = ["## Plots", ""], []
        for filename, title, draw in plots:
            reason = draw(output / filename)
            if reason:
                not_drawn.append(f"{title} plot: {reason}")
                (output / filename).unlink(missing_ok=True)
            else:
                lines += [f"### {title}", "", f"![{title}]({filename})", ""]
        return lines, not_drawn

    def runs_table(self) -> list[str]:
        return ["## Runs", "", markdown_table(["run", "seed", f"final {self.score_text}", "rounds"], [
            [r["run"], r.get("seed"), score_cell(r[f"final_{self.score}"], math.nan, 1, self.percent).replace(" (1)", ""),
             r["rounds"]] for _, r in self.runs.iterrows()]), ""]


def _with_mix_note(table: str) -> list[str]:
    """A markdown table, with the footnote on methods that ignore the budget mix where it marks one."""
    return [table, ""] + ([IGNORED_MIX_NOTE, ""] if IGNORED_MIX_MARK in table else [])
