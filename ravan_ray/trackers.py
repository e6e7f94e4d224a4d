"""Experiment trackers for single runs: ``output.trackers: [tensorboard, mlflow, wandb]`` (any subset).

Each tracker receives what the run directory holds, as the run makes it: the config (every key of config.yaml,
flattened to dotted names) as parameters when the run starts, each finished round's metrics (metrics.csv's row:
the numbers, at step = round), and at the end the summary (summary.json's numbers) with curves.png, config.yaml
and summary.json as artifacts. One class per backend, each behind the small :class:`Tracker` protocol; the
driver's :class:`ravan_ray.results.RunLog` calls them through :class:`Trackers`.

Sweeps log through Ray Tune's own logger callbacks instead (ravan_ray/sweep_trackers.py), which reuse the
end-of-run functions here (:func:`tensorboard_final`, :func:`mlflow_final`, :func:`wandb_final`).

Where the data goes by default:
  tensorboard  RUN/tensorboard, or ``output.tensorboard.dir``/<run directory's name>: ``tensorboard --logdir runs/``
               shows every run;
  mlflow       MLFLOW_TRACKING_URI, else the local file store ``file:<the run directory's parent>/mlruns``, so the
               runs of one output.dir share one store (``mlflow ui --backend-store-uri runs/mlruns``); experiment
               MLFLOW_EXPERIMENT_NAME, else the run's name. MLflow 3 refuses file stores unless
               MLFLOW_ALLOW_FILE_STORE is set; a run that uses one sets it (it is the store that needs no server);
  wandb        project WANDB_PROJECT, else "ravan-ray"; mode WANDB_MODE, else online when an API key is configured
               (WANDB_API_KEY or ``wandb login``) and offline otherwise, into RUN/wandb (``wandb sync`` uploads it).

A resumed run continues the same MLflow and W&B runs: their ids are kept in RUN/trackers.json. A tracker that
fails once the run is under way (a tracking server gone) is reported in one warning and dropped: the run and
its files go on. MLflow and W&B are optional extras; a run that names one that is not installed is refused
before it loads anything, with the pip command (:func:`check_installed`).
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import netrc
import numbers
import os
import time
from pathlib import Path
from typing import Any, ClassVar, Iterable, Optional, Protocol

import yaml

from ravan_ray.config import ConfigError, RunConfig

log = logging.getLogger(__name__)

STATE_FILE = "trackers.json"  # the MLflow / W&B run ids a resumed run continues
ARTIFACTS = ("curves.png", "config.yaml", "summary.json")
DEFAULT_WANDB_PROJECT = "ravan-ray"
# tracker -> (the module it needs, how to install it)
REQUIREMENTS = {
    "tensorboard": ("tensorboardX", "pip install tensorboardX"),  # comes with ray[tune], a dependency
    "mlflow": ("mlflow", "pip install 'ravan-ray[mlflow]'"),
    "wandb": ("wandb", "pip install 'ravan-ray[wandb]'"),
}


class TrackerError(ConfigError):
    """A tracker that cannot be used as configured (not installed, no API key); one line."""


def check_installed(names: Iterable[str]) -> None:
    """Every named tracker's library imports; else one line with the pip command (called before Ray starts)."""
    for name in names:
        module, install = REQUIREMENTS[name]
        try:
            importlib.import_module(module)
        except ImportError:
            raise TrackerError(f"output.trackers: {name} is not installed; {install}") from None


# ------------------------------------------------------------------------------------------ what is logged
def flat_params(config: RunConfig | dict[str, Any]) -> dict[str, Any]:
    """The config as parameters: dotted keys (``method.heads``) to scalars; lists and mappings as their YAML
    flow text, None as "null" (MLflow and TensorBoard take no None)."""
    values = config.to_dict() if isinstance(config, RunConfig) else config
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else str(key), value)
        elif node is None:
            flat[prefix] = "null"
        elif isinstance(node, (str, bool, int, float)):
            flat[prefix] = node
        else:
            flat[prefix] = yaml.safe_dump(node, default_flow_style=True, width=10**6).strip()

    walk("", values)
    return flat


def numbers_of(values: dict[str, Any], skip: Iterable[str] = ()) -> dict[str, float]:
    """The finite numbers of a row or summary (missing metrics are NaN or None: left out, not logged as 0)."""
    skipped = set(skip)
    return {key: float(value) for key, value in values.items()
            if key not in skipped and isinstance(value, numbers.Real) and not isinstance(value, bool)
            and math.isfinite(value)}


def run_artifacts(run_dir: Path) -> list[Path]:
    """The run's files a tracker keeps beside its metrics, those that exist."""
    return [run_dir / name for name in ARTIFACTS if (run_dir / name).is_file()]


def draw_curves(run_dir: Path) -> None:
    """RUN/curves.png from metrics.csv and summary.json, unless it is already newer than both."""
    from ravan_ray.report import plot_run

    curves, sources = run_dir / "curves.png", [run_dir / "metrics.csv", run_dir / "summary.json"]
    if not all(p.is_file() for p in sources):
        return
    if curves.is_file() and curves.stat().st_mtime_ns >= max(p.stat().st_mtime_ns for p in sources):
        return
    plot_run(run_dir)


def tensorboard_final(writer, summary: dict[str, Any], artifacts: list[Path], step: int,
                      config_text: Optional[str] = None) -> None:
    """The end of a run in TensorBoard: the summary's numbers as ``summary/*`` scalars, curves.png as an image
    and the config as text."""
    for key, value in numbers_of(summary).items():
        writer.add_scalar(f"summary/{key}", value, global_step=step)
    curves = next((p for p in artifacts if p.name == "curves.png"), None)
    if curves is not None:
        from matplotlib.image import imread

        writer.add_image("curves", imread(curves)[..., :3], global_step=step, dataformats="HWC")
    if config_text is not None:
        writer.add_text("config", "```\n" + config_text + "\n```", global_step=step)
    writer.flush()


def mlflow_final(client, run_id: str, summary: dict[str, Any], artifacts: list[Path], step: int) -> None:
    """The end of a run in MLflow: the summary's numbers as metrics (final_*, best_*, totals), its words (method,
    task, metric) as tags, and the artifacts."""
    from mlflow.entities import Metric, RunTag

    stamp = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, v, stamp, step) for k, v in numbers_of(summary).items()],
                     tags=[RunTag(f"ravan.{k}", str(v)) for k, v in summary.items() if isinstance(v, str)])
    for path in artifacts:
        client.log_artifact(run_id, str(path))


def mlflow_params(client, run_id: str, params: dict[str, Any], skip: Iterable[str] = ()) -> None:
    """Parameters in batches of 100, MLflow's limit per request; values cut to its 6,000 characters."""
    from mlflow.entities import Param

    skipped = set(skip)
    items = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in skipped]
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=items[start:start + 100])


def wandb_final(run, summary: dict[str, Any], artifacts: list[Path]) -> None:
    """The end of a run in W&B: the summary into the run's summary, curves.png as an image, the artifacts as the
    run's files."""
    import wandb

    run.summary.update({k: v for k, v in summary.items() if v is not None})
    for path in artifacts:
        run.save(str(path), base_path=str(path.parent), policy="now")
    curves = next((p for p in artifacts if p.name == "curves.png"), None)
    if curves is not None:
        run.summary["curves"] = wandb.Image(str(curves))


def wandb_mode(configured: Optional[str]) -> str:
    """The W&B mode: configured, else WANDB_MODE, else online when an API key is set up, else offline."""
    if configured:
        return configured
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:  # `wandb login` writes the key into ~/.netrc (or NETRC) for api.wandb.ai
        host = (os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").split("://")[-1].split("/")[0]
        if netrc.netrc(os.environ.get("NETRC")).authenticators(host):
            return "online"
    except (OSError, netrc.NetrcParseError):
        pass
    return "offline"


def wandb_project(configured: Optional[str]) -> str:
    return configured or os.environ.get("WANDB_PROJECT") or DEFAULT_WANDB_PROJECT


def mlflow_uri(configured: Optional[str], store_parent: Path) -> str:
    """The tracking URI: configured, else MLFLOW_TRACKING_URI, else the file store under ``store_parent``. A file
    store is allowed explicitly (MLflow 3 refuses one otherwise): it is the store that works without a server."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or f"file:{(store_parent / 'mlruns').resolve()}"
    if uri.startswith("file:") or "://" not in uri:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return uri


def mlflow_experiment_id(client, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    return experiment.experiment_id if experiment is not None else client.create_experiment(name)


# ------------------------------------------------------------------------------------------- the trackers
class Tracker(Protocol):
    """One backend. ``start`` opens (or, resumed, reopens) the run and logs the config; ``log_round`` one
    finished round's row; ``finish`` the summary and artifacts, and closes; ``abort`` closes a failed run."""

    name: ClassVar[str]

    def start(self, config: RunConfig, state: dict[str, Any]) -> None: ...

    def log_round(self, row: dict[str, Any]) -> None: ...

    def finish(self, summary: dict[str, Any], artifacts: list[Path]) -> None: ...

    def abort(self) -> None: ...


class TensorBoardTracker:
    """tensorboardX's SummaryWriter: scalars named as metrics.csv's columns, the config as hyperparameters (the
    HParams tab) and as text, the summary and curves.png at the end."""

    name: ClassVar[str] = "tensorboard"

    def __init__(self, config: RunConfig, run_dir: Path):
        # a configured directory collects many runs: each in its own subdirectory, as TensorBoard expects
        configured = config.output.tensorboard.dir
        self.logdir = Path(configured) / run_dir.name if configured else run_dir / "tensorboard"
        self.writer = None
        self.step = 0

    def start(self, config: RunConfig, state: dict[str, Any]) -> None:
        from tensorboardX import SummaryWriter

        self.params = flat_params(config)
        self.config_text = yaml.safe_dump(config.to_dict(), sort_keys=False)
        self.writer = SummaryWriter(str(self.logdir), flush_secs=30)

    def log_round(self, row: dict[str, Any]) -> None:
        self.step = int(row["round"])
        for key, value in numbers_of(row, skip=("round",)).items():
            self.writer.add_scalar(key, value, global_step=self.step)
        self.writer.flush()

    def finish(self, summary: dict[str, Any], artifacts: list[Path]) -> None:
        from tensorboardX.summary import hparams

        tensorboard_final(self.writer, summary, artifacts, self.step, self.config_text)
        for event in hparams(hparam_dict=self.params, metric_dict={f"summary/{k}": v
                                                                   for k, v in numbers_of(summary).items()}):
            self.writer.file_writer.add_summary(event)
        self.abort()

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class MLflowTracker:
    """One MLflow run per federated run (named as the run directory), through MlflowClient: no global active
    run, so several runs in one process never log into each other."""

    name: ClassVar[str] = "mlflow"

    def __init__(self, config: RunConfig, run_dir: Path):
        options = config.output.mlflow
        self.uri = mlflow_uri(options.tracking_uri, run_dir.parent)
        self.experiment = options.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or config.name
        self.run_dir, self.run_id, self.step = run_dir, None, 0

    def start(self, config: RunConfig, state: dict[str, Any]) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=self.uri)
        self.run_id = state.get("run_id")
        if self.run_id is not None:  # resumed: the same MLflow run, running again
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            run = self.client.create_run(mlflow_experiment_id(self.client, self.experiment), run_name=self.run_dir.name,
                                         tags={"ravan.run_dir": str(self.run_dir.resolve())})
            self.run_id = run.info.run_id
            mlflow_params(self.client, self.run_id, flat_params(config))
        state["run_id"] = self.run_id

    def log_round(self, row: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        self.step = int(row["round"])
        stamp = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, stamp, self.step)
                                                    for k, v in numbers_of(row, skip=("round",)).items()])

    def finish(self, summary: dict[str, Any], artifacts: list[Path]) -> None:
        mlflow_final(self.client, self.run_id, summary, artifacts, self.step)
        self.client.set_terminated(self.run_id, "FINISHED")
        self.run_id = None

    def abort(self) -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, "FAILED")
            self.run_id = None


class WandbTracker:
    """One W&B run per federated run (named as the run directory; its id kept, so a resume continues it)."""

    name: ClassVar[str] = "wandb"

    def __init__(self, config: RunConfig, run_dir: Path):
        options = config.output.wandb
        self.project, self.entity = wandb_project(options.project), options.entity
        self.mode = wandb_mode(options.mode)
        self.dir = Path(options.dir or run_dir)
        self.run_dir, self.run = run_dir, None

    def start(self, config: RunConfig, state: dict[str, Any]) -> None:
        import wandb

        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            self.run = wandb.init(project=self.project, entity=self.entity, mode=self.mode, dir=str(self.dir),
                                  name=self.run_dir.name, id=state.get("run_id"), resume="allow", config=config.to_dict(),
                                  reinit="create_new", settings=wandb.Settings(silent=True, console="off"))
        except (wandb.errors.UsageError, wandb.errors.AuthenticationError) as error:  # online without a key, ...
            raise TrackerError(f"output.trackers: wandb could not start ({' '.join(str(error).split())}); "
                               f"set output.wandb.mode=offline to log locally") from None
        state["run_id"] = self.run.id

    def log_round(self, row: dict[str, Any]) -> None:
        self.run.log(numbers_of(row, skip=("round",)), step=int(row["round"]))

    def finish(self, summary: dict[str, Any], artifacts: list[Path]) -> None:
        wandb_final(self.run, summary, artifacts)
        self.run.finish()
        self.run = None

    def abort(self) -> None:
        if self.run is not None:
            self.run.finish(exit_code=1)
            self.run = None


BACKENDS: dict[str, type] = {t.name: t for t in (TensorBoardTracker, MLflowTracker, WandbTracker)}


class Trackers:
    """The run's trackers together. Built before Ray starts (a missing extra is refused then); a tracker that
    fails after its start is reported once and dropped, so tracking never costs a run its results."""

    def __init__(self, config: RunConfig, run_dir: Path, enabled: bool = True):
        names = config.output.trackers if enabled else []
        check_installed(names)
        self.run_dir = Path(run_dir)
        self.trackers: list[Tracker] = [BACKENDS[name](config, self.run_dir) for name in names]

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def start(self, config: RunConfig) -> None:
        path = self.run_dir / STATE_FILE
        state = json.loads(path.read_text()) if self.trackers and path.is_file() else {}
        for tracker in list(self.trackers):
            try:
                tracker.start(config, state.setdefault(tracker.name, {}))
            except TrackerError:
                raise
            except Exception as error:  # noqa: BLE001 - a tracking server that cannot be reached, ...
                self._dropped(tracker, error)
        if self.trackers:
            from ravan_ray.results import atomic_write_text

            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps({k: v for k, v in state.items() if v}, indent=2) + "\n")

    def log_round(self, row: dict[str, Any]) -> None:
        self._each("log_round", row)

    def finish(self, summary: dict[str, Any]) -> None:
        if self.trackers:
            draw_curves(self.run_dir)
            self._each("finish", summary, run_artifacts(self.run_dir))
            self.trackers = []

    def abort(self) -> None:
        self._each("abort")
        self.trackers = []

    def _each(self, method: str, *args: Any) -> None:
        for tracker in list(self.trackers):
            try:
                getattr(tracker, method)(*args)
            except Exception as error:  # noqa: BLE001 - any failure of a tracking backend; the run goes on
                self._dropped(tracker, error)

    def _dropped(self, tracker: Tracker, error: Exception) -> None:
        log.warning("%s tracker failed (%s: %s); the run goes on without it, its files are in %s",
                    tracker.name, type(error).__name__, " ".join(str(error).split()), self.run_dir)
        self.trackers.remove(tracker)
