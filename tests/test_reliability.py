"""Faults, resume, determinism and bad input: the run keeps going, loses nothing, and says what is wrong."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from ravan_ray.cli import main
from ravan_ray.federation import run_federation, sample_clients
from ravan_ray.results import TIMING_COLUMNS

from conftest import TINY_OVERRIDES

VOLATILE = [*TIMING_COLUMNS, "server_restarts", "failed_clients"]


def metrics_without_timing(run_dir: Path, drop=VOLATILE) -> pd.DataFrame:
    frame = pd.read_csv(run_dir / "metrics.csv")
    return frame.drop(columns=[c for c in drop if c in frame.columns])


def first_round_clients(config) -> list[int]:
    fed = config.federation
    return sample_clients(config.seed, 1, fed.num_clients, fed.clients_per_round)


def kill_actor_while_training(name_part: str) -> threading.Thread:
    """Kill the first named actor whose name contains ``name_part`` while it runs a client's training (Ray names
    the worker process after the task it runs: ``ray::ClientActor.train``)."""
    import ray
    from ray._private.state import actors

    def training(pid: int) -> bool:
        try:
            return "ClientActor.train" in Path(f"/proc/{pid}/cmdline").read_text()
        except OSError:
            return False

    def worker():
        deadline = time.time() + 300
        while time.time() < deadline:
            busy = [a["Name"] for a in actors().values()
                    if name_part in a["Name"] and a["State"] == "ALIVE" and training(a["Pid"])]
            if busy:
                ray.kill(ray.get_actor(busy[0]), no_restart=True)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    return thread


# ----------------------------------------------------------------------------------------- faults
@pytest.mark.parametrize("policy", ["skip", "retry"])
def test_client_actor_killed_mid_round_is_counted_and_replaced(ray_session, tiny_config, tmp_path, policy):
    probe = tiny_config()
    slow = first_round_clients(probe)[0]  # position 0 of round 1 -> pool slot 0, busy sleeping when killed
    config = tiny_config(f"federation.on_client_failure={policy}", "federation.rounds=3", "resources.pool_size=3",
                         f"faults.slow_clients={{{slow}: 6}}")
    killer = kill_actor_while_training("-client-0-")
    run_federation(config, tmp_path)
    killer.join(timeout=1)
    metrics = pd.read_csv(tmp_path / "metrics.csv").set_index("round")
    assert metrics.loc[1, "failed_clients"] == 1
    assert metrics.loc[1, "clients"] == (3 if policy == "retry" else 2)
    assert (metrics.loc[[2, 3], "clients"] == 3).all()  # the actor was recreated for later rounds
    assert metrics["test_accuracy"].notna().all()


def test_parameter_server_killed_is_restored_from_checkpoint_and_the_run_matches(ray_session, tiny_config, tmp_path):
    import ray

    config = tiny_config("federation.rounds=3")
    run_federation(config, tmp_path / "clean")

    def kill_server_once(row, checkpoint):
        if row["round"] == 2 and not killed:
            server = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].endswith("-server")]
            ray.kill(ray.get_actor(server[0]), no_restart=True)
            killed.append(row["round"])

    killed: list[int] = []
    run_federation(config, tmp_path / "killed", on_round=kill_server_once)
    assert killed == [2]
    assert pd.read_csv(tmp_path / "killed" / "metrics.csv")["server_restarts"].max() == 1
    pd.testing.assert_frame_equal(metrics_without_timing(tmp_path / "clean"), metrics_without_timing(tmp_path / "killed"))


def test_driver_killed_with_sigkill_resumes_to_the_same_metrics(ray_session, tiny_config, tmp_path):
    overrides = [*TINY_OVERRIDES, "federation.rounds=6", "federation.local_steps=20"]
    args = [arg for o in overrides for arg in ("--set", o)]
    env = {**os.environ, "RAY_ADDRESS": "", "TQDM_DISABLE": "1"}
    driver = subprocess.Popen([sys.executable, "-m", "ravan_ray.cli", "run", *args, "--output", str(tmp_path / "killed")],
                              env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics_file = tmp_path / "killed" / "metrics.csv"
    try:
        deadline = time.time() + 240
        while time.time() < deadline and driver.poll() is None:
            if metrics_file.exists() and len(metrics_file.read_text().splitlines()) >= 3:  # header + 2 rounds
                break
            time.sleep(0.2)
        assert driver.poll() is None, "the driver finished before it could be killed"
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
    finally:
        subprocess.run(["pkill", "-9", "-s", str(driver.pid)], check=False)  # the Ray it had started
    assert len(pd.read_csv(metrics_file)) < 6

    assert main(["resume", str(tmp_path / "killed")]) == 0
    config = tiny_config("federation.rounds=6", "federation.local_steps=20")
    run_federation(config, tmp_path / "clean")
    pd.testing.assert_frame_equal(metrics_without_timing(tmp_path / "clean"), metrics_without_timing(tmp_path / "killed"))


def test_stragglers_past_the_round_timeout_are_dropped_and_counted(ray_session, tiny_config, tmp_path):
    probe = tiny_config()
    late = first_round_clients(probe)[1]
    config = tiny_config("federation.round_timeout_s=8", "resources.pool_size=3", f"faults.slow_clients={{{late}: 30}}")
    run_federation(config, tmp_path)
    metrics = pd.read_csv(tmp_path / "metrics.csv").set_index("round")
    assert metrics.loc[1, "dropped_clients"] == 1 and metrics.loc[1, "clients"] == 2
    assert metrics.loc[1, "round_s"] < 30  # nobody waited for the 30 s straggler


def test_nan_upload_is_rejected_logged_and_not_aggregated(ray_session, tiny_config, tmp_path):
    probe = tiny_config()
    poisoned = first_round_clients(probe)[0]
    config = tiny_config(f"faults.nan_upload_clients=[{poisoned}]")
    run_federation(config, tmp_path)
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    assert metrics.loc[0, "rejected_uploads"] == 1
    assert metrics["test_loss"].notna().all() and (metrics["test_loss"] < 1e3).all()
    assert metrics["agg_error"].notna().all()


# ----------------------------------------------------------------------------------------- determinism
def test_metrics_do_not_depend_on_actor_count_or_arrival_order(ray_session, tiny_config, tmp_path):
    probe = tiny_config()
    first = first_round_clients(probe)[0]
    run_federation(tiny_config("resources.pool_size=1"), tmp_path / "one")
    # Three actors, and the lowest client id arrives last: aggregation order must follow neither the actor
    # count nor the arrival order (one actor serves its clients in id order, so they arrive in order there).
    run_federation(tiny_config("resources.pool_size=3", f"faults.slow_clients={{{first}: 3}}"), tmp_path / "late")
    pd.testing.assert_frame_equal(metrics_without_timing(tmp_path / "one"), metrics_without_timing(tmp_path / "late"))


# ----------------------------------------------------------------------------------------- bad input
BAD_INPUTS = [
    (["--set", "method.name=fedfoo"], "method.name"),
    (["--set", "method.heads=0"], "method.heads"),
    (["--set", "method.init=gram_schmidt", "--set", "method.heads=8"], "gram_schmidt"),
    (["--set", "data.partition.alpha=0"], "alpha"),
    (["--set", "data.partition.alpha=-1"], "alpha"),
    (["--set", "federation.clients_per_round=9"], "clients_per_round"),
    (["--set", "federation.num_clients=1000", "--set", "federation.clients_per_round=3"], "clients"),
    (["--set", "model.target_modules=[nope]"], "target_modules"),
    (["--set", "data.path=/no/such/file.csv"], "/no/such/file.csv"),
    (["--set", "data.name=nobody/no-such-dataset-xyz"], "nobody/no-such-dataset-xyz"),
    (["--set", "optimizer.lr=.nan"], "optimizer.lr"),
    (["--set", "optimizer.lr=-0.1"], "optimizer.lr"),
    (["--set", "federation.colour=blue"], "federation.colour"),
    (["--set", "federation.rounds=many"], "federation.rounds"),
    (["--set", "compute.distribution=[0.5,0.2,0.1,0.1]"], "sum to 1"),
    (["--set", "compute.distribution=bell", "--set", "compute.levels=[0.5,1.0]"], "4 levels"),
    (["--set", "method.scoring=loudest"], "method.scoring"),
    (["--set", "federation.eval_every=0"], "federation.eval_every"),
    (["--set", "rounds"], "--set"),
    (["--set", "model.name=nobody/no-such-model-xyz"], "nobody/no-such-model-xyz"),
    (["--set", "resources.actor_mode=per_client", "--set", "resources.cpus_per_client=2"], "per_client"),
    (["--set", "data.max_length=1"], "data.max_length"),
    (["/no/such/config.yaml"], "config file not found"),
]


@pytest.mark.parametrize("args,mentions", BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_bad_input_exits_2_with_one_line_naming_the_problem(ray_session, tmp_path, capsys, args, mentions):
    base = [arg for o in TINY_OVERRIDES for arg in ("--set", o)]
    if args[0].startswith("/"):
        argv = ["run", args[0], *args[1:], "--output", str(tmp_path / "run")]
    else:
        argv = ["run", *base, *args, "--output", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert mentions in err
    assert not (tmp_path / "run" / "metrics.csv").exists()


def test_dataset_without_the_label_field_exits_2(ray_session, tmp_path, capsys):
    data = tmp_path / "posts.jsonl"
    data.write_text("".join(f'{{"text": "post {i}", "topic": {i % 3}}}\n' for i in range(60)))
    base = [arg for o in TINY_OVERRIDES for arg in ("--set", o)]
    assert main(["run", *base, "--set", f"data.path={data}", "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "label" in err


def test_invalid_yaml_config_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("federation: [rounds: 3\n")
    assert main(["run", str(bad)]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_resume_of_a_directory_that_is_not_a_run_exits_2(tmp_path, capsys):
    assert main(["resume", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_resume_from_a_corrupt_checkpoint_exits_2(ray_session, tiny_config, tmp_path, capsys):
    run_federation(tiny_config(), tmp_path)
    for state in (tmp_path / "checkpoints").glob("*/state.safetensors"):
        state.write_bytes(b"not a safetensors file")
    assert main(["resume", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "corrupt" in err


# ----------------------------------------------------------------------------------------- safety
def test_checkpoints_are_safetensors_and_json_only(ray_session, tiny_config, tmp_path):
    run_federation(tiny_config(), tmp_path)
    files = [p for p in (tmp_path / "checkpoints").rglob("*") if p.is_file()]
    assert files and {p.suffix for p in files} == {".safetensors", ".json"}
    leftovers = [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []  # atomic writes leave no temporary files behind


def test_a_run_that_started_its_own_ray_leaves_no_ray_process_behind(tmp_path):
    args = [arg for o in [*TINY_OVERRIDES, "federation.rounds=1"] for arg in ("--set", o)]
    env = {**os.environ, "RAY_ADDRESS": "", "TQDM_DISABLE": "1"}
    driver = subprocess.Popen([sys.executable, "-m", "ravan_ray.cli", "run", *args, "--output", str(tmp_path / "run")],
                              env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert driver.wait(timeout=300) == 0
    leftovers = ""
    for _ in range(50):  # Ray's processes exit within moments of ray.shutdown()
        leftovers = subprocess.run(["pgrep", "-s", str(driver.pid), "-a"], capture_output=True, text=True).stdout
        if not leftovers:
            break
        time.sleep(0.2)
    subprocess.run(["pkill", "-9", "-s", str(driver.pid)], check=False)
    assert leftovers == ""
    assert (tmp_path / "run" / "summary.json").exists()
