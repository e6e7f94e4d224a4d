"""Experiment trackers for sweeps: Ray Tune's own logger callbacks, one per name in the base config's
``output.trackers`` (:func:`tune_callbacks`).

Tune's callbacks run in the sweep's driver and log what every trial reports each round (the round's metrics)
and its sampled config (the swept keys) as parameters, into one tracker run per trial: TensorBoard into the
trial's directory (``tensorboard --logdir SWEEP``), MLflow into ``file:SWEEP/mlruns`` (experiment: the sweep's
name) unless ``output.mlflow`` or MLFLOW_TRACKING_URI say otherwise, W&B into the project with the trials
grouped under the sweep's name.

What a trial's run writes only at its end, the summary and curves.png, reaches the same tracker runs through
the subclasses here: when a trial ends (finished, stopped early by ASHA, or failed), the driver reads the
trial's run directory (SWEEP/<trial id>/run, on the filesystem the sweep already shares between nodes),
draws curves.png and adds the summary, the full resolved config and the artifacts to the trial's tracker run
before Tune's callback closes it. The trials themselves log to no tracker (``run_federation(track=False)``),
so each trial is one tracker run, not two. The subclasses use the callbacks' per-trial attributes of
Ray 2.60 (the writer, the MLflow run id, the W&B queue); tests/test_sweep.py checks them on the smoke sweep.
Each class is defined when its tracker is asked for, because importing Ray's W&B integration imports wandb (an
optional extra); Tune pickles them with the tuner (cloudpickle), so a restored sweep keeps its trackers.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Optional

import yaml

from ravan_ray.config import RunConfig
from ravan_ray.trackers import (check_installed, draw_curves, flat_params, mlflow_final, mlflow_params, mlflow_uri,
                                run_artifacts, tensorboard_final, wandb_final, wandb_mode, wandb_project)

RUN_DIRNAME = "run"  # as in ravan_ray.sweep: a trial's run is SWEEP/<trial id>/run


class TrialEnd:
    """What a finished trial's run directory holds for its trackers: summary, config, artifacts."""

    def __init__(self, sweep_dir: Path, trial: Any):
        self.run_dir = Path(sweep_dir) / str(trial.trial_id) / RUN_DIRNAME
        summary_path, config_path = self.run_dir / "summary.json", self.run_dir / "config.yaml"
        self.summary: dict[str, Any] = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        self.config_text = config_path.read_text() if config_path.is_file() else None
        config = yaml.safe_load(self.config_text) if self.config_text else {}
        config.pop("resolved", None)  # derived values: in config.yaml, an artifact, not parameters
        self.params = flat_params(config)
        if self.summary.get("rounds"):
            draw_curves(self.run_dir)
        self.artifacts = run_artifacts(self.run_dir)
        self.step = int(self.summary.get("rounds") or 0)


@contextlib.contextmanager
def tracker_environment_kept():
    """Leave the process's MLflow environment as the sweep found it (a decorator of ``run_sweep``). Tune's MLflow
    callback calls ``mlflow.set_tracking_uri``, which also writes MLFLOW_TRACKING_URI (and may write
    MLFLOW_TRACKING_TOKEN) into os.environ; left there, a run started later in the same process would log into
    the sweep's store."""
    before = {key: value for key, value in os.environ.items() if key.startswith("MLFLOW_")}
    try:
        yield
    finally:
        for key in [key for key in os.environ if key.startswith("MLFLOW_") and key not in before]:
            del os.environ[key]
        os.environ.update(before)


def tune_callbacks(base: RunConfig, sweep_dir: Path, sweep_name: str) -> list:
    """Tune logger callbacks for the base config's ``output.trackers`` (checked installed first)."""
    names = base.output.trackers
    check_installed(names)
    makers = {"tensorboard": _tensorboard, "mlflow": _mlflow, "wandb": _wandb}
    return [makers[name](base, Path(sweep_dir), sweep_name) for name in names]


def _tensorboard(base: RunConfig, sweep_dir: Path, sweep_name: str):
    from ray.tune.logger import TBXLoggerCallback

    class TensorBoardCallback(TBXLoggerCallback):
        """Tune's TensorBoard logger (it replaces the one Tune adds by default), with each trial's summary,
        curves.png and config at its end."""

        def log_trial_end(self, trial, failed: bool = False):
            writer = self._trial_writer.get(trial)
            if writer is not None:
                end = TrialEnd(sweep_dir, trial)
                tensorboard_final(writer, end.summary, end.artifacts, end.step, end.config_text)
            super().log_trial_end(trial, failed)

    return TensorBoardCallback()


def _mlflow(base: RunConfig, sweep_dir: Path, sweep_name: str):
    from mlflow.tracking import MlflowClient
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    options = base.output.mlflow
    uri = mlflow_uri(options.tracking_uri, sweep_dir)
    experiment = options.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or sweep_name

    class MLflowCallback(MLflowLoggerCallback):
        """Tune's MLflow logger, with each trial's resolved config (beside the sampled keys Tune logs), summary
        and artifacts at its end."""

        def log_trial_end(self, trial, failed: bool = False):
            run_id = self._trial_runs.get(trial)
            if run_id is not None:
                end, client = TrialEnd(sweep_dir, trial), MlflowClient(tracking_uri=uri)
                mlflow_params(client, run_id, end.params, skip=trial.config)  # a param is logged once
                mlflow_final(client, run_id, end.summary, end.artifacts, end.step)
            super().log_trial_end(trial, failed)

    return MLflowCallback(tracking_uri=uri, experiment_name=experiment, tags={"ravan.sweep": sweep_name})


def _wandb(base: RunConfig, sweep_dir: Path, sweep_name: str):
    from ray.air.integrations.wandb import WandbLoggerCallback, _QueueItem, _WandbLoggingActor

    options = base.output.wandb
    mode = wandb_mode(options.mode)
    if mode != "online":
        # Tune's callback looks for an API key unless WANDB_MODE says it needs none
        os.environ["WANDB_MODE"] = mode

    class WandbActor(_WandbLoggingActor):
        """Tune's per-trial W&B process; a trial's end arrives on its queue as a CHECKPOINT item holding a
        dict (Tune's own checkpoint items hold a path), so it is logged in the run before wandb.finish."""

        def _handle_checkpoint(self, item):
            if isinstance(item, dict):
                self._wandb.config.update(item["config"], allow_val_change=True)
                wandb_final(self._wandb.run, item["summary"], [Path(p) for p in item["artifacts"]])
            else:
                super()._handle_checkpoint(item)

    class WandbCallback(WandbLoggerCallback):
        """Tune's W&B logger, with each trial's resolved config, summary and curves.png at its end."""

        _logger_actor_cls = WandbActor

        def log_trial_end(self, trial, failed: bool = False):
            queue = self._trial_queues.get(trial)
            if queue is not None:
                end = TrialEnd(sweep_dir, trial)
                queue.put((_QueueItem.CHECKPOINT, {"config": end.params, "summary": end.summary,
                                                   "artifacts": [str(p) for p in end.artifacts]}))
            super().log_trial_end(trial, failed)

    extra: dict[str, Any] = {"mode": mode, "settings": {"silent": True, "console": "off"}}
    if options.entity:
        extra["entity"] = options.entity
    if options.dir:
        extra["dir"] = options.dir
    return WandbCallback(project=wandb_project(options.project), group=sweep_name, **extra)


def trackers_line(base: RunConfig, sweep_dir: Path) -> Optional[str]:
    """Where a sweep's trackers put their data, for the line printed at its end (None without trackers)."""
    if not base.output.trackers:
        return None
    where = {"tensorboard": f"tensorboard --logdir {sweep_dir}",
             "mlflow": f"mlflow {mlflow_uri(base.output.mlflow.tracking_uri, sweep_dir)}",
             "wandb": f"wandb project {wandb_project(base.output.wandb.project)} ({wandb_mode(base.output.wandb.mode)})"}
    return "trackers: " + "; ".join(where[name] for name in base.output.trackers)
