"""Runs attached to a multi-node Ray cluster (tests/cluster_harness.py: a head with no CPU and three 1-CPU worker
nodes, all on this machine), the faults a cluster brings, and the same numbers as on one machine.

The cluster is started once for the module. Each run is a driver process of its own attached with
resources.address (the session's private Ray lives in the test process, and one process joins one cluster); its
fault-free reference runs in the session's private Ray.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

from ravan_ray.federation import run_federation

from conftest import TINY_OVERRIDES

pytestmark = pytest.mark.cluster

HARNESS = Path(__file__).with_name("cluster_harness.py")
MARK = "@@ "  # the harness marks its answers
RUN_TIMEOUT_S = 300
# Wall-clock columns, and the fault counters that differ between a faulty run and its fault-free twin by design.
VOLATILE = ["wall_s", "round_s", "agg_s", "eval_s", "failed_clients", "server_restarts"]
# Three 1-CPU nodes, four single-threaded clients a round, one CPU each: the fragmentation case.
CLUSTER_RUN = [*TINY_OVERRIDES, "resources.cpus_per_client=1", "resources.pool_size=null",
               "federation.num_clients=8", "federation.clients_per_round=4"]


class ClusterHandle:
    def __init__(self, process: subprocess.Popen, address: str):
        self.process, self.address = process, address

    def command(self, line: str) -> dict:
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()
        return answer(self.process)

    def ensure(self, *names: str) -> None:
        """Put back the worker nodes a test removed."""
        live = set(self.command("nodes")["nodes"])
        for name in names:
            if name not in live:
                self.command(f"add {name} 1")


def answer(process: subprocess.Popen) -> dict:
    """The harness's next answer, skipping what Ray prints to its stdout."""
    while True:
        line = process.stdout.readline()
        if not line:
            raise RuntimeError("the cluster harness ended (its log: harness.log in the module's cluster_home)")
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])


def environment() -> dict[str, str]:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    temp_dir = tempfile.mkdtemp(prefix="rrc", dir="/tmp")  # short: Ray's socket paths have a length limit
    home = tmp_path_factory.mktemp("cluster_home")  # the nodes' working directory, not the drivers'
    log = open(home / "harness.log", "w")
    env = {**environment(), "RAVAN_RAY_CACHE": str(home / "cache")}  # the nodes' own cache (copies of models)
    process = subprocess.Popen([sys.executable, str(HARNESS), temp_dir], cwd=home, env=env, text=True,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, start_new_session=True)
    try:
        handle = ClusterHandle(process, answer(process)["address"])
        handle.home = home
        yield handle
        process.stdin.write("quit\n")
        process.stdin.flush()
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "ravan_ray.cli", *args]


def sets(overrides) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def attached_run(cluster: ClusterHandle, overrides, run_dir: Path, cwd: Path) -> subprocess.Popen:
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(cli("run", *sets([*overrides, f"resources.address={cluster.address}"]),
                                "--output", str(run_dir)),
                            cwd=cwd, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def rows_written(run_dir: Path) -> int:
    metrics = run_dir / "metrics.csv"
    return max(0, len(metrics.read_text().splitlines()) - 1) if metrics.exists() else 0


def wait_for_rows(driver: subprocess.Popen, run_dir: Path, rows: int, timeout_s: float = RUN_TIMEOUT_S) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline and driver.poll() is None and rows_written(run_dir) < rows:
        time.sleep(0.2)
    assert driver.poll() is None, f"the run ended before round {rows}: {driver.communicate()[1][-3000:]}"
    assert rows_written(run_dir) >= rows


def finished(driver: subprocess.Popen) -> tuple[str, str]:
    out, err = driver.communicate(timeout=RUN_TIMEOUT_S)
    assert driver.returncode == 0, err[-3000:]
    return out, err


def numbers(run_dir: Path) -> pd.DataFrame:
    frame = pd.read_csv(run_dir / "metrics.csv")
    return frame.drop(columns=[c for c in VOLATILE if c in frame.columns])


@pytest.fixture(scope="module")
def reference(ray_session, tmp_path_factory):
    """The fault-free run of CLUSTER_RUN (with a round count) on one machine, the session's private Ray."""
    from ravan_ray.config import load_config

    made: dict[tuple, Path] = {}

    def run(*extra: str) -> Path:
        if extra not in made:
            made[extra] = tmp_path_factory.mktemp("reference")
            run_federation(load_config(None, [*CLUSTER_RUN, *extra]), made[extra])
        return made[extra]

    return run


# ------------------------------------------------------------------------------------------------ the tests
def test_four_clients_on_three_one_cpu_nodes_run_on_the_three_actors_that_fit_with_one_machines_numbers(
        ray_cluster, reference, tmp_path):
    driver = attached_run(ray_cluster, CLUSTER_RUN, tmp_path / "run", tmp_path)
    finished(driver)
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert list(metrics["clients"]) == [4, 4]
    clients = pd.read_csv(tmp_path / "run" / "clients.csv")
    assert set(clients["status"]) == {"ok"} and clients["pid"].nunique() == 3  # three actors, one per node
    pd.testing.assert_frame_equal(numbers(tmp_path / "run"), numbers(reference()))


def test_a_worker_node_lost_mid_run_costs_no_row_and_the_run_goes_on_with_the_nodes_left(
        ray_cluster, reference, tmp_path):
    # Every client sleeps 1.5 s after training, so the node goes while clients are busy. (on_client_failure=skip
    # on a real cluster: benchmarks/cluster_drill.py's worker_lost_skip.)
    slow = "{" + ", ".join(f"{c}: 1.5" for c in range(8)) + "}"
    overrides = [*CLUSTER_RUN, "federation.rounds=4", "federation.on_client_failure=retry",
                 f"faults.slow_clients={slow}"]
    try:
        driver = attached_run(ray_cluster, overrides, tmp_path / "run", tmp_path)
        wait_for_rows(driver, tmp_path / "run", 1)
        assert ray_cluster.command("remove w3")["ok"]
        _, err = finished(driver)
    finally:
        ray_cluster.ensure("w3")
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert list(metrics["round"]) == [1, 2, 3, 4]
    assert "the run goes on with 2" in err  # said once, in one line
    assert list(metrics["clients"]) == [4, 4, 4, 4]  # every client trained: the fault-free run's very numbers
    pd.testing.assert_frame_equal(numbers(tmp_path / "run"), numbers(reference("federation.rounds=4")))


def test_the_server_node_lost_restores_the_run_from_the_checkpoints_the_driver_wrote_where_it_runs(
        ray_cluster, reference, tmp_path):
    # server_cpus puts the server on a worker node (the head holds no CPU); --output is relative to the driver's
    # working directory, which no node shares.
    overrides = [*CLUSTER_RUN, "federation.rounds=4", "resources.server_cpus=0.5",
                 "faults.slow_clients={0: 1, 1: 1, 2: 1, 3: 1, 4: 1, 5: 1, 6: 1, 7: 1}"]
    try:
        driver = attached_run(ray_cluster, overrides, Path("run"), tmp_path / "laptop")
        wait_for_rows(driver, tmp_path / "laptop" / "run", 2)
        lost = ray_cluster.command("remove-actor -server")
        assert lost["ok"], lost
        finished(driver)
    finally:
        ray_cluster.ensure("w1", "w2", "w3")
    run_dir = tmp_path / "laptop" / "run"
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert list(metrics["round"]) == [1, 2, 3, 4] and metrics["server_restarts"].max() == 1
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["round_00003", "round_00004"]
    assert not (ray_cluster.home / "run").exists()  # nothing written where the server ran
    pd.testing.assert_frame_equal(numbers(run_dir), numbers(reference("federation.rounds=4")))


def test_a_run_killed_on_one_machine_resumes_on_the_cluster_with_other_resources_and_the_same_numbers(
        ray_cluster, reference, tmp_path):
    from ravan_ray.config import load_config

    # clients slowed (1 s each, numbers unchanged) so that the driver is killed with rounds to go
    overrides = [*CLUSTER_RUN, "federation.rounds=4",
                 "faults.slow_clients={0: 1, 1: 1, 2: 1, 3: 1, 4: 1, 5: 1, 6: 1, 7: 1}"]
    run_dir = tmp_path / "run"
    env = {**environment(), "RAY_ADDRESS": ""}
    driver = subprocess.Popen(cli("run", *sets(overrides), "--output", str(run_dir)), env=env,
                              start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_rows(driver, run_dir, 1)
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the private Ray it started
        driver.wait()
    finally:
        subprocess.run(["pkill", "-9", "-s", str(driver.pid)], check=False)
    assert rows_written(run_dir) < 4

    resumed = subprocess.run(cli("resume", str(run_dir), "--set", f"resources.address={ray_cluster.address}",
                                 "--set", "resources.pool_size=2"),
                             env=environment(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    config = load_config(run_dir / "config.yaml")
    assert config.resources.pool_size == 2 and config.resources.address == ray_cluster.address
    assert pd.read_csv(run_dir / "clients.csv").query("round == 4")["pid"].nunique() == 2
    pd.testing.assert_frame_equal(numbers(run_dir), numbers(reference("federation.rounds=4")))


def test_ctrl_c_ends_an_attached_run_within_seconds_keeping_its_finished_rounds(ray_cluster, tmp_path):
    slow = "{" + ", ".join(f"{c}: 3" for c in range(8)) + "}"
    overrides = [*CLUSTER_RUN, "federation.rounds=6", f"faults.slow_clients={slow}"]
    driver = attached_run(ray_cluster, overrides, tmp_path / "run", tmp_path)
    wait_for_rows(driver, tmp_path / "run", 1)
    interrupted_at = time.time()
    driver.send_signal(signal.SIGINT)
    _, err = driver.communicate(timeout=60)
    assert time.time() - interrupted_at < 15
    assert driver.returncode == 130
    assert f"ravan-ray resume {tmp_path / 'run'}" in err.strip().splitlines()[-1]
    kept = rows_written(tmp_path / "run")
    assert 1 <= kept < 6
    assert sorted((tmp_path / "run" / "checkpoints").iterdir())[-1].name == f"round_{kept:05d}"


def test_a_model_directory_only_the_driver_has_reaches_the_actors_on_other_nodes(ray_cluster, tiny, ray_session,
                                                                                tmp_path):
    from ravan_ray.config import load_config

    laptop = tmp_path / "laptop"
    shutil.copytree(tiny / "models" / "bert", laptop / "models" / "bert")  # a relative path no node resolves
    model = ["model.name=models/bert", "model.task=text_classification"]
    driver = attached_run(ray_cluster, [*CLUSTER_RUN, *model], Path("run"), laptop)
    finished(driver)
    assert list((ray_cluster.home / "cache" / "models").iterdir())  # the nodes loaded the copy the driver shipped
    here = tmp_path / "here"
    run_federation(load_config(None, [*CLUSTER_RUN, f"model.name={laptop / 'models' / 'bert'}",
                                      "model.task=text_classification"]), here)
    pd.testing.assert_frame_equal(numbers(laptop / "run"), numbers(here))


def test_this_machine_is_refused_in_one_line_when_it_is_no_node_of_the_cluster(ray_cluster, monkeypatch):
    from ravan_ray import cluster
    from ravan_ray.cluster import ClusterError, check_address

    monkeypatch.setattr(cluster, "local_ip_addresses", lambda: {"203.0.113.9"})  # a laptop outside the cluster
    started = time.time()
    with pytest.raises(ClusterError, match=r"not a node of the Ray cluster.*ray://"):
        check_address(ray_cluster.address)
    assert time.time() - started < 30
