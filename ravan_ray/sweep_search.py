"""What a sweep runs beyond Tune's own grid: grids that depend on another key, successive halving within
groups of trials, and a grid extended at its edges until the value chosen on validation is interior.

The paper's protocol tunes every method's learning rate on its own. Three pieces make that one sweep:

- **Per-case grids** (``by`` / ``grids``): full fine-tuning and the adapters need rates two orders of
  magnitude apart, so a key's grid may depend on another key's value in the same trial::

      optimizer.lr: {grid: [0.002, 0.005, 0.01], by: method.name, grids: {full_ft: [2.0e-5, 5.0e-5, 1.0e-4]}}

  ``by`` is read from the trial's config (the base with the keys swept before this one set, whole swept
  sections included), so it must be swept earlier in ``search_space`` or be fixed in the base.
- **Successive halving per group** (``scheduler.asha.group_by``): :class:`GroupedASHA` runs one
  ``ASHAScheduler`` per value of the listed keys (e.g. ``[method.name, seed]``), so a trial is only ever
  stopped for being worse than trials of its own group. One ASHA over a method comparison would compare
  one method's rates with another method's and stop every rate of a method that is slower early on.
- **Edge extension** (``extend: {factor, max_steps}`` on a grid of numbers): after the grid's trials end,
  for every group (the values of all the other swept keys) the value with the best validation metric is
  chosen (:func:`ravan_ray.report.selection.choose`, the rule ``ravan-ray report --select`` uses); if it
  is the largest or smallest tried, that group's next value beyond it (times or divided by ``factor``)
  runs, and so on, at most ``max_steps`` values beyond the grid per group. The extension trials run as
  further Tune experiments in ``SWEEP/extend_K`` (K = 1, 2, ...), so the sweep directory holds every trial
  and a restored sweep redoes none: each stage's points are a function of the earlier stages' results.

Points are expanded here (:func:`expand_points`) and handed to Tune as ``points_to_evaluate``, in the order
of ``search_space``: the first key varies slowest, so list the grouping keys first and a group's values
run one after another (its successive halving then has something to compare with).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterable, Optional

from ravan_ray.config import ConfigError

EXTEND_DEFAULTS = {"factor": 2.0, "max_steps": 3}
STAGE_PREFIX = "extend_"


def set_keys(base: dict[str, Any], sampled: dict[str, Any]) -> dict[str, Any]:
    """The base config values with the sampled dotted keys set (a swept section replaces the base's)."""
    values = copy.deepcopy(base)
    for key, value in sorted(sampled.items()):
        node = values
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"'{part}' in '{key}' is not a config section")
            node = child
        node[parts[-1]] = plain(value)
    return values


def plain(value: Any) -> Any:
    """Tune samples numpy scalars; the config wants plain Python values."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (list, dict, str)) else value


def lookup(values: dict[str, Any], key: str) -> Any:
    """The value of a dotted key in nested config values (None when unset: the config's default)."""
    node: Any = values
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def group_key(base: dict[str, Any], sampled: dict[str, Any], keys: Iterable[str]) -> str:
    """A trial's group: the values of ``keys`` in its config, as one hashable text."""
    values = set_keys(base, sampled)
    return json.dumps([lookup(values, key) for key in keys], sort_keys=True, default=str)


def case_grid(spec: dict[str, Any], values: dict[str, Any]) -> list[Any]:
    """The grid of a spec for a trial whose config so far is ``values``: the case of its ``by`` key's value
    when ``grids`` lists one, else the spec's ``grid``."""
    if "by" not in spec:
        return list(spec["grid"])
    case = lookup(values, spec["by"])
    for name, grid in spec["grids"].items():
        if str(name) == str(case):
            return list(grid)
    return list(spec["grid"])


def expand_points(space: dict[str, dict[str, Any]], base: dict[str, Any]) -> list[dict[str, Any]]:
    """Every trial of a search space of grids (some per case), the first key varying slowest."""
    points: list[dict[str, Any]] = [{}]
    for key, spec in space.items():
        points = [{**point, key: value} for point in points
                  for value in case_grid(spec, set_keys(base, point))]
    return points


def extended_key(space: dict[str, dict[str, Any]]) -> Optional[str]:
    return next((key for key, spec in space.items() if "extend" in spec), None)


def extension_points(space: dict[str, dict[str, Any]], base: dict[str, Any],
                     trials: list[dict[str, Any]], higher_is_better: bool) -> list[dict[str, Any]]:
    """The next stage's trials: per group, the value beyond the chosen one where that is at an edge.

    ``trials``: every trial so far, each ``{"sampled": its swept values, "rounds": rounds run, "value": its
    final validation metric (NaN when it has none)}``. Within a group the trials that ran the most rounds are
    compared first (successive halving stopped the others for being worse at a rung), then the validation
    metric; a group with fewer than two values tried, or with ``max_steps`` values beyond its grid already,
    is left as it is."""
    import pandas as pd

    from ravan_ray.report.selection import choose

    key = extended_key(space)
    if key is None:
        return []
    spec = space[key]
    factor, max_steps = spec["extend"]["factor"], spec["extend"]["max_steps"]
    others = [k for k in space if k != key]
    groups: dict[str, list[dict[str, Any]]] = {}
    for trial in trials:
        rest = {k: v for k, v in trial["sampled"].items() if k != key}
        groups.setdefault(json.dumps([rest.get(k) for k in others], sort_keys=True, default=str), []).append(trial)
    points = []
    for members in groups.values():
        rest = {k: v for k, v in members[0]["sampled"].items() if k != key}
        frame = pd.DataFrame({key: [float(t["sampled"][key]) for t in members],
                              "selection_mean": [float(t["value"]) for t in members],
                              "selection_rounds": [t["rounds"] or 0 for t in members]})
        chosen = choose(frame, [], [key], higher_is_better)
        tried = sorted(set(frame[key]))
        grid = {float(v) for v in case_grid(spec, set_keys(base, rest))}
        if chosen.empty or len(tried) < 2 or len([v for v in tried if v not in grid]) >= max_steps:
            continue
        value = float(chosen[key].iloc[0])
        if value == tried[-1]:
            beyond = value * factor
        elif value == tried[0]:
            beyond = value / factor
        else:
            continue
        points.append({**rest, key: float(f"{beyond:.4g}")})
    return points


def trial_history(run_dir: Path, metric: str) -> list[tuple[int, float]]:
    """(round, metric) of a finished trial's evaluated rounds, from its metrics.csv."""
    import pandas as pd

    path = run_dir / "metrics.csv"
    if not path.is_file():
        return []
    frame = pd.read_csv(path)
    if metric not in frame:
        return []
    frame = frame.dropna(subset=[metric])
    return [(int(r), float(v)) for r, v in zip(frame["round"], frame[metric]) if math.isfinite(v)]


def point_searcher(points: list[dict[str, Any]]):
    """A Tune searcher that suggests ``points`` in order, each once (their configs stay flat dotted keys, as
    a grid's do); Tune saves what is left with the experiment, so a restored sweep goes on where it was."""
    from ray.tune.search import Searcher

    class Points(Searcher):
        def __init__(self):
            super().__init__()
            self.left = [dict(point) for point in points]

        def set_search_properties(self, metric, mode, config, **spec) -> bool:
            return True

        def suggest(self, trial_id: str):
            return self.left.pop(0) if self.left else Searcher.FINISHED

        def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
            pass

        def get_state(self) -> dict[str, Any]:
            return {"left": self.left}

        def set_state(self, state: dict[str, Any]) -> None:
            self.left = state["left"]

        def save(self, checkpoint_path: str) -> None:
            Path(checkpoint_path).write_text(json.dumps(self.get_state()))

        def restore(self, checkpoint_path: str) -> None:
            self.set_state(json.loads(Path(checkpoint_path).read_text()))

    return Points()


def grouped_asha(base: dict[str, Any], group_by: list[str], history: list[tuple[dict, list]] = (), **asha):
    """A :class:`GroupedASHA` (built here so that Ray Tune is imported only when a sweep runs)."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    class GroupedASHA(FIFOScheduler):
        """One ASHAScheduler per group of trials (the values of ``group_by`` in each trial's config): a trial is
        compared only with the trials of its own group. Everything else (which trial runs next) is FIFO.

        ``history``: (sampled config, [(round, metric), ...]) of trials that ran before, in an earlier stage of
        the sweep; they are replayed into their groups' rungs, so a new trial is halved against them too."""

        def __init__(self):
            super().__init__()
            self._asha = asha
            self._groups: dict[str, Any] = {}
            for number, (sampled, rounds) in enumerate(history):
                self._replay(f"earlier-{number}", sampled, rounds)

        def _group(self, config: dict[str, Any]):
            key = group_key(base, config, group_by)
            if key not in self._groups:
                self._groups[key] = ASHAScheduler(**self._asha)
            return self._groups[key]

        def _replay(self, trial_id: str, sampled: dict[str, Any], rounds: list[tuple[int, float]]) -> None:
            scheduler, trial = self._group(sampled), SimpleNamespace(trial_id=trial_id, config=sampled)
            scheduler.on_trial_add(None, trial)
            results = [{self._asha["time_attr"]: r, self._asha["metric"]: v} for r, v in rounds]
            for result in results:
                scheduler.on_trial_result(None, trial, result)
            scheduler.on_trial_complete(None, trial, results[-1] if results else {})
            scheduler._trial_info.pop(trial_id, None)  # a trial with no metric is not cleared by ASHA itself

        def set_search_properties(self, metric, mode, **spec) -> bool:
            return not (metric or mode)  # the groups' metric is fixed at construction

        def on_trial_add(self, tune_controller, trial) -> None:
            self._group(trial.config).on_trial_add(tune_controller, trial)

        def on_trial_result(self, tune_controller, trial, result) -> str:
            return self._group(trial.config).on_trial_result(tune_controller, trial, result)

        def on_trial_complete(self, tune_controller, trial, result) -> None:
            self._group(trial.config).on_trial_complete(tune_controller, trial, result)

        def on_trial_remove(self, tune_controller, trial) -> None:
            self._group(trial.config).on_trial_remove(tune_controller, trial)

        def debug_string(self) -> str:
            return f"Successive halving in {len(self._groups)} group(s) of {', '.join(group_by)}"

    return GroupedASHA()
