"""Ray Tune sweeps over run configs: ``ravan-ray sweep TUNE_CONFIG.yaml [--address ADDR] [--output DIR]``.

A tune config (see tune_configs/) names a base run config and a search space over dotted config keys::

    name: heads
    base: {model: {name: minilm}, federation: {rounds: 12}}   # or  base_config: path/to/run.yaml
    search_space:
      method.heads: {grid: [1, 4, 8]}          # grid | choice: lists; uniform | loguniform | randint: [lo, hi]
      seed: {grid: [0, 1, 2]}
    num_samples: 1                             # repeats of the whole grid (and fresh random samples)
    max_concurrent_trials: null
    scheduler: {asha: {max_t: 12, grace_period: 4, reduction_factor: 2}}   # optional early stopping
                                               # (+ group_by: [method.name, seed]: one ASHA per group)
    storage_path: runs/sweeps                  # the sweep lands in storage_path/name unless --output is given
    max_failures: 1                            # retries of a failed trial, from its last checkpoint
    driver_cpus: 1                             # the trial's own process (the federation driver)
    placement_strategy: PACK                   # or SPREAD, STRICT_PACK, STRICT_SPREAD

Everything is validated before Ray starts (each search-space key and value is tried on the base config).

A grid may depend on another key and grow at its edges (ravan_ray/sweep_search.py has the details)::

    optimizer.lr: {grid: [0.002, 0.005, 0.01], by: method.name, grids: {full_ft: [2.0e-5, 5.0e-5, 1.0e-4]},
                   extend: {factor: 2, max_steps: 3}}

``by``/``grids``: a trial whose ``method.name`` is full_ft gets that grid, the others the plain one.
``extend``: once the grid's trials end, in every group of the other keys' values where the value with the
best validation metric is the largest or smallest tried, the next one beyond it runs (stage K of the sweep,
in ``DIR/extend_K``), until the chosen value is interior or ``max_steps`` values beyond the grid have run.
With either, the trials are listed in search-space order (first key slowest) and run in that order.

One trial = one whole federation (:func:`ravan_ray.federation.run_federation`) in the trial's directory
``DIR/<trial_id>/run``, reserved as a placement group sized from the trial's own config: a driver bundle,
a server bundle (only when the server asks for CPUs or GPUs: Ray rejects empty bundles, and a zero-CPU
server actor is placed in the group without one) and one bundle per client actor (pool_size of them in
pool mode, num_clients in per_client mode). Tune creates the group with child-task capture, so the
federation's actors land inside it and a trial never competes with another trial for its clients' CPUs.

Every round is reported to Tune. Metrics that are NaN or missing are left out of the report rather than
sent as NaN: ``test_accuracy`` (or the task's own primary metric, on which ASHA stops trials) appears only
in rounds that evaluated (ASHA then decides at the first evaluated round past each milestone),
``agg_error`` only for methods that define it. Each checkpointed
round also reports a Tune checkpoint holding the run's latest federation checkpoint and metrics.csv, so
a retried trial (``max_failures``) or a resumed sweep continues from that round instead of round 1.

Resume: running the same command on an existing sweep directory restores it (``Tuner.restore``, every
stage in turn): finished trials are kept, unfinished and errored ones continue from their checkpoints. The tune config
used is the copy saved in the sweep directory on the first run.

``inject_failure_after_round: R`` (a drill for the fault-tolerance path, used by the tests) makes every
trial raise once right after reporting round R; a marker file in the trial directory lets the retry pass.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import math
import numbers
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from ravan_ray.cluster import describe, ray_runtime, shortfall, total
from ravan_ray.config import (ConfigError, RunConfig, apply_override, from_dict, parse_override, read_yaml,
                              section_keys)
from ravan_ray.results import validation_name
from ravan_ray.sweep_search import (EXTEND_DEFAULTS, STAGE_PREFIX, expand_points, extended_key, extension_points,
                                    grouped_asha, plain, point_searcher, set_keys, trial_history)
from ravan_ray.sweep_trackers import tracker_environment_kept, trackers_line, tune_callbacks

log = logging.getLogger(__name__)

TOP_LEVEL_KEYS = {
    "name", "base", "base_config", "search_space", "num_samples", "max_concurrent_trials", "scheduler",
    "storage_path", "max_failures", "driver_cpus", "placement_strategy", "inject_failure_after_round",
}
SPEC_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
ASHA_KEYS = {"max_t", "grace_period", "reduction_factor", "group_by"}
GRID_OPTIONS = {"by", "grids", "extend"}  # a grid's per-case grids and edge extension (ravan_ray/sweep_search.py)
RUN_DIRNAME = "run"
SAVED_TUNE_CONFIG = "tune_config.yaml"
RESULTS_FILE = "results.csv"
ATTEMPTS_FILE = "attempts.jsonl"
FAILURE_MARKER = ".injected_failure_done"
# Beyond this many combinations the search space is checked one axis at a time instead of exhaustively.
MAX_CHECKED_COMBINATIONS = 4096
TRAFFIC_COLUMNS = ["rounds", "total_uplink_bytes", "total_downlink_bytes", "wall_s"]


def summary_columns(metric: str) -> list[str]:
    """results.csv's columns from each trial's summary.json: its task's primary metric, final and best, and
    its validation twin (empty for trials without a validation split)."""
    val = validation_name(metric)
    return [f"final_{metric}", f"best_{metric}", f"final_{val}", f"best_{val}", *TRAFFIC_COLUMNS]


class SweepError(ConfigError):
    """A sweep that cannot run as configured (search space, resources, output directory)."""


# ----------------------------------------------------------------------------------------- the tune config
class _Loader(yaml.SafeLoader):
    """YAML 1.2 floats: ``1e-4`` is a number (PyYAML, following YAML 1.1, reads it as a string)."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
                              list("-+0123456789."))


class SweepSpec:
    """A validated tune config."""

    def __init__(self, values: dict[str, Any], source: Optional[Path] = None, overrides: tuple[str, ...] = ()):
        self.source = source
        self.overrides = tuple(overrides)  # --set KEY=VALUE on the base (a data path, a model directory)
        self.raw = values
        unknown = sorted(set(values) - TOP_LEVEL_KEYS)
        if unknown:
            raise SweepError(f"unknown tune config key '{unknown[0]}' (allowed: {', '.join(sorted(TOP_LEVEL_KEYS))})")
        self.name = str(values.get("name") or (source.stem if source else "sweep"))
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise SweepError(f"name: use letters, digits, '_', '-' and '.' only (got {self.name!r})")
        self.base = self._load_base(values)
        self.space = self._load_space(values.get("search_space"))
        self.num_samples = _int_key(values, "num_samples", 1, minimum=1)
        self.max_concurrent = _int_key(values, "max_concurrent_trials", None, minimum=1)
        self.max_failures = _int_key(values, "max_failures", 1, minimum=-1)
        self.fail_after = _int_key(values, "inject_failure_after_round", None, minimum=1)
        self.driver_cpus = _number_key(values, "driver_cpus", 1.0, minimum=0.0)
        self.strategy = str(values.get("placement_strategy") or "PACK").upper()
        if self.strategy not in STRATEGIES:
            raise SweepError(f"placement_strategy: must be one of {', '.join(STRATEGIES)} "
                             f"(got {values['placement_strategy']!r})")
        self.storage_path = str(values.get("storage_path") or "runs/sweeps")
        self.explicit = any(set(spec) & GRID_OPTIONS for spec in self.space.values())
        if self.explicit:
            self._check_explicit()
        self.asha = self._load_scheduler(values.get("scheduler"))
        self.candidates = self._check_search_space()
        self.metric, self.mode = self._ranking_metric()
        if extended_key(self.space) and not self.held_out():
            raise SweepError(f"search_space '{extended_key(self.space)}': extend chooses on validation; set "
                             "data.validation_fraction > 0 (or data.validation_split) in the base")

    # -- pieces
    def _load_base(self, values: dict[str, Any]) -> dict[str, Any]:
        if "base" in values and "base_config" in values:
            raise SweepError("give either 'base' or 'base_config', not both")
        if "base_config" in values:
            path = Path(str(values["base_config"])).expanduser()
            if not path.is_absolute() and self.source is not None and (self.source.parent / path).is_file():
                path = self.source.parent / path
            base = read_yaml(path)
            base.pop("resolved", None)  # a run's config.yaml can serve as a base
        else:
            base = copy.deepcopy(values.get("base") or {})
        if not isinstance(base, dict):
            raise SweepError(f"base must be a mapping of run config keys, got {type(base).__name__}")
        for text in self.overrides:
            apply_override(base, *parse_override(text))
        try:
            from_dict(base)
        except ConfigError as error:
            raise SweepError(f"base: {error}") from None
        return base

    def _load_space(self, space: Any) -> dict[str, dict[str, Any]]:
        if space is None:
            return {}
        if not isinstance(space, dict):
            raise SweepError("search_space must map dotted config keys to specs such as {grid: [1, 2]}")
        checked = {}
        for key, spec in space.items():
            key = str(key)
            _check_key_path(key)
            checked[key] = _check_spec(key, spec)
        return checked

    def _check_explicit(self) -> None:
        """Per-case grids and edge extension: the trials are listed here (ravan_ray/sweep_search.py), so every
        key must be a grid, a case's key must be set before it, and one key at most is extended."""
        keys = list(self.space)
        for key, spec in self.space.items():
            if "grid" not in spec:
                raise SweepError(f"search_space '{key}': with by/grids or extend in the search space every key must "
                                 f"be a grid (got {next(iter(spec))})")
            by = spec.get("by")
            if by is not None:
                later = [k for k in keys[keys.index(key) + 1:] if by == k or by.startswith(k + ".")]
                if later:
                    raise SweepError(f"search_space '{key}': its grids depend on {by}, so put '{later[0]}' before "
                                     f"'{key}' in search_space")
        extended = [key for key, spec in self.space.items() if "extend" in spec]
        if len(extended) > 1:
            raise SweepError(f"search_space: extend one key at most (got {', '.join(extended)})")
        if self.num_samples != 1:
            raise SweepError("num_samples must be 1 with by/grids or extend (the trials are the grid's points; "
                             "runs are a function of config and seed, so sweep seed instead)")

    def points(self) -> list[dict[str, Any]]:
        """The trials of an explicit search space, in order (the first key varies slowest)."""
        return expand_points(self.space, self.base)

    def _load_scheduler(self, scheduler: Any) -> Optional[dict[str, Any]]:
        if scheduler in (None, {}):
            return None
        if not isinstance(scheduler, dict) or set(scheduler) != {"asha"}:
            raise SweepError("scheduler: only {asha: {max_t, grace_period, reduction_factor}} is supported")
        asha = scheduler["asha"] or {}
        if not isinstance(asha, dict):
            raise SweepError("scheduler.asha must be a mapping (max_t, grace_period, reduction_factor)")
        unknown = sorted(set(asha) - ASHA_KEYS)
        if unknown:
            raise SweepError(f"unknown key 'scheduler.asha.{unknown[0]}' (allowed: {', '.join(sorted(ASHA_KEYS))})")
        rounds = from_dict(self.base).federation.rounds
        out = {"max_t": _int_key(asha, "max_t", rounds, minimum=1, where="scheduler.asha."),
               "grace_period": _int_key(asha, "grace_period", 1, minimum=1, where="scheduler.asha."),
               "reduction_factor": _number_key(asha, "reduction_factor", 2.0, minimum=1.0, where="scheduler.asha.")}
        group_by = asha.get("group_by") or []
        if not isinstance(group_by, list) or not all(isinstance(k, str) for k in group_by):
            raise SweepError("scheduler.asha.group_by: a list of config keys, e.g. [method.name, seed]")
        for key in group_by:
            _check_key_path(key)
        if group_by:
            out["group_by"] = group_by
        if out["reduction_factor"] <= 1:
            raise SweepError("scheduler.asha.reduction_factor: must be > 1")
        if out["grace_period"] > out["max_t"]:
            raise SweepError("scheduler.asha.grace_period must be <= max_t")
        return out

    def _check_search_space(self) -> list[RunConfig]:
        """Try every search-space value on the base (every combination when there are few): an unknown key
        or a bad value is reported now, with the key, instead of as a failed trial later."""
        axes = {key: _candidate_values(spec) for key, spec in self.space.items()}
        for key, values in axes.items():  # one axis at a time first: the message then names the culprit
            for value in values:
                trial_config(self.base, {key: value}, where=f"search_space '{key}' = {value!r}")
        if self.explicit:
            return [trial_config(self.base, point, where="search_space point " + ", ".join(
                f"{k}={v!r}" for k, v in point.items())) for point in self.points()]
        total = math.prod(len(v) for v in axes.values()) if axes else 1
        if total > MAX_CHECKED_COMBINATIONS:
            return [trial_config(self.base, {k: v}) for k, values in axes.items() for v in values]
        configs = []
        for combo in itertools.product(*axes.values()):
            sampled = dict(zip(axes, combo))
            where = "search_space combination " + ", ".join(f"{k}={v!r}" for k, v in sampled.items())
            configs.append(trial_config(self.base, sampled, where=where))
        return configs

    def _ranking_metric(self) -> tuple[str, str]:
        """The trials' task's primary metric and whether higher is better (ASHA and results.csv rank by it)."""
        from ravan_ray.tasks import task_class

        tasks = {task_class(c.model.task) for c in self.candidates}
        metrics = {(t.primary_metric, t.metrics[t.primary_metric]) for t in tasks}
        if len(metrics) > 1 and self.asha:
            raise SweepError("scheduler.asha needs one metric to stop trials on, but the swept tasks rank by "
                             f"{', '.join(sorted(m for m, _ in metrics))}")
        return sorted(metrics)[0]

    def trials(self) -> int:
        """How many trials the sweep runs (grid points times num_samples; an extended grid's further values
        come on top, see :meth:`most_extensions`)."""
        if self.explicit:
            return len(self.points())
        grid = math.prod(len(spec["grid"]) for spec in self.space.values() if "grid" in spec)
        return grid * self.num_samples

    def most_extensions(self) -> int:
        """The most trials an extended grid can add: max_steps per group of the other keys' values."""
        key = extended_key(self.space)
        if key is None:
            return 0
        groups = {json.dumps({k: v for k, v in p.items() if k != key}, sort_keys=True, default=str)
                  for p in self.points()}
        return len(groups) * self.space[key]["extend"]["max_steps"]

    def normalized(self) -> dict[str, Any]:
        """The tune config as saved in the sweep directory: name explicit, base inlined."""
        values = {k: v for k, v in self.raw.items() if k != "base_config"}
        return {**values, "name": self.name, "base": self.base}

    # -- Tune objects
    def held_out(self) -> bool:
        """Whether every trial holds out a validation split."""
        return all(c.data.validation_fraction > 0 or c.data.validation_split is not None for c in self.candidates)

    def stopping_metric(self) -> str:
        """What ASHA stops trials on: the validation twin of the task's metric when every trial holds out a
        validation split (a sweep that selects must never look at test), else the test metric."""
        return validation_name(self.metric) if self.held_out() else self.metric

    def scheduler(self, history: list[tuple[dict[str, Any], list[tuple[int, float]]]] = ()):
        """ASHA on each round's :meth:`stopping_metric` (rounds without an evaluation do not count), or None
        (FIFO). With ``group_by``, one ASHA per group of trials (:func:`grouped_asha`), ``history`` (earlier
        trials' sampled configs and evaluated rounds) replayed into their groups first."""
        if not self.asha:
            return None
        settings = {k: v for k, v in self.asha.items() if k != "group_by"}
        settings.update(time_attr="round", metric=self.stopping_metric(), mode=self.mode)
        if "group_by" in self.asha:
            return grouped_asha(self.base, self.asha["group_by"], history, **settings)
        from ray.tune.schedulers import ASHAScheduler

        return ASHAScheduler(**settings)

    def param_space(self) -> dict[str, Any]:
        from ray import tune

        makers = {"grid": tune.grid_search, "choice": tune.choice}
        space = {}
        for key, spec in self.space.items():
            kind, value = next(iter(spec.items()))
            if kind in makers:
                space[key] = makers[kind](list(value))
            elif kind == "uniform":
                space[key] = tune.uniform(*value)
            elif kind == "loguniform":
                space[key] = tune.loguniform(*value)
            else:
                space[key] = tune.randint(*value)
        return space


def _check_key_path(key: str) -> None:
    """The dotted key must name a field of RunConfig (sections may be swept whole, as mappings)."""
    from pydantic import BaseModel

    parts = key.split(".")
    if not key or any(not part for part in parts):
        raise SweepError(f"search_space key '{key}' is not a dotted config key")
    model: Any = RunConfig
    for depth, part in enumerate(parts):
        fields = section_keys(model)
        if part not in fields:
            raise SweepError(f"search_space: unknown config key '{'.'.join(parts[:depth + 1])}'")
        annotation = fields[part].annotation
        is_section = isinstance(annotation, type) and issubclass(annotation, BaseModel)
        if depth < len(parts) - 1 and not is_section:
            raise SweepError(f"search_space: '{part}' in '{key}' is not a config section")
        model = annotation


def _check_spec(key: str, spec: Any) -> dict[str, Any]:
    where = f"search_space '{key}'"
    kinds = [k for k in spec if k in SPEC_KINDS] if isinstance(spec, dict) else []
    if len(kinds) != 1:
        if isinstance(spec, dict) and len(spec) == 1:
            raise SweepError(f"{where}: unknown spec '{next(iter(spec))}' (allowed: {', '.join(SPEC_KINDS)})")
        raise SweepError(f"{where}: give one of {', '.join(SPEC_KINDS)}, e.g. {{grid: [1, 2]}} (got {spec!r})")
    kind = kinds[0]
    value = spec[kind]
    options = {k: v for k, v in spec.items() if k != kind}
    if options and kind != "grid":
        raise SweepError(f"{where}: {', '.join(sorted(options))} go(es) with a grid only")
    unknown = sorted(set(options) - GRID_OPTIONS)
    if unknown:
        raise SweepError(f"{where}: unknown option '{unknown[0]}' (a grid takes {', '.join(sorted(GRID_OPTIONS))})")
    if kind in ("grid", "choice"):
        if not isinstance(value, list) or not value:
            raise SweepError(f"{where}: {kind} needs a non-empty list of values")
        return {kind: value, **_check_grid_options(key, value, options)}
    if (not isinstance(value, list) or len(value) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)):
        raise SweepError(f"{where}: {kind} needs [low, high] numbers (got {value!r})")
    low, high = value
    if not low < high:
        raise SweepError(f"{where}: {kind} needs low < high (got {value!r})")
    if kind == "loguniform" and low <= 0:
        raise SweepError(f"{where}: loguniform needs low > 0 (got {low!r})")
    if kind == "randint" and not (isinstance(low, int) and isinstance(high, int)):
        raise SweepError(f"{where}: randint needs integer bounds (got {value!r}; the high bound is exclusive)")
    return {kind: [low, high]}


def _check_grid_options(key: str, grid: list[Any], options: dict[str, Any]) -> dict[str, Any]:
    """``by`` + ``grids`` (a grid per value of another key) and ``extend`` ({factor, max_steps}: the grid grows
    at its edges until the value chosen on validation is interior); see ravan_ray/sweep_search.py."""
    where = f"search_space '{key}'"
    out: dict[str, Any] = {}
    if ("by" in options) != ("grids" in options):
        raise SweepError(f"{where}: 'by' and 'grids' go together (by: a key; grids: {{its value: [grid]}})")
    if "by" in options:
        by, grids = options["by"], options["grids"]
        if not isinstance(by, str) or by == key:
            raise SweepError(f"{where}: by must name another config key (got {by!r})")
        _check_key_path(by)
        if not isinstance(grids, dict) or not grids or not all(isinstance(g, list) and g for g in grids.values()):
            raise SweepError(f"{where}: grids must map values of {by} to non-empty lists")
        out.update(by=by, grids=grids)
    if "extend" in options:
        extend = options["extend"] or {}
        if not isinstance(extend, dict) or set(extend) - set(EXTEND_DEFAULTS):
            raise SweepError(f"{where}: extend takes {{factor: > 1, max_steps: >= 1}} (got {extend!r})")
        factor = _number_key(extend, "factor", EXTEND_DEFAULTS["factor"], minimum=1.0, where=f"{where} extend.")
        if factor <= 1:
            raise SweepError(f"{where}: extend.factor must be > 1 (got {factor:g})")
        steps = _int_key(extend, "max_steps", EXTEND_DEFAULTS["max_steps"], minimum=1, where=f"{where} extend.")
        values = grid + [v for g in out.get("grids", {}).values() for v in g]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in values):
            raise SweepError(f"{where}: extend needs a grid of positive numbers (it steps by factor {factor:g})")
        out["extend"] = {"factor": factor, "max_steps": steps}
    return out


def _candidate_values(spec: dict[str, Any]) -> list[Any]:
    kind, value = next(iter(spec.items()))
    if kind in ("grid", "choice"):
        return list(value) + [v for grid in spec.get("grids", {}).values() for v in grid]
    if kind == "randint":
        return [value[0], value[1] - 1]  # the high bound is exclusive
    return list(value)


def _int_key(values: dict, key: str, default: Optional[int], minimum: int, where: str = "") -> Optional[int]:
    value = values.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SweepError(f"{where}{key}: must be an integer >= {minimum} (got {value!r})")
    return value


def _number_key(values: dict, key: str, default: float, minimum: float, where: str = "") -> float:
    value = values.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < minimum:
        raise SweepError(f"{where}{key}: must be a number >= {minimum:g} (got {value!r})")
    return float(value)


def read_tune_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"tune config not found: {path}")
    try:
        values = yaml.load(path.read_text(), Loader=_Loader) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise SweepError(f"tune config {path} is not valid YAML{where}") from None
    if not isinstance(values, dict):
        raise SweepError(f"tune config {path} must hold a mapping of keys to values")
    return values


def load_sweep_spec(path: str | Path, overrides: tuple[str, ...] = (), only: tuple[str, ...] = ()) -> SweepSpec:
    """The tune config at ``path``, its base changed by ``overrides`` (--set KEY=VALUE) and its grids cut to the
    values ``only`` names (--only KEY=VALUES, see :func:`restrict_grids`)."""
    return SweepSpec(restrict_grids(read_tune_config(path), only), Path(path), overrides)


def restrict_grids(values: dict[str, Any], only: tuple[str, ...]) -> dict[str, Any]:
    """The tune config with the grid of each ``KEY=VALUES`` in ``only`` cut to VALUES (YAML: one value or a
    list), which must be values of that grid. A sweep's trials are functions of their configs, so one tune
    config can be run in parts (one seed per machine or per day) and reported together; the part's saved tune
    config lists what it ran."""
    if not only:
        return values
    values = copy.deepcopy(values)
    space = values.get("search_space") or {}
    for text in only:
        key, sep, listed = text.partition("=")
        if not sep or key not in space:
            raise SweepError(f"--only {text}: give KEY=VALUES for a key of search_space "
                             f"({', '.join(space) or 'none'})")
        spec = space[key]
        if not isinstance(spec, dict) or "grid" not in spec or "grids" in spec:
            raise SweepError(f"--only {key}: only a plain grid can be cut (not a per-case grid or a random spec)")
        try:
            wanted = yaml.load(listed, Loader=_Loader)
        except yaml.YAMLError:
            raise SweepError(f"--only {text}: VALUES is not YAML") from None
        wanted = wanted if isinstance(wanted, list) else [wanted]
        missing = [v for v in wanted if v not in spec["grid"]]
        if missing or not wanted:
            raise SweepError(f"--only {key}: {missing[0] if missing else 'nothing'} is not in its grid {spec['grid']}")
        spec["grid"] = [v for v in spec["grid"] if v in wanted]
    return values


# ------------------------------------------------------------------------------ trial configs and resources
_plain = plain


def trial_config(base: dict[str, Any], sampled: dict[str, Any], where: str = "trial config") -> RunConfig:
    """The RunConfig of one trial: the base with the sampled dotted keys set. In pool mode an unset
    pool_size is pinned to the round's cohorts (its clients at cohort_size 1), so the reservation and the actors agree whatever the cluster."""
    try:
        values = set_keys(base, sampled)
    except ConfigError as error:
        raise SweepError(f"{where}: {error}") from None
    try:
        config = from_dict(values)
    except ConfigError as error:
        raise SweepError(f"{where}: {error}") from None
    if config.resources.actor_mode == "pool" and config.resources.pool_size is None:
        config.resources.pool_size = config.cohorts_per_round
    return config


def trial_bundles(config: RunConfig, driver_cpus: float = 1.0) -> list[dict[str, float]]:
    """Placement-group bundles for one trial: [driver, (server), one per client actor]."""
    res = config.resources
    driver = {"CPU": float(driver_cpus)} if driver_cpus > 0 else {}
    server = {k: float(v) for k, v in (("CPU", res.server_cpus), ("GPU", res.server_gpus)) if v > 0}
    client = {k: float(v) for k, v in (("CPU", res.cpus_per_client), ("GPU", res.gpus_per_client)) if v > 0}
    actors = config.federation.num_clients if res.actor_mode == "per_client" else config.pool_size
    return [driver] + ([server] if server else []) + [dict(client) for _ in range(actors)]


def placement_group_factory(config: RunConfig, driver_cpus: float = 1.0, strategy: str = "PACK"):
    from ray.tune import PlacementGroupFactory

    return PlacementGroupFactory(trial_bundles(config, driver_cpus), strategy=strategy)


def check_cluster_fits(configs: list[RunConfig], driver_cpus: float, strategy: str,
                       cluster: dict[str, float], nodes: list[dict[str, float]]) -> None:
    """Raise SweepError if some trial's placement group can never be created on this cluster (Tune would
    otherwise wait for it forever)."""
    for config in configs:
        bundles = trial_bundles(config, driver_cpus)
        need = total(bundles)
        res = config.resources
        actors = len(bundles) - 1 - (1 if res.server_cpus or res.server_gpus else 0)
        what = (f"a trial needs {describe(need)} (driver {driver_cpus:g} CPU + server "
                f"{res.server_cpus:g} CPU/{res.server_gpus:g} GPU + {actors} client actors x "
                f"{res.cpus_per_client:g} CPU/{res.gpus_per_client:g} GPU, {res.actor_mode} mode)")
        fix = ("lower resources.cpus_per_client/gpus_per_client/server_cpus/server_gpus or driver_cpus, "
               + ("use resources.actor_mode=pool" if res.actor_mode == "per_client" else "lower resources.pool_size")
               + ", or add nodes")
        if shortfall(need, cluster) is not None:
            raise SweepError(f"{what} but the cluster has {describe(cluster, set(need))}; {fix}")
        for bundle in bundles:
            if bundle and all(shortfall(bundle, node) is not None for node in nodes):
                largest = max(nodes, key=lambda n: (n.get("GPU", 0.0), n.get("CPU", 0.0))) if nodes else {}
                raise SweepError(f"{what}, and no node can hold a bundle of {describe(bundle)} (largest "
                                 f"node: {describe(largest, set(bundle))}); {fix}")
        if strategy == "STRICT_PACK" and all(shortfall(need, node) is not None for node in nodes):
            raise SweepError(f"{what} on one node (STRICT_PACK) but no node has that much; use placement_strategy PACK")
        if strategy == "STRICT_SPREAD" and len(bundles) > len(nodes):
            raise SweepError(f"STRICT_SPREAD puts each of a trial's {len(bundles)} bundles on its own node but the "
                             f"cluster has {len(nodes)} nodes; use placement_strategy SPREAD")


# ------------------------------------------------------------------------------------------------ the trial
def _tune_metrics(row: dict[str, Any]) -> dict[str, Any]:
    """The round's metrics without NaN / missing values (Tune's schedulers compare what they get)."""
    out = {}
    for key, value in row.items():
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, numbers.Real) and math.isfinite(value):
            out[key] = int(value) if key == "round" else _plain(value)
    return out


def _pack_checkpoint(run_dir: Path, round_checkpoint: Path, into: Path) -> None:
    """A Tune checkpoint of a run: its latest federation checkpoint and its metrics so far (not a whole run
    directory, so reports that search for runs do not find copies)."""
    shutil.copytree(round_checkpoint, into / round_checkpoint.name)
    if (run_dir / "metrics.csv").exists():
        shutil.copy2(run_dir / "metrics.csv", into / "metrics.csv")


def _unpack_checkpoint(source: Path, run_dir: Path) -> int:
    """Put a Tune checkpoint back into the run directory; returns its round. The run directory's own
    checkpoints are replaced, so the resumed run continues exactly where Tune's record of it ends."""
    from ravan_ray.checkpoints import CHECKPOINTS

    rounds = sorted(p for p in source.iterdir() if p.is_dir() and p.name.startswith("round_"))
    if not rounds:
        raise SweepError(f"Tune checkpoint {source} holds no federation checkpoint")
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(run_dir / CHECKPOINTS, ignore_errors=True)
    (run_dir / CHECKPOINTS).mkdir()
    shutil.copytree(rounds[-1], run_dir / CHECKPOINTS / rounds[-1].name)
    if (source / "metrics.csv").exists():
        shutil.copy2(source / "metrics.csv", run_dir / "metrics.csv")
    return int(rounds[-1].name.split("_")[1])


def make_trainable(base: dict[str, Any], sweep_path: Path, fail_after: Optional[int] = None) -> Callable[[dict], None]:
    """The function trainable: trial config (sampled dotted keys) in, one tune.report per round out.

    The run goes straight into the sweep directory, ``sweep_path/<trial id>/run`` (the trial's own Tune
    directory, see _trial_dirname), rather than into Tune's per-session staging directory: it is then
    where the results are wherever the trial runs (given a filesystem shared by the nodes), and a restored
    sweep finds it."""
    sweep_path = Path(sweep_path)

    def ravan_trial(sampled: dict[str, Any]) -> None:
        from ray import tune

        from ravan_ray.federation import run_federation

        config = trial_config(base, sampled)
        trial_dir = sweep_path / tune.get_context().get_trial_id()
        run_dir = trial_dir / RUN_DIRNAME
        checkpoint = tune.get_checkpoint()
        resumed_round = 0
        if checkpoint is not None:
            with checkpoint.as_directory() as source:
                resumed_round = _unpack_checkpoint(Path(source), run_dir)
        elif run_dir.exists():
            shutil.rmtree(run_dir)  # an earlier attempt that never reached a checkpoint: start clean
        trial_dir.mkdir(parents=True, exist_ok=True)
        with open(trial_dir / ATTEMPTS_FILE, "a") as handle:
            handle.write(json.dumps({"started": time.time(), "resumed_from_round": resumed_round}) + "\n")

        def on_round(row: dict[str, Any], checkpoint_path: Optional[str]) -> None:
            metrics = _tune_metrics(row)
            if checkpoint_path is None:
                tune.report(metrics)
            else:
                with tempfile.TemporaryDirectory(prefix="ravan-ckpt-") as tmp:
                    _pack_checkpoint(run_dir, Path(checkpoint_path), Path(tmp))
                    tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))
            marker = trial_dir / FAILURE_MARKER
            if fail_after is not None and row["round"] >= fail_after and not marker.exists():
                marker.write_text(f"failed once after round {row['round']}\n")
                raise RuntimeError(f"injected failure after round {row['round']} (inject_failure_after_round)")

        # the sweep's Tune callbacks track the trial (ravan_ray/sweep_trackers.py), not the run itself
        run_federation(config, run_dir, resume=checkpoint is not None, on_round=on_round, track=False)

    return ravan_trial


# ------------------------------------------------------------------------------------------------ the sweep
def _cluster_view() -> tuple[dict[str, float], list[dict[str, float]]]:
    import ray

    nodes = [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
    return dict(ray.cluster_resources()), nodes


def sweep_dir(spec: SweepSpec, output: Optional[str | Path]) -> Path:
    out = Path(output).expanduser().resolve() if output else (Path(spec.storage_path).expanduser() / spec.name).resolve()
    if out.exists() and not out.is_dir():
        raise SweepError(f"--output {out} is a file, not a directory; give a directory for the sweep")
    return out


@tracker_environment_kept()  # Tune's MLflow callback writes MLFLOW_TRACKING_URI into this process's environment
def run_sweep(tune_config_path: str | Path, address: Optional[str] = None,
              output: Optional[str | Path] = None, overrides: tuple[str, ...] = (), only: tuple[str, ...] = ()) -> Path:
    """Run (or resume) the sweep described by a tune config (``overrides``: --set KEY=VALUE on its base; ``only``:
    --only KEY=VALUES, a part of its grid); returns the path of its results.csv."""
    from ray import tune

    spec = load_sweep_spec(tune_config_path, overrides, only)
    out = sweep_dir(spec, output)
    saved = out / SAVED_TUNE_CONFIG
    restoring = saved.is_file()
    if restoring:  # resume with the config the sweep started with, whatever the file says now
        original = SweepSpec(read_tune_config(saved), Path(tune_config_path))
        if original.normalized() != spec.normalized():
            print(f"{out} was started from a different tune config; resuming it with its own copy, {saved}")
        spec = original
    elif out.exists() and any(out.iterdir()):
        raise SweepError(f"{out} exists and is not a sweep directory (no {SAVED_TUNE_CONFIG}); choose another --output")

    base = from_dict(spec.base)
    callbacks = tune_callbacks(base, out, spec.name)  # a tracker that is not installed is refused before Ray starts
    # A checkpoint every round makes Tune snapshot its state often; that is cheap here, so do not warn.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # A sweep's --address and RAY_ADDRESS name its cluster before the base config's resources.address does.
    with ray_runtime(base.resources, address or os.environ.get("RAY_ADDRESS")):
        cluster, nodes = _cluster_view()
        check_cluster_fits(spec.candidates, spec.driver_cpus, spec.strategy, cluster, nodes)

        if restoring and not tune.Tuner.can_restore(str(out)):
            restoring = False  # the tune config was saved but Tune never got to write its state
        if not restoring:
            out.mkdir(parents=True, exist_ok=True)
            saved.write_text(yaml.safe_dump(spec.normalized(), sort_keys=False))
        # Stage 0 is the search space; with an extended grid, stage K (SWEEP/extend_K) runs the values beyond
        # the edges that stages 0..K-1 chose (ravan_ray/sweep_search.py). Each stage is its own Tune experiment.
        tables, trials, points = [], [], (spec.points() if spec.explicit else None)
        stage = 0
        while True:
            stage_dir = out if stage == 0 else out / f"{STAGE_PREFIX}{stage}"
            history = [(t["sampled"], trial_history(t["run_dir"], spec.stopping_metric())) for t in trials]
            grid = _fit_stage(spec, stage_dir, points, spec.scheduler(history), callbacks,
                              restore=restoring if stage == 0 else tune.Tuner.can_restore(str(stage_dir)))
            table = results_table(grid, list(spec.space), spec.metric)
            table.insert(1, "stage", stage)
            tables.append(table)
            trials += _trial_records(grid, spec.metric)
            points = extension_points(spec.space, spec.base, trials, spec.mode == "max")
            if not points:
                break
            stage += 1
            print(f"{extended_key(spec.space)}: the chosen value is at the grid's edge in {len(points)} group(s); "
                  f"their next values run in {out / f'{STAGE_PREFIX}{stage}'}")
        import pandas as pd

        table = pd.concat(tables, ignore_index=True) if len(tables) > 1 else tables[0]
        if len(tables) == 1:
            table = table.drop(columns="stage")

    path = out / RESULTS_FILE
    table.to_csv(path, index=False)
    shown = [c for c in ["trial_id", "stage", *spec.space, f"final_{spec.metric}", "rounds", "status"] if c in table]
    print(table[shown].to_string(index=False))
    failed = table[table["status"] == "ERROR"]["trial_id"].tolist() if len(table) else []
    if failed:
        print(f"{len(failed)} trial(s) failed (see {out}/[{STAGE_PREFIX}K/]<trial_id>/error.txt): {', '.join(failed)}; "
              "run the same command again to resume them")
    print(f"{len(table)} trials; results: {path}")
    if trackers_line(base, out):
        print(trackers_line(base, out))
    return path


def _fit_stage(spec: SweepSpec, stage_dir: Path, points: Optional[list[dict[str, Any]]], scheduler, callbacks,
               restore: bool):
    """Run (or restore and finish) one Tune experiment of the sweep in ``stage_dir``: the search space's grid
    (``points`` None) or the listed points, each a trial in ``stage_dir/<trial_id>/run``."""
    from ray import tune

    driver_cpus, strategy, base_values = spec.driver_cpus, spec.strategy, spec.base
    trainable = tune.with_resources(
        make_trainable(base_values, stage_dir, spec.fail_after),
        lambda sampled: placement_group_factory(trial_config(base_values, sampled), driver_cpus, strategy))
    if restore:
        print(f"resuming the sweep in {stage_dir} (finished trials are kept)")
        return tune.Tuner.restore(str(stage_dir), trainable=trainable, resume_errored=True).fit()
    searcher = {} if points is None else {"search_alg": point_searcher(points)}
    tuner = tune.Tuner(
        trainable,
        param_space=spec.param_space() if points is None else {},
        tune_config=tune.TuneConfig(num_samples=spec.num_samples if points is None else len(points),
                                    max_concurrent_trials=spec.max_concurrent, scheduler=scheduler,
                                    trial_dirname_creator=_trial_dirname, **searcher),
        run_config=tune.RunConfig(name=stage_dir.name, storage_path=str(stage_dir.parent),
                                  failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=2), verbose=1,
                                  callbacks=callbacks or None),  # None: exactly Tune's defaults
    )
    return tuner.fit()


def _trial_records(grid, metric: str) -> list[dict[str, Any]]:
    """Per trial of a finished stage: its sampled keys, rounds run and final validation metric (NaN without
    one), and its run directory: what the next stage's points are chosen from."""
    records = []
    for result in grid:
        run_dir = Path(result.path) / RUN_DIRNAME
        summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
        value = summary.get(f"final_{validation_name(metric)}")
        records.append({"sampled": {k: _plain(v) for k, v in (result.config or {}).items()},
                        "rounds": summary.get("rounds") or 0, "run_dir": run_dir,
                        "value": math.nan if value is None else float(value)})
    return records


def _trial_dirname(trial) -> str:
    return str(trial.trial_id)  # the trainable writes its run to sweep_dir / trial_id / "run"


def results_table(grid, swept_keys: list[str], metric: str = "test_accuracy"):
    """One row per trial: id, swept keys, the run's summary (the task's primary metric, rounds, bytes,
    time) and status."""
    import pandas as pd

    columns = summary_columns(metric)
    rows = []
    for result in grid:
        trial_dir = Path(result.path)
        run_dir = trial_dir / RUN_DIRNAME
        config = result.config or {}
        row: dict[str, Any] = {"trial_id": trial_dir.name}
        row.update({key: _plain(config.get(key)) for key in swept_keys})
        summary = {}
        if (run_dir / "summary.json").is_file():
            summary = json.loads((run_dir / "summary.json").read_text())
        row.update({key: summary.get(key) for key in columns})
        row["total_bytes"] = (summary.get("total_uplink_bytes") or 0) + (summary.get("total_downlink_bytes") or 0) \
            if summary else None
        attempts = trial_dir / ATTEMPTS_FILE
        row["attempts"] = len(attempts.read_text().splitlines()) if attempts.is_file() else 0
        if result.error is not None:
            row["status"] = "ERROR"
        else:
            planned = _planned_rounds(run_dir)
            row["status"] = "TERMINATED" if planned is None or summary.get("rounds") == planned else "STOPPED_EARLY"
        row["run_dir"] = str(run_dir)
        rows.append(row)
    return pd.DataFrame(rows).sort_values("trial_id", kind="stable").reset_index(drop=True) if rows \
        else pd.DataFrame(columns=["trial_id", *swept_keys, *columns, "total_bytes", "status", "run_dir"])


def _planned_rounds(run_dir: Path) -> Optional[int]:
    """The rounds a trial was configured for (an ASHA-stopped trial ran fewer)."""
    try:
        return int(read_yaml(run_dir / "config.yaml")["federation"]["rounds"])
    except (ConfigError, KeyError, TypeError, ValueError):
        return None
