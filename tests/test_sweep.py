"""Ray Tune sweeps: validation before Ray starts, per-trial placement groups, results.csv, resume, retries."""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import pandas as pd
import pytest
import yaml

from ravan_ray.config import ConfigError
from ravan_ray.sweep import (SweepSpec, check_cluster_fits, placement_group_factory, run_sweep, trial_bundles,
                             trial_config)

from test_trackers import INSTALLED, tensorboard_scalars

SMOKE = Path(__file__).resolve().parents[1] / "tune_configs" / "smoke.yaml"


def smoke_values(**changes):
    values = yaml.safe_load(SMOKE.read_text())
    values.update(changes)
    return values


def write_tune_config(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def mtimes(sweep: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in sweep.glob("*/run/metrics.csv")}


# ---------------------------------------------------------------------------------------- no Ray needed
def test_bundles_follow_each_trials_own_config():
    base = smoke_values()["base"]
    pool = trial_config(base, {"resources.pool_size": 3})
    assert trial_bundles(pool, driver_cpus=1) == [{"CPU": 1.0}] + [{"CPU": 0.5}] * 3

    per_client = trial_config(base, {"resources.actor_mode": "per_client"})
    assert trial_bundles(per_client, driver_cpus=1) == [{"CPU": 1.0}] + [{"CPU": 0.5}] * 6  # num_clients = 6

    gpus = trial_config(base, {"resources.gpus_per_client": 0.25, "resources.server_gpus": 0.5})
    assert trial_bundles(gpus, driver_cpus=1) == [{"CPU": 1.0}, {"GPU": 0.5}] + [{"CPU": 0.5, "GPU": 0.25}] * 2

    server = trial_config(base, {"resources.server_cpus": 1})
    assert trial_bundles(server, driver_cpus=0.5)[:2] == [{"CPU": 0.5}, {"CPU": 1.0}]

    factory = placement_group_factory(gpus, driver_cpus=1, strategy="SPREAD")
    assert factory.bundles == trial_bundles(gpus, driver_cpus=1) and factory.strategy == "SPREAD"
    assert factory.required_resources == {"CPU": 2.0, "GPU": 1.0}


def test_unset_pool_size_is_pinned_to_clients_per_round():
    base = {**smoke_values()["base"], "resources": {"cpus_per_client": 1}}
    config = trial_config(base, {"federation.clients_per_round": 4})
    assert config.resources.pool_size == 4
    assert len(trial_bundles(config)) == 1 + 4


def test_search_space_maps_to_tune_and_heterogeneous_trials_reserve_differently():
    from ray import tune

    spec = SweepSpec(smoke_values(search_space={
        "method.heads": {"grid": [1, 2]}, "optimizer.lr": {"loguniform": [1e-4, 1e-2]},
        "seed": {"randint": [0, 5]}, "method.init": {"choice": ["normal", "constant"]},
        "resources.cpus_per_client": {"grid": [0.25, 1]}}))
    space = spec.param_space()
    assert space["method.heads"] == tune.grid_search([1, 2])
    assert isinstance(space["optimizer.lr"], tune.search.sample.Float)
    assert isinstance(space["seed"], tune.search.sample.Integer)
    assert {sum(b.get("CPU", 0) for b in trial_bundles(c, spec.driver_cpus)) for c in spec.candidates} == {1.0, 2.5}


@pytest.mark.parametrize("changes, message", [
    ({"search_space": {"method.headz": {"grid": [1, 2]}}}, "unknown config key 'method.headz'"),
    ({"search_space": {"method.heads": {"sweep": [1, 2]}}}, "unknown spec 'sweep'"),
    ({"search_space": {"method.heads": [1, 2]}}, "give one of grid, choice"),
    ({"search_space": {"method.heads": {"grid": [1, 0]}}}, "method.heads"),
    ({"search_space": {"optimizer.lr": {"loguniform": [0, 1]}}}, "loguniform needs low > 0"),
    ({"search_space": {"optimizer.lr": {"uniform": [1]}}}, r"needs \[low, high\]"),
    ({"search_space": {"seed.x": {"grid": [1]}}}, "'seed' in 'seed.x' is not a config section"),
    ({"search_space": {"federation.clients_per_round": {"grid": [2, 7]}}}, "clients_per_round"),
    ({"searchspace": {}}, "unknown tune config key 'searchspace'"),
    ({"scheduler": {"hyperband": {}}}, "only {asha"),
    ({"placement_strategy": "RANDOM"}, "placement_strategy"),
])
def test_bad_tune_config_is_one_line_config_error(tmp_path, changes, message):
    path = write_tune_config(tmp_path / "bad.yaml", smoke_values(**changes))
    with pytest.raises(ConfigError, match=message) as error:
        run_sweep(path, output=tmp_path / "out")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()  # rejected before anything ran


def test_cli_reports_a_bad_tune_config_with_exit_code_2(tmp_path, capsys):
    from ravan_ray.cli import main

    path = write_tune_config(tmp_path / "bad.yaml", smoke_values(search_space={"method.headz": {"grid": [1]}}))
    assert main(["sweep", str(path), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ravan-ray: error:") and "method.headz" in err and len(err.splitlines()) == 1


def test_cluster_fit_check_names_the_need_and_the_have():
    spec = SweepSpec(smoke_values(search_space={"resources.actor_mode": {"grid": ["pool", "per_client"]}}))
    check_cluster_fits(spec.candidates[:1], 1.0, "PACK", {"CPU": 2.0}, [{"CPU": 2.0}])  # 1 + 2 x 0.5 fits
    with pytest.raises(ConfigError, match=r"needs 4 CPU.* but the cluster has 2 CPU"):
        check_cluster_fits(spec.candidates, 1.0, "PACK", {"CPU": 2.0}, [{"CPU": 2.0}])
    with pytest.raises(ConfigError, match="no node can hold a bundle of 1 GPU"):
        gpu = trial_config(spec.base, {"resources.server_gpus": 1})
        check_cluster_fits([gpu], 1.0, "PACK", {"CPU": 4.0, "GPU": 1.0}, [{"CPU": 4.0, "GPU": 0.5}, {"GPU": 0.5}])


# ---------------------------------------------------------------------------------------- on the session Ray
def test_trial_needing_more_than_the_cluster_fails_fast(tmp_path, ray_session):
    values = smoke_values()
    values["base"]["resources"] = {"cpus_per_client": 2, "pool_size": 3}  # 0.5 + 3 x 2 = 6.5 > 4 CPUs
    path = write_tune_config(tmp_path / "big.yaml", values)
    with pytest.raises(ConfigError, match=r"needs 6.5 CPU.* but the cluster has 4 CPU"):
        run_sweep(path, output=tmp_path / "out")


# The smoke sweep also logs to every installed experiment tracker (W&B offline), checked below.
TRACKED = (f"output.trackers=[{','.join(INSTALLED)}]", "output.wandb.mode=offline")


@pytest.fixture(scope="module")
def smoke_sweep(tmp_path_factory, ray_session):
    out = tmp_path_factory.mktemp("sweeps") / "smoke"
    environment = dict(os.environ)
    results = run_sweep(SMOKE, output=out, overrides=TRACKED)
    return out, results, environment, dict(os.environ)


def test_a_sweep_leaves_the_processs_tracker_environment_as_it_found_it(smoke_sweep):
    """Tune's MLflow callback writes MLFLOW_TRACKING_URI into os.environ; a run started later in the same process
    must not log into the sweep's store."""
    _, _, before, after = smoke_sweep
    assert {k: v for k, v in after.items() if k.startswith("MLFLOW_")} == \
        {k: v for k, v in before.items() if k.startswith("MLFLOW_")}


def test_smoke_sweep_writes_one_row_and_one_run_per_trial(smoke_sweep):
    out, results, *_ = smoke_sweep
    assert results == out / "results.csv"
    table = pd.read_csv(results)
    assert len(table) == 2
    assert sorted(table["method.heads"]) == [2, 4]
    assert set(table["status"]) == {"TERMINATED"} and set(table["rounds"]) == {2}
    assert (table["total_bytes"] > 0).all() and table["final_test_accuracy"].notna().all()
    for run_dir in table["run_dir"]:
        metrics = pd.read_csv(Path(run_dir) / "metrics.csv")
        assert list(metrics["round"]) == [1, 2]
        assert (Path(run_dir) / "config.yaml").is_file()


def test_rerunning_a_finished_sweep_restores_it_without_redoing_trials(smoke_sweep):
    out, results, *_ = smoke_sweep
    before = mtimes(out)
    trials_before = sorted(p.name for p in out.iterdir() if (p / "run").is_dir())
    run_sweep(SMOKE, output=out, overrides=TRACKED)
    assert mtimes(out) == before
    assert sorted(p.name for p in out.iterdir() if (p / "run").is_dir()) == trials_before
    table = pd.read_csv(results)
    assert len(table) == 2 and set(table["attempts"]) == {1}


def test_smoke_sweep_logs_each_trial_through_tunes_callbacks(smoke_sweep):
    """One TensorBoard event log per trial with its rounds and summary (Tune's callback), and, where installed,
    one MLflow run per trial with the sampled and the resolved config, summary and curves.png, and one W&B run
    per trial."""
    out, *_ = smoke_sweep
    trials = sorted(p.parent for p in out.glob("*/run"))
    assert len(trials) == 2
    for trial in trials:
        scalars = tensorboard_scalars(trial)
        assert set(scalars["ray/tune/test_accuracy"]) == {1, 2} and set(scalars["ray/tune/train_loss"]) == {1, 2}
        summary = json.loads((trial / "run" / "summary.json").read_text())
        assert scalars["summary/final_test_accuracy"][2] == pytest.approx(summary["final_test_accuracy"])
        assert (trial / "run" / "curves.png").is_file()
        assert not (trial / "run" / "tensorboard").exists()  # the trial's own run logs to no tracker
    if "mlflow" in INSTALLED:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=f"file:{out / 'mlruns'}")
        runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
        assert len(runs) == 2
        assert sorted(r.data.params["method.heads"] for r in runs) == ["2", "4"]
        for run in runs:
            assert run.data.params["model.name"] == "tiny-bert"  # the resolved config, beside the sampled keys
            assert "final_test_accuracy" in run.data.metrics and "test_accuracy" in run.data.metrics
            assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2]
            assert "curves.png" in {a.path for a in client.list_artifacts(run.info.run_id)}
    if "wandb" in INSTALLED:
        assert len(glob.glob(str(out / "**" / "offline-run-*" / "run-*.wandb"), recursive=True)) == 2


def test_an_existing_non_sweep_directory_is_refused(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "something.txt").write_text("x")
    with pytest.raises(ConfigError, match="is not a sweep directory"):
        run_sweep(SMOKE, output=tmp_path / "out")


def one_trial(**changes) -> dict:
    """The smoke base as a single trial with one client actor (fewer processes to start)."""
    values = smoke_values(**{"search_space": {}, **changes})
    values["base"]["resources"] = {"cpus_per_client": 0.5, "pool_size": 1}
    return values


def test_a_failed_trial_is_retried_and_resumes_from_its_checkpoint(tmp_path, ray_session):
    values = one_trial(name="retry", inject_failure_after_round=1, max_failures=1)
    path = write_tune_config(tmp_path / "retry.yaml", values)
    table = pd.read_csv(run_sweep(path, output=tmp_path / "out"))
    assert len(table) == 1
    row = table.iloc[0]
    assert row["status"] == "TERMINATED" and row["attempts"] == 2 and row["rounds"] == 2
    attempts = [json.loads(line) for line in (Path(row["run_dir"]).parent / "attempts.jsonl").read_text().splitlines()]
    assert [a["resumed_from_round"] for a in attempts] == [0, 1]  # the retry started at round 2
    metrics = pd.read_csv(Path(row["run_dir"]) / "metrics.csv")
    assert list(metrics["round"]) == [1, 2]


def test_rerunning_a_sweep_with_an_errored_trial_resumes_it_from_its_checkpoint(tmp_path, ray_session):
    values = one_trial(name="errored", inject_failure_after_round=1, max_failures=0)
    path = write_tune_config(tmp_path / "errored.yaml", values)
    first = pd.read_csv(run_sweep(path, output=tmp_path / "out"))
    assert list(first["status"]) == ["ERROR"] and list(first["rounds"]) == [1]

    second = pd.read_csv(run_sweep(path, output=tmp_path / "out"))
    assert list(second["status"]) == ["TERMINATED"] and list(second["rounds"]) == [2]
    attempts = (tmp_path / "out" / second["trial_id"][0] / "attempts.jsonl").read_text().splitlines()
    assert [json.loads(a)["resumed_from_round"] for a in attempts] == [0, 1]


def test_asha_decides_on_test_accuracy_per_round():
    spec = SweepSpec(smoke_values(scheduler={"asha": {"max_t": 2, "grace_period": 1, "reduction_factor": 2}}))
    scheduler = spec.scheduler()
    assert (scheduler._time_attr, scheduler._metric, scheduler._max_t) == ("round", "test_accuracy", 2)
    assert SweepSpec(smoke_values()).scheduler() is None
    with pytest.raises(ConfigError, match="grace_period must be <= max_t"):
        SweepSpec(smoke_values(scheduler={"asha": {"max_t": 2, "grace_period": 3}}))


def test_tune_metrics_leave_out_what_was_not_measured():
    from ravan_ray.sweep import _tune_metrics

    metrics = _tune_metrics({"round": 3, "train_loss": 0.5, "test_accuracy": float("nan"), "agg_error": None,
                             "uplink_bytes": 10})
    assert metrics == {"round": 3, "train_loss": 0.5, "uplink_bytes": 10}


def test_exponent_floats_in_a_tune_config_are_numbers(tmp_path):
    from ravan_ray.sweep import load_sweep_spec

    text = SMOKE.read_text().split("search_space:")[0] + "search_space:\n  optimizer.lr: {loguniform: [1e-4, 1e-2]}\n"
    (tmp_path / "lr.yaml").write_text(text)
    spec = load_sweep_spec(tmp_path / "lr.yaml")
    assert spec.space["optimizer.lr"] == {"loguniform": [1e-4, 1e-2]}


# --------------------------------------------- per-case grids, successive halving per group, extended grids
PROTOCOL_SPACE = {
    "seed": {"grid": [0, 1]},
    "method": {"grid": [{"name": "ravan"}, {"name": "full_ft"}]},
    "optimizer.lr": {"grid": [0.01, 0.001], "by": "method.name", "grids": {"full_ft": [1e-4, 1e-5]},
                     "extend": {"factor": 10, "max_steps": 2}},
}


def protocol_values(**changes) -> dict:
    values = smoke_values(search_space=PROTOCOL_SPACE, **changes)
    values["base"]["data"]["validation_fraction"] = 0.2
    return values


def test_a_grid_per_case_lists_each_methods_own_rates_first_key_slowest():
    spec = SweepSpec(protocol_values())
    assert spec.explicit and spec.trials() == 8 and spec.most_extensions() == 8
    assert [(p["seed"], p["method"]["name"], p["optimizer.lr"]) for p in spec.points()] == [
        (0, "ravan", 0.01), (0, "ravan", 0.001), (0, "full_ft", 1e-4), (0, "full_ft", 1e-5),
        (1, "ravan", 0.01), (1, "ravan", 0.001), (1, "full_ft", 1e-4), (1, "full_ft", 1e-5)]
    assert {c.optimizer.lr for c in spec.candidates if c.method.name == "full_ft"} == {1e-4, 1e-5}


@pytest.mark.parametrize("change, message", [
    (lambda s: s.update({"optimizer.lr": s.pop("optimizer.lr"), "method": s.pop("method")}),
     "put 'method' before 'optimizer.lr'"),
    (lambda s: s["optimizer.lr"].pop("grids"), "'by' and 'grids' go together"),
    (lambda s: s["optimizer.lr"].update(extend={"factor": 1}), "extend.factor must be > 1"),
    (lambda s: s["optimizer.lr"].update(extend={"steps": 2}), "extend takes"),
    (lambda s: s.update(seed={"choice": [0, 1]}), "every key must be a grid"),
    (lambda s: s["method"].update(extend={}), "extend needs a grid of positive numbers"),
    (lambda s: s["seed"].update(by="method.name"), "'by' and 'grids' go together"),
])
def test_a_bad_per_case_grid_or_extension_is_one_line_naming_the_key(change, message):
    values = protocol_values()
    values["search_space"] = json.loads(json.dumps(PROTOCOL_SPACE))
    change(values["search_space"])
    with pytest.raises(ConfigError, match=message):
        SweepSpec(values)


def test_extending_needs_a_validation_split():
    with pytest.raises(ConfigError, match="extend chooses on validation"):
        SweepSpec(smoke_values(search_space=PROTOCOL_SPACE))


def test_successive_halving_compares_a_trial_only_with_its_own_group():
    from types import SimpleNamespace

    spec = SweepSpec(protocol_values(scheduler={"asha": {"max_t": 4, "grace_period": 1, "reduction_factor": 2,
                                                          "group_by": ["method.name", "seed"]}}))
    scheduler = spec.scheduler()

    def trial(name, method, seed=0):
        return SimpleNamespace(trial_id=name, config={"seed": seed, "method": {"name": method}, "optimizer.lr": 0.1})

    ravan_good, ravan_bad, full_ft, other_seed = (trial("a", "ravan"), trial("b", "ravan"), trial("c", "full_ft"),
                                                 trial("d", "ravan", seed=1))
    for t in (ravan_good, ravan_bad, full_ft, other_seed):
        scheduler.on_trial_add(None, t)
    # ASHA stops on the validation metric (every trial holds out a validation split), never on test
    assert scheduler.on_trial_result(None, ravan_good, {"round": 1, "val_accuracy": 0.9, "test_accuracy": 0.1}) \
        == "CONTINUE"
    assert scheduler.on_trial_result(None, ravan_bad, {"round": 1, "val_accuracy": 0.5, "test_accuracy": 0.9}) \
        == "STOP"
    # far below ravan's rates, but the first of their own groups: they go on
    assert scheduler.on_trial_result(None, full_ft, {"round": 1, "val_accuracy": 0.1}) == "CONTINUE"
    assert scheduler.on_trial_result(None, other_seed, {"round": 1, "val_accuracy": 0.2}) == "CONTINUE"
    # an earlier stage's trials are replayed into their group's rungs
    replayed = spec.scheduler(history=[({"seed": 0, "method": {"name": "ravan"}}, [(1, 0.9), (2, 0.95)])])
    late = trial("e", "ravan")
    replayed.on_trial_add(None, late)
    assert replayed.on_trial_result(None, late, {"round": 1, "val_accuracy": 0.5}) == "STOP"


def test_the_grid_extends_beyond_the_chosen_value_only_at_an_edge_and_at_most_max_steps():
    from ravan_ray.sweep_search import extension_points

    spec = SweepSpec(protocol_values())

    def trials(*rows):
        return [{"sampled": {"seed": 0, "method": {"name": m}, "optimizer.lr": lr}, "rounds": r, "value": v}
                for m, lr, r, v in rows]

    # ravan is best at its largest rate (0.01) -> 0.1 next; full_ft best at its smallest (1e-5) -> 1e-6 next
    points = extension_points(spec.space, spec.base, trials(
        ("ravan", 0.01, 2, 0.8), ("ravan", 0.001, 2, 0.5), ("full_ft", 1e-4, 2, 0.3), ("full_ft", 1e-5, 2, 0.4)),
        higher_is_better=True)
    assert sorted((p["method"]["name"], p["optimizer.lr"]) for p in points) == [("full_ft", 1e-6), ("ravan", 0.1)]
    # interior: nothing more for ravan; a trial stopped early (fewer rounds) loses to one that ran the schedule,
    # whatever its metric at the round it stopped
    assert extension_points(spec.space, spec.base, trials(
        ("ravan", 0.01, 2, 0.8), ("ravan", 0.001, 2, 0.5), ("ravan", 0.1, 1, 0.9)), True) == []
    # two values beyond the grid already (max_steps 2): no third
    assert extension_points(spec.space, spec.base, trials(
        ("ravan", 0.01, 2, 0.5), ("ravan", 0.001, 2, 0.4), ("ravan", 0.1, 2, 0.6), ("ravan", 1.0, 2, 0.7)), True) == []


def test_an_extended_grid_runs_the_value_beyond_the_chosen_edge_in_its_own_stage_and_resumes(tmp_path, ray_session):
    values = one_trial(name="extended", search_space={
        "method.name": {"grid": ["ravan"]},
        "optimizer.lr": {"grid": [0.001, 0.01], "extend": {"factor": 10, "max_steps": 1}}},
        scheduler={"asha": {"max_t": 2, "grace_period": 1, "group_by": ["method.name"]}})
    values["base"]["data"]["validation_fraction"] = 0.2
    path = write_tune_config(tmp_path / "extended.yaml", values)
    table = pd.read_csv(run_sweep(path, output=tmp_path / "out"))
    assert list(table["stage"]) == [0, 0, 1]
    grid = table[table["stage"] == 0].sort_values(["rounds", "final_val_accuracy", "optimizer.lr"],
                                                  ascending=[False, False, True])
    chosen = grid["optimizer.lr"].iloc[0]  # the rule the sweep and the report share: rounds, validation, value
    beyond = table[table["stage"] == 1].iloc[0]
    assert beyond["optimizer.lr"] == pytest.approx(chosen * 10 if chosen == 0.01 else chosen / 10)
    assert Path(beyond["run_dir"]).parent.parent == tmp_path / "out" / "extend_1"
    before = mtimes(tmp_path / "out") | mtimes(tmp_path / "out" / "extend_1")
    again = pd.read_csv(run_sweep(path, output=tmp_path / "out"))  # restored stage by stage, nothing redone
    assert len(again) == 3 and (mtimes(tmp_path / "out") | mtimes(tmp_path / "out" / "extend_1")) == before


def test_only_runs_a_part_of_the_grid_and_refuses_values_outside_it(tmp_path, capsys):
    from ravan_ray.cli import main
    from ravan_ray.sweep import load_sweep_spec

    path = write_tune_config(tmp_path / "protocol.yaml", protocol_values())
    part = load_sweep_spec(path, only=("seed=1",))
    assert {p["seed"] for p in part.points()} == {1} and part.trials() == 4
    assert part.normalized()["search_space"]["seed"]["grid"] == [1]  # the part's saved tune config says what it ran
    assert load_sweep_spec(path, only=("seed=[1, 0]",)).trials() == 8
    for only, message in (("seed=5", "5 is not in its grid"), ("heads=2", "give KEY=VALUES for a key of"),
                          ("optimizer.lr=0.01", "only a plain grid can be cut")):
        assert main(["sweep", str(path), "--only", only, "--dry-run"]) == 2
        assert message in capsys.readouterr().err
