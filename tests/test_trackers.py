"""Experiment tracking (output.trackers): config checks, a missing extra refused before Ray starts, what a run
logs to TensorBoard, MLflow (its local file store) and W&B (offline), and a sweep's Tune callbacks.

MLflow and W&B are optional extras: their tests skip, saying so, where they are not installed."""

from __future__ import annotations

import glob
import importlib.util
import json
import struct
import sys
from pathlib import Path

import pytest
import yaml

from ravan_ray.cli import main
from ravan_ray.config import ConfigError, load_config
from ravan_ray.trackers import Trackers, flat_params, wandb_mode

from conftest import TINY_OVERRIDES

HAVE_MLFLOW = importlib.util.find_spec("mlflow") is not None
HAVE_WANDB = importlib.util.find_spec("wandb") is not None
needs_mlflow = pytest.mark.skipif(not HAVE_MLFLOW, reason="mlflow not installed (pip install -e '.[mlflow]')")
needs_wandb = pytest.mark.skipif(not HAVE_WANDB, reason="wandb not installed (pip install -e '.[wandb]')")
INSTALLED = ["tensorboard"] + ["mlflow"] * HAVE_MLFLOW + ["wandb"] * HAVE_WANDB
TINY_ARGS = [arg for override in TINY_OVERRIDES for arg in ("--set", override)]


@pytest.fixture(autouse=True)
def offline_trackers(monkeypatch, tmp_path):
    """No tracker reaches the network or the user's settings: W&B offline, MLflow from its defaults."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_PROJECT", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)


# ------------------------------------------------------------------------------------------- reading back
def tensorboard_scalars(logdir: Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value} of every event file under ``logdir`` (TFRecord framing: length, its CRC, the
    record, its CRC), parsed with tensorboardX's Event proto: tensorboard itself need not be installed."""
    from tensorboardX.proto import event_pb2

    scalars: dict[str, dict[int, float]] = {}
    for path in sorted(Path(logdir).rglob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                if value.WhichOneof("value") == "simple_value":
                    scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


def tensorboard_tags(logdir: Path) -> set[str]:
    from tensorboardX.proto import event_pb2

    tags = set()
    for path in Path(logdir).rglob("events.out.tfevents.*"):
        data, pos = path.read_bytes(), 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            tags.update(v.tag for v in event_pb2.Event.FromString(data[pos + 12:pos + 12 + length]).summary.value)
            pos += 12 + length + 4
    return tags


def wandb_records(run_dir: Path) -> list:
    """The records of W&B's offline run file (LevelDB-log framing in 32 KiB blocks after a 7-byte header)."""
    from wandb.proto import wandb_internal_pb2

    (path,) = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    data, pos, block, records, pending = Path(path).read_bytes(), 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the block's tail is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += block - pos % block
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            records.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    return records


# ---------------------------------------------------------------------------------------- no Ray needed
def test_unknown_tracker_name_is_one_line_with_exit_code_2(capsys):
    assert main(["run", "--dry-run", "--set", "output.trackers=[tensorboard,neptune]"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("ravan-ray: error: output.trackers: unknown tracker 'neptune' (choose from tensorboard, mlflow, "
                   "wandb)")


def test_trackers_accept_comma_separated_text_and_name_each_once():
    config = load_config(None, ["output.trackers=tensorboard, mlflow,tensorboard"])
    assert config.output.trackers == ["tensorboard", "mlflow"]
    assert load_config(None, []).output.trackers == []
    with pytest.raises(ConfigError, match="output.wandb.mode"):
        load_config(None, ["output.wandb.mode=sometimes"])


@pytest.mark.parametrize("tracker, extra", [("mlflow", "mlflow"), ("wandb", "wandb")])
def test_a_missing_extra_is_one_line_with_the_pip_command_before_ray_starts(monkeypatch, tmp_path, capsys,
                                                                             tracker, extra):
    import ray

    monkeypatch.setitem(sys.modules, tracker, None)  # import mlflow / wandb now raises ImportError
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started"))
    run = ["run", *TINY_ARGS, "--set", f"output.trackers=[tensorboard,{tracker}]", "--output", str(tmp_path / "r")]
    for args in (run, [*run, "--dry-run"]):
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"ravan-ray: error: output.trackers: {tracker} is not installed; pip install 'ravan-ray[{extra}]'"
    assert not (tmp_path / "r").exists()

    from ravan_ray.sweep import run_sweep

    smoke = yaml.safe_load((Path(__file__).resolve().parents[1] / "tune_configs" / "smoke.yaml").read_text())
    smoke["base"]["output"] = {"trackers": [tracker]}
    (tmp_path / "tune.yaml").write_text(yaml.safe_dump(smoke))
    with pytest.raises(ConfigError, match=rf"pip install 'ravan-ray\[{extra}\]'"):
        run_sweep(tmp_path / "tune.yaml", output=tmp_path / "sweep")


def test_wandb_mode_follows_the_setting_then_wandb_mode_then_whether_a_key_exists(monkeypatch, tmp_path):
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    assert wandb_mode("disabled") == "disabled"
    assert wandb_mode(None) == "offline"  # WANDB_MODE=offline (the fixture)
    monkeypatch.delenv("WANDB_MODE")
    assert wandb_mode(None) == "offline"  # no key anywhere
    (tmp_path / "netrc").write_text("machine api.wandb.ai login user password secret\n")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert wandb_mode(None) == "online"  # `wandb login` wrote a key


def test_config_parameters_are_dotted_keys_with_scalars():
    params = flat_params(load_config(None, ["method.heads=8", "output.trackers=[tensorboard]"]))
    assert params["method.heads"] == 8 and params["data.partition.alpha"] == 0.3
    assert params["compute.levels"] == "[0.25, 0.5, 0.75, 1.0]" and params["output.trackers"] == "[tensorboard]"
    assert params["method.budget"] == "null"
    assert all(isinstance(v, (str, bool, int, float)) for v in params.values())


def test_a_failing_tracker_is_reported_once_and_dropped_while_the_others_go_on(tmp_path, caplog):
    trackers = Trackers(load_config(None, ["output.trackers=[tensorboard]"]), tmp_path)
    calls = []

    class Broken:
        name = "broken"

        def log_round(self, row):
            raise ConnectionError("tracking server gone")

    class Working:
        name = "working"

        def log_round(self, row):
            calls.append(row["round"])

    trackers.trackers = [Broken(), Working()]
    trackers.log_round({"round": 1})
    trackers.log_round({"round": 2})
    assert calls == [1, 2] and [t.name for t in trackers.trackers] == ["working"]
    warnings = [r.getMessage() for r in caplog.records if "tracker failed" in r.getMessage()]
    assert len(warnings) == 1 and "broken" in warnings[0] and "tracking server gone" in warnings[0]


def test_a_configured_tensorboard_dir_holds_each_run_in_its_own_subdirectory(tmp_path):
    config = load_config(None, [f"output.tensorboard.dir={tmp_path / 'tb'}", "output.trackers=[tensorboard]"])
    for name, loss in (("a", 2.0), ("b", 1.0)):
        trackers = Trackers(config, tmp_path / "runs" / name)
        trackers.start(config)
        trackers.log_round({"round": 1, "train_loss": loss, "test_accuracy": float("nan")})
        trackers.finish({"method": "ravan", "rounds": 1, "final_test_accuracy": None})
    assert sorted(p.name for p in (tmp_path / "tb").iterdir()) == ["a", "b"]
    assert tensorboard_scalars(tmp_path / "tb" / "b")["train_loss"] == {1: 1.0}
    assert "test_accuracy" not in tensorboard_scalars(tmp_path / "tb" / "a")  # NaN: not measured, not logged


@needs_mlflow
def test_a_resumed_run_continues_its_mlflow_run(tmp_path):
    from mlflow.tracking import MlflowClient

    config = load_config(None, ["output.trackers=[mlflow]", "name=resumable"])
    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    first = Trackers(config, run_dir)
    first.start(config)
    first.log_round({"round": 1, "train_loss": 2.0})
    first.abort()  # the run was killed
    run_id = json.loads((run_dir / "trackers.json").read_text())["mlflow"]["run_id"]
    client = MlflowClient(tracking_uri=f"file:{tmp_path / 'runs' / 'mlruns'}")
    assert client.get_run(run_id).info.status == "FAILED"

    again = Trackers(config, run_dir)
    again.start(config)
    assert client.get_run(run_id).info.status == "RUNNING"
    again.log_round({"round": 2, "train_loss": 1.5})
    (run_dir / "summary.json").write_text(json.dumps({"method": "ravan", "rounds": 2, "final_test_accuracy": 0.5}))
    again.finish({"method": "ravan", "rounds": 2, "final_test_accuracy": 0.5})
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["final_test_accuracy"] == 0.5
    assert [m.step for m in client.get_metric_history(run_id, "train_loss")] == [1, 2]
    assert len(client.search_runs([run.info.experiment_id])) == 1


# --------------------------------------------------------------------------------------- one tracked run
@pytest.fixture(scope="module")
def tracked_run(ray_session, tmp_path_factory):
    """One 2-round tiny run logging to every installed tracker (MLflow's default file store, W&B offline)."""
    run_dir = tmp_path_factory.mktemp("tracked") / "runs" / "tracked"
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    try:
        assert main(["run", *TINY_ARGS, "--quiet", "--set", "name=tracking", "--set",
                     f"output.trackers=[{','.join(INSTALLED)}]", "--output", str(run_dir)]) == 0
    finally:
        mp.undo()
    return run_dir


def test_tensorboard_events_hold_every_rounds_metrics_and_the_summary(tracked_run):
    import pandas as pd

    scalars = tensorboard_scalars(tracked_run / "tensorboard")
    metrics = pd.read_csv(tracked_run / "metrics.csv")
    for column in ("train_loss", "test_accuracy", "uplink_bytes"):
        assert scalars[column] == pytest.approx(dict(zip(metrics["round"], metrics[column])), rel=1e-6)
    summary = json.loads((tracked_run / "summary.json").read_text())
    assert scalars["summary/final_test_accuracy"][2] == pytest.approx(summary["final_test_accuracy"])
    assert {"curves", "config/text_summary"} <= tensorboard_tags(tracked_run / "tensorboard")  # image, text


@needs_mlflow
def test_mlflow_file_store_holds_config_params_round_metrics_summary_and_curves(tracked_run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"file:{tracked_run.parent / 'mlruns'}")
    experiment = client.get_experiment_by_name("tracking")  # the run's name
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    assert run.data.params["method.name"] == "ravan" and run.data.params["federation.rounds"] == "2"
    assert run.data.params["model.name"] == "tiny-bert"
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in history] == [1, 2]
    summary = json.loads((tracked_run / "summary.json").read_text())
    assert run.data.metrics["final_test_accuracy"] == pytest.approx(summary["final_test_accuracy"])
    assert run.data.tags["ravan.method"] == "ravan"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"curves.png", "config.yaml", "summary.json"} <= artifacts


@needs_wandb
def test_wandb_offline_run_holds_config_round_history_summary_and_curves(tracked_run):
    records = wandb_records(tracked_run)
    history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    assert [h["_step"] for h in history] == [1, 2]
    assert all("train_loss" in h and "test_accuracy" in h for h in history)
    summary_keys = {item.key for r in records if r.WhichOneof("record_type") == "summary" for item in r.summary.update}
    assert {"final_test_accuracy", "best_test_accuracy", "curves"} <= summary_keys
    config = next(r.run.config for r in records if r.WhichOneof("record_type") == "run")
    assert json.loads(next(i.value_json for i in config.update if i.key == "method"))["name"] == "ravan"
    files = {f.path for r in records if r.WhichOneof("record_type") == "files" for f in r.files.files}
    assert {"curves.png", "config.yaml", "summary.json"} <= files


# A sweep's Tune callbacks: tests/test_sweep.py (test_smoke_sweep_logs_each_trial_through_tunes_callbacks), on
# the smoke sweep those tests run anyway.
