"""Selection on the validation split (``--select KEY``): per configuration of the other keys, the tuned
value with the best validation metric (its mean over seeds, or with ``per_seed`` each seed's own), its test
score over seeds, and paired intervals between the best row (or the ``--against`` row) and every other."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd

from ravan_ray.report.runs import LOWER_IS_BETTER, ReportError, displayed, display, in_percent, metric_label
from ravan_ray.report.tables import in_order, markdown_table, score_cell, short_name
from ravan_ray.results import validation_name

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
    With a ``selection_rounds`` column (the rounds the candidate's runs got through), the candidates that ran
    the most rounds are compared first: successive halving (ASHA) stopped the others at a rung for being worse
    there, and a metric from an earlier round is no match for one from the full schedule.

    ``candidates`` holds only the setting keys, the tuned keys and the validation numbers: this function
    cannot see a test metric, so selection cannot depend on one."""
    allowed = set(setting_keys) | set(tuned) | {"selection_mean", "selection_rounds"}
    if set(candidates.columns) - allowed:
        raise ValueError(f"choose() sees only validation columns, got {sorted(set(candidates.columns) - allowed)}")
    frame = candidates.dropna(subset=["selection_mean"])
    first = ["selection_rounds"] if "selection_rounds" in frame else []
    frame = frame.sort_values([*first, "selection_mean", *tuned],
                              ascending=[False] * len(first) + [not higher_is_better] + [True] * len(tuned),
                              kind="stable")
    if not setting_keys:
        return frame.head(1)
    return frame.groupby(displayed(frame[setting_keys]).agg("\x1f".join, axis=1), sort=False).head(1)


def select_configurations(runs: pd.DataFrame, rounds: pd.DataFrame, tuned: list[str], keys: list[str],
                          score: str, select_on: str = "final",
                          per_seed: bool = False) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(candidates: one row per configuration, every tuned value, its mean validation metric and test metric over
    seeds, ``chosen`` marking a selected one and ``chosen_seeds`` the seeds it was selected in; selected: one row
    per setting of the other differing keys, the chosen tuned values and the test metric's mean, std (ddof 1)
    and n over seeds; chosen: one row per setting and seed, the run selected there, ``edge`` when its tuned
    value is the smallest or largest of three or more tried).

    A setting's tuned values are chosen by the mean over seeds of the validation metric, or (``per_seed``) for
    every seed by that seed's validation metric alone: the protocol repeated per seed, as a sweep that halves
    and extends its grids per seed runs it (ravan_ray/sweep_search.py). The selected row's tuned column then
    lists the seeds' values in seed order. See :func:`selection_scores` for ``select_on``; either way only
    then is the test metric read. Runs that got through more rounds are compared first (:func:`choose`)."""
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
    frame["selection_rounds"] = frame["rounds"]
    group_keys = settings + tuned
    grouped = frame.groupby(group_keys, dropna=False, sort=True)
    candidates = grouped.size().rename("n").to_frame()
    candidates["selection_mean"] = grouped["selection_value"].mean()
    candidates["selection_rounds"] = grouped["selection_rounds"].min()
    candidates["test_mean"] = grouped["selected_test"].mean()
    candidates["test_std"] = grouped["selected_test"].std(ddof=1)
    candidates["seeds"] = grouped["seed"].agg(seed_list)
    candidates = candidates.reset_index()
    higher = not lower_is_better(score)
    if per_seed:
        picked = choose(frame[settings + ["seed"] + tuned + ["selection_rounds"]].assign(
            selection_mean=frame["selection_value"]), settings + ["seed"], tuned, higher)
        chosen = frame.loc[picked.index]
    else:
        picked = choose(candidates[group_keys + ["selection_mean", "selection_rounds"]], settings, tuned, higher)
        picked_keys = set(displayed(candidates.loc[picked.index, group_keys]).apply(tuple, axis=1))
        chosen = frame[[key in picked_keys for key in displayed(frame[group_keys]).apply(tuple, axis=1)]]
    chosen = chosen.sort_values([*settings, "seed"], kind="stable").reset_index(drop=True)
    chosen["edge"] = [_at_edge(frame, row, settings + (["seed"] if per_seed else []), tuned)
                      for _, row in chosen.iterrows()]

    def seeds_choosing(row: pd.Series) -> str:
        match = chosen
        for key in group_keys:
            match = match[displayed(match[key]) == display(row[key])]
        return seed_list(match["seed"])

    candidates["chosen_seeds"] = [seeds_choosing(row) for _, row in candidates.iterrows()]
    candidates["chosen"] = candidates["chosen_seeds"] != ""
    rows = []
    for _, group in chosen.groupby(displayed(chosen[settings]).agg("\x1f".join, axis=1) if settings else
                                   pd.Series(0, index=chosen.index), sort=False):
        first = group.iloc[0]
        row = {k: first[k] for k in settings}
        for key in tuned:
            values = [display(v) for v in group[key]]
            row[key] = first[key] if not per_seed else " ".join(values)
        tests = group["selected_test"].astype(float)
        row.update(n=len(group), test_mean=tests.mean(), test_std=tests.std(ddof=1) if len(group) > 1 else math.nan,
                   seeds=seed_list(group["seed"]),
                   edge_seeds=seed_list(group.loc[group["edge"], "seed"]))
        rows.append(row)
    selected = pd.DataFrame(rows)
    return candidates, selected, chosen


def seed_list(seeds) -> str:
    return " ".join(str(v) for v in sorted(seeds))


def _at_edge(frame: pd.DataFrame, row: pd.Series, within: list[str], tuned: list[str]) -> bool:
    """Whether a chosen run's numeric tuned value is the smallest or largest of three or more tried by the runs
    that share its ``within`` keys (its setting, and with per-seed selection its seed)."""
    tried = frame
    for key in within:
        tried = tried[displayed(tried[key]) == display(row[key])]
    for key in tuned:
        values = pd.to_numeric(tried[key], errors="coerce").dropna().unique()
        value = pd.to_numeric(pd.Series([row[key]]), errors="coerce").iloc[0]
        if len(values) >= 3 and not math.isnan(value) and value in (values.min(), values.max()):
            return True
    return False


def paired_difference(first: pd.Series, second: pd.Series, confidence: float = 0.95) -> dict[str, Any]:
    """The difference first - second of two settings' selected test metrics (Series indexed by seed) over the
    seeds both ran (paired by seed: the same data split and client sampling), with a Student-t interval on
    the mean difference (scipy.stats.t; needs two common seeds or more)."""
    from scipy import stats

    common = sorted(set(first.index) & set(second.index))
    diffs = np.array([first[s] - second[s] for s in common], dtype=float)
    out: dict[str, Any] = {"n": len(common), "mean": float(diffs.mean()) if len(diffs) else math.nan,
                           "low": math.nan, "high": math.nan}
    if len(diffs) >= 2:
        half = stats.t.ppf(0.5 + confidence / 2, len(diffs) - 1) * diffs.std(ddof=1) / math.sqrt(len(diffs))
        out["low"], out["high"] = out["mean"] - half, out["mean"] + half
    return out


def paired_verdict(diff: dict[str, Any], names: tuple[str, str], higher_is_better: bool) -> str:
    """What a paired difference (``names[0]`` minus ``names[1]``, from :func:`paired_difference`) says: no interval
    below two seeds, level where the interval holds 0, else which side is ahead in the score's own direction (a
    positive difference of losses puts the second ahead)."""
    if diff["n"] < 2:
        return f"{diff['n']} common seed(s): no interval; run more seeds before calling a winner"
    if diff["low"] <= 0 <= diff["high"]:
        return "level within noise (the interval contains 0)"
    first_ahead = (diff["mean"] > 0) == higher_is_better
    return f"{names[0] if first_ahead else names[1]} ahead (the interval excludes 0)"


@dataclass
class SelectionView:
    """How the selected table is laid out: its row keys (``--rows``, by default the method, or the first other
    differing key) and column keys (the remaining settings), the row and column values present, and lookups into the
    selection's frames (``selected``: a row per configuration; ``chosen``: a row per configuration and seed)."""

    runs: pd.DataFrame
    candidates: pd.DataFrame
    selected: pd.DataFrame
    chosen: pd.DataFrame
    tuned: list[str]
    settings: list[str]  # the differing keys that are not tuned
    row_keys: list[str]
    col_keys: list[str]
    rows_seen: list[tuple]
    cols_seen: list[tuple]
    percent: bool
    higher: bool  # whether a higher score is better
    per_seed: bool  # chosen in every seed on its own
    against: Optional[tuple] = None  # the row every other is paired with; None: each column's best

    @classmethod
    def of(cls, runs: pd.DataFrame, candidates: pd.DataFrame, selected: pd.DataFrame, chosen: pd.DataFrame,
           tuned: list[str], keys: list[str], score: str, per_seed: bool, rows: Sequence[str],
           against: Optional[str] = None) -> "SelectionView":
        settings = [k for k in keys if k not in tuned]
        unknown = [k for k in rows if k not in settings]
        if unknown:
            raise ReportError(f"--rows {unknown[0]}: not a key that differs between these runs "
                              f"(those are: {', '.join(settings) or 'none'})")
        row_keys = list(rows) or (["method.name"] if "method.name" in settings else settings[:1])
        col_keys = [k for k in settings if k not in row_keys]
        rows_seen = in_order(list(set(_labels(selected, row_keys)))) if row_keys else [()]
        cols_seen = in_order(list(set(_labels(selected, col_keys)))) if col_keys else [()]
        against_row = None
        if against is not None:
            # the label as the table's first column shows it ("ravan", "ravan / normal"); spaces around "/" do not
            # matter, so both sides are compared with them made uniform (a value may hold "/" itself: a path)
            def uniform(label: str) -> str:
                return re.sub(r"\s*/\s*", " / ", label.strip())

            against_row = next((r for r in rows_seen if uniform(" / ".join(r)) == uniform(against)), None)
            if against_row is None:
                raise ReportError(f"--against {against}: not a row of the selected table (its rows: "
                                  + ", ".join(" / ".join(r) for r in rows_seen) + ")")
        return cls(runs, candidates, selected, chosen, tuned, settings, row_keys, col_keys, rows_seen, cols_seen,
                   in_percent(score, runs), not lower_is_better(score), per_seed, against_row)

    def _at(self, frame: pd.DataFrame, row_value: tuple, col_value: tuple) -> pd.DataFrame:
        return frame[(_labels(frame, self.row_keys) == row_value) & (_labels(frame, self.col_keys) == col_value)]

    def lookup(self, row_value: tuple, col_value: tuple) -> Optional[pd.Series]:
        """The selected configuration at this row and column, or None."""
        match = self._at(self.selected, row_value, col_value)
        return None if match.empty else match.iloc[0]

    def per_seed_tests(self, row_value: tuple, col_value: tuple) -> pd.Series:
        """The test score of the choice, per seed (the series paired intervals pair)."""
        return self._at(self.chosen, row_value, col_value).groupby("seed")["selected_test"].mean()

    def tuned_text(self, row_value: tuple, col_value: tuple) -> str:
        """The chosen values (per seed, in seed order, with ``per_seed``), each marked where it is an edge."""
        match = self._at(self.chosen, row_value, col_value)
        if not self.per_seed:
            first = match.iloc[0]
            return ", ".join(f"{short_name(k)} {display(first[k])}" + (" (edge)" if match["edge"].any() else "")
                             for k in self.tuned)
        return "; ".join(f"{short_name(k)} " + ", ".join(display(v) + (" (edge)" if edge else "")
                                                        for v, edge in zip(match[k], match["edge"]))
                         for k in self.tuned)

    def ranked(self, col_value: tuple) -> list[tuple[pd.Series, tuple]]:
        """(selected configuration, row value) of every row with a test score in this column, best first."""
        found = [(self.lookup(r, col_value), r) for r in self.rows_seen if self.lookup(r, col_value) is not None]
        found = [(f, r) for f, r in found if not math.isnan(f["test_mean"])]
        return sorted(found, key=lambda x: x[0]["test_mean"], reverse=self.higher)


def _labels(frame: pd.DataFrame, which: list[str]) -> pd.Series:
    """Each row's values of ``which``, as displayed, in one tuple."""
    return displayed(frame[which]).apply(tuple, axis=1) if which else pd.Series([()] * len(frame), index=frame.index)


def selection_markdown(runs: pd.DataFrame, candidates: pd.DataFrame, selected: pd.DataFrame, chosen: pd.DataFrame,
                       tuned: list[str], keys: list[str], score: str, select_on: str, per_seed: bool = False,
                       rows: Sequence[str] = (), against: Optional[str] = None) -> list[str]:
    """The paper-style table (rows: ``rows``, by default the method, or the first other differing key;
    columns: the remaining settings; cells: test mean ± std (n seeds) at the chosen tuned values, the best
    per column in bold), the paired interval of the best row (or the ``against`` row) against every other per
    column, the choice per seed with the values tried, and every candidate configuration."""
    view = SelectionView.of(runs, candidates, selected, chosen, tuned, keys, score, per_seed, rows, against)
    return [*_introduction(view, score, select_on), *_selected_table(view, score), *_best_against_others(view),
            *_choice_per_seed(view, score, select_on), *_every_candidate(view, score, select_on)]


def _introduction(view: SelectionView, score: str, select_on: str) -> list[str]:
    names = ", ".join(f"`{k}`" for k in view.tuned)
    how = ("the final round's" if select_on == "final" else "the best round's (test read at that round)")
    return [f"## Selected on validation: {names}", "",
            f"For every configuration of the other keys, the value of {names} with the best {how} "
            f"`{validation_name(score)}` "
            f"{'is chosen in each seed on that seed alone' if view.per_seed else 'mean over seeds is chosen'} "
            f"(runs that got through more rounds first: a run stopped early by successive halving loses to one "
            f"that ran the schedule); the cells are the {score.replace('_', ' ')}{' in %' if view.percent else ''} "
            f"of that choice, mean ± sample std (number of seeds), best per column in bold, with the chosen "
            f"{names}{' per seed, in seed order' if view.per_seed else ''}. Test metrics play no part in the "
            "choice.", ""]


def _selected_table(view: SelectionView, score: str) -> list[str]:
    """The table of chosen configurations, the best per column in bold, with a note where a choice is at the edge of
    the values tried."""
    best = {col: view.ranked(col)[0][1] for col in view.cols_seen if view.ranked(col)}
    header = [" / ".join(short_name(k) for k in view.row_keys) or "configuration"] + (
        [", ".join(f"{short_name(k)}={v}" for k, v in zip(view.col_keys, col)) for col in view.cols_seen]
        if view.col_keys else
        [f"{metric_label(score, view.percent)} (chosen {', '.join(short_name(k) for k in view.tuned)})"])
    table = []
    for row_value in view.rows_seen:
        line = [" / ".join(row_value) or "all runs"]
        for col_value in view.cols_seen:
            found = view.lookup(row_value, col_value)
            if found is None:
                line.append("–")
                continue
            cell = score_cell(found["test_mean"], found["test_std"], int(found["n"]), view.percent)
            if best.get(col_value) == row_value:
                cell = f"**{cell}**"
            line.append(f"{cell} [{view.tuned_text(row_value, col_value)}]")
        table.append(line)
    lines = [markdown_table(header, table), ""]
    if view.chosen["edge"].any():
        lines += ["(edge): the chosen value is the smallest or largest of three or more tried; the best may lie "
                  "outside the grid, so widen it before trusting that row.", ""]
    return lines


def _best_against_others(view: SelectionView) -> list[str]:
    """Per column, the best row's (or the ``against`` row's) difference to every other row, paired by seed, with
    its interval and verdict."""
    scale = 100.0 if view.percent else 1.0
    unit = " points" if view.percent else ""
    notes = []
    for col_value in view.cols_seen:
        ranked = [row for _, row in view.ranked(col_value)]
        top_row = view.against if view.against is not None else (ranked[0] if ranked else None)
        if top_row not in ranked or len(ranked) < 2:
            continue
        where = ", ".join(f"{short_name(k)}={v}" for k, v in zip(view.col_keys, col_value))
        for other_row in [row for row in ranked if row != top_row]:
            diff = paired_difference(view.per_seed_tests(top_row, col_value),
                                     view.per_seed_tests(other_row, col_value))
            names = (" / ".join(top_row) or "first", " / ".join(other_row) or "second")
            if diff["n"] < 2:
                text = f"{scale * diff['mean']:+.2f}{unit}"
            else:
                text = (f"{scale * diff['mean']:+.2f}{unit}, 95% paired t-interval [{scale * diff['low']:+.2f}, "
                        f"{scale * diff['high']:+.2f}] over {diff['n']} seeds")
            notes.append(f"- {where + ': ' if where else ''}{names[0]} - {names[1]} = {text}: "
                         f"{paired_verdict(diff, names, view.higher)}.")
    if not notes:
        return []
    whose = ("The best row" if view.against is None else f"{' / '.join(view.against)} (`--against`)")
    return [f"{whose} against every other, per column, paired by seed (same data split and client "
            "sampling; each side at its own chosen values):", "", *notes, ""]


def _choice_per_seed(view: SelectionView, score: str, select_on: str) -> list[str]:
    """A row per configuration and seed: the chosen values, the rounds that run played, its validation and test
    scores, and the values tried in that seed."""
    header = [short_name(k) for k in view.settings] + ["seed"] + [f"chosen {short_name(k)}" for k in view.tuned] + [
        "rounds", f"{select_on} {metric_label(validation_name(score), view.percent)}",
        metric_label(score, view.percent)] + [f"{short_name(k)} tried" for k in view.tuned]
    listed = []
    for _, row in view.chosen.iterrows():
        tried = view.runs
        for key in view.settings + ["seed"]:
            tried = tried[displayed(tried[key]) == display(row[key])]
        listed.append([display(row[k]) for k in view.settings] + [display(row["seed"])] + [
            display(row[k]) + (" (edge)" if row["edge"] else "") for k in view.tuned] + [
            display(row["rounds"]),
            score_cell(row["selection_value"], math.nan, 1, view.percent).replace(" (1)", ""),
            score_cell(row["selected_test"], math.nan, 1, view.percent).replace(" (1)", "")] + [
            ", ".join(display(v) for v in in_order(list(tried[k].dropna().unique()))) for k in view.tuned])
    return ["### The choice per seed and the values tried", "", markdown_table(header, listed), ""]


def _every_candidate(view: SelectionView, score: str, select_on: str) -> list[str]:
    """Every configuration tried, with its validation and test scores, the chosen ones marked (with
    ``per_seed``: the seeds that chose it)."""
    keys = view.settings + view.tuned
    header = [short_name(k) for k in keys] + [
        "n", "seeds", f"{select_on} {metric_label(validation_name(score), view.percent)}",
        metric_label(score, view.percent), "chosen"]
    listed = []
    for _, row in view.candidates.iterrows():
        n = int(row["n"])
        mark = ("✓" if row["chosen"] else "") if not view.per_seed else (
            f"seeds {row['chosen_seeds']}" if row["chosen"] else "")
        listed.append([display(row[k]) for k in keys] + [
            n, row["seeds"], score_cell(row["selection_mean"], math.nan, 1, view.percent).replace(" (1)", ""),
            score_cell(row["test_mean"], row["test_std"], n, view.percent), mark])
    return ["### Every candidate (the chosen ones marked)", "", markdown_table(header, listed), ""]
