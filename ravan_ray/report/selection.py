"""Selection on the validation split (``--select KEY``): per configuration of the other keys, the tuned
value with the best validation metric (its mean over seeds, or with ``per_seed`` each seed's own), its test
score over seeds, and paired intervals between the best and every other row."""

from __future__ import annotations

import math
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


def selection_markdown(runs: pd.DataFrame, candidates: pd.DataFrame, selected: pd.DataFrame, chosen: pd.DataFrame,
                       tuned: list[str], keys: list[str], score: str, select_on: str, per_seed: bool = False,
                       rows: Sequence[str] = ()) -> list[str]:
    """The paper-style table (rows: ``rows``, by default the method, or the first other differing key;
    columns: the remaining settings; cells: test mean ± std (n seeds) at the chosen tuned values, the best
    per column in bold), the paired interval of the best row against every other per column, the choice per
    seed with the values tried, and every candidate configuration."""
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
    names = ", ".join(f"`{k}`" for k in tuned)
    lines = [f"## Selected on validation: {names}", "",
             f"For every configuration of the other keys, the value of {names} with the best {how} `{val}` "
             f"{'is chosen in each seed on that seed alone' if per_seed else 'mean over seeds is chosen'} "
             f"(runs that got through more rounds first: a run stopped early by successive halving loses to one "
             f"that ran the schedule); the cells are the {score.replace('_', ' ')}{' in %' if percent else ''} of "
             f"that choice, mean ± sample std (number of seeds), best per column in bold, with the chosen "
             f"{names}{' per seed, in seed order' if per_seed else ''}. Test metrics play no part in the choice.", ""]

    def label(frame: pd.DataFrame, which: list[str]) -> pd.Series:
        return displayed(frame[which]).apply(tuple, axis=1) if which else pd.Series([()] * len(frame),
                                                                                     index=frame.index)

    rows_seen = in_order(list(set(label(selected, row_keys)))) if row_keys else [()]
    cols_seen = in_order(list(set(label(selected, col_keys)))) if col_keys else [()]
    chosen_rows, chosen_cols = label(chosen, row_keys), label(chosen, col_keys)

    def lookup(row_value, col_value) -> Optional[pd.Series]:
        match = selected[(label(selected, row_keys) == row_value) & (label(selected, col_keys) == col_value)]
        return None if match.empty else match.iloc[0]

    def per_seed_tests(row_value, col_value) -> pd.Series:
        match = chosen[(chosen_rows == row_value) & (chosen_cols == col_value)]
        return match.groupby("seed")["selected_test"].mean()

    def tuned_text(row_value, col_value) -> str:
        match = chosen[(chosen_rows == row_value) & (chosen_cols == col_value)]
        if not per_seed:
            first = match.iloc[0]
            return ", ".join(f"{short_name(k)} {display(first[k])}" + (" (edge)" if match["edge"].any() else "")
                             for k in tuned)
        return "; ".join(f"{short_name(k)} " + ", ".join(display(v) + (" (edge)" if edge else "")
                                                            for v, edge in zip(match[k], match["edge"]))
                         for k in tuned)

    best = {}
    for col_value in cols_seen:
        means = [(lookup(r, col_value)["test_mean"], r) for r in rows_seen if lookup(r, col_value) is not None]
        means = [(m, r) for m, r in means if not math.isnan(m)]
        if means:
            best[col_value] = (max if higher else min)(means, key=lambda x: x[0])[1]
    header = [" / ".join(short_name(k) for k in row_keys) or "configuration"] + (
        [", ".join(f"{short_name(k)}={v}" for k, v in zip(col_keys, col)) for col in cols_seen]
        if col_keys else [f"{metric_label(score, percent)} (chosen {', '.join(short_name(k) for k in tuned)})"])
    table = []
    for row_value in rows_seen:
        line = [" / ".join(row_value) or "all runs"]
        for col_value in cols_seen:
            found = lookup(row_value, col_value)
            if found is None:
                line.append("–")
                continue
            cell = score_cell(found["test_mean"], found["test_std"], int(found["n"]), percent)
            if best.get(col_value) == row_value:
                cell = f"**{cell}**"
            line.append(f"{cell} [{tuned_text(row_value, col_value)}]")
        table.append(line)
    lines += [markdown_table(header, table), ""]
    if chosen["edge"].any():
        lines += ["(edge): the chosen value is the smallest or largest of three or more tried; the best may lie "
                  "outside the grid, so widen it before trusting that row.", ""]

    notes = []
    unit = " points" if percent else ""
    for col_value in cols_seen:
        ranked = [(lookup(r, col_value), r) for r in rows_seen if lookup(r, col_value) is not None]
        ranked = [(f, r) for f, r in ranked if not math.isnan(f["test_mean"])]
        if len(ranked) < 2:
            continue
        ranked.sort(key=lambda x: x[0]["test_mean"], reverse=higher)
        top_row = ranked[0][1]
        where = ", ".join(f"{short_name(k)}={v}" for k, v in zip(col_keys, col_value))
        for _, other_row in ranked[1:]:
            diff = paired_difference(per_seed_tests(top_row, col_value), per_seed_tests(other_row, col_value))
            names_ = (" / ".join(top_row) or "first", " / ".join(other_row) or "second")
            if diff["n"] < 2:
                verdict = f"{diff['n']} common seed(s): no interval; run more seeds before calling a winner"
                text = f"{scale * diff['mean']:+.2f}{unit}"
            else:
                inside = diff["low"] <= 0 <= diff["high"]
                verdict = ("level within noise (the interval contains 0)" if inside
                           else f"{names_[0]} ahead (the interval excludes 0)")
                text = (f"{scale * diff['mean']:+.2f}{unit}, 95% paired t-interval [{scale * diff['low']:+.2f}, "
                        f"{scale * diff['high']:+.2f}] over {diff['n']} seeds")
            notes.append(f"- {where + ': ' if where else ''}{names_[0]} - {names_[1]} = {text}: {verdict}.")
    if notes:
        lines += ["The best row against every other, per column, paired by seed (same data split and client "
                  "sampling; each side at its own chosen values):", "", *notes, ""]

    lines += [f"### The choice per seed and the values tried", ""]
    header = [short_name(k) for k in settings] + ["seed"] + [f"chosen {short_name(k)}" for k in tuned] + [
        "rounds", f"{select_on} {metric_label(val, percent)}", metric_label(score, percent)] + [
        f"{short_name(k)} tried" for k in tuned]
    listed = []
    for _, row in chosen.iterrows():
        tried = runs
        for key in settings + ["seed"]:
            tried = tried[displayed(tried[key]) == display(row[key])]
        listed.append([display(row[k]) for k in settings] + [display(row["seed"])] + [
            display(row[k]) + (" (edge)" if row["edge"] else "") for k in tuned] + [
            display(row["rounds"]),
            score_cell(row["selection_value"], math.nan, 1, percent).replace(" (1)", ""),
            score_cell(row["selected_test"], math.nan, 1, percent).replace(" (1)", "")] + [
            ", ".join(display(v) for v in in_order(list(tried[k].dropna().unique()))) for k in tuned])
    lines += [markdown_table(header, listed), ""]

    lines += ["### Every candidate (the chosen ones marked)", ""]
    header = [short_name(k) for k in settings + tuned] + ["n", "seeds", f"{select_on} {metric_label(val, percent)}",
                                                     metric_label(score, percent), "chosen"]
    listed = []
    for _, row in candidates.iterrows():
        n = int(row["n"])
        mark = ("✓" if row["chosen"] else "") if not per_seed else (
            f"seeds {row['chosen_seeds']}" if row["chosen"] else "")
        listed.append([display(row[k]) for k in settings + tuned] + [
            n, row["seeds"], score_cell(row["selection_mean"], math.nan, 1, percent).replace(" (1)", ""),
            score_cell(row["test_mean"], row["test_std"], n, percent), mark])
    lines += [markdown_table(header, listed), ""]
    return lines
