"""On a real Ray cluster: a sweep submitted as a Ray job to a `ray start --head`, and a sweep whose trial
spans two nodes.

Both tests start their own Ray, separate from the session's: the head on its own free ports and temp dir
(stopped by killing exactly the processes it started, never with `ray stop`, which would stop every Ray on
the machine), the two-node cluster in a subprocess (ray.cluster_utils.Cluster and the session's
ray.init cannot share a process).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from processes import alive, processes_of, stop_group  # noqa: E402  (shared with benchmarks/cluster_drill.py)

SMOKE = ROOT / "tune_configs" / "smoke.yaml"
BIN = Path(sys.executable).parent
JOB_TIMEOUT_S = 300


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def cluster_env() -> dict[str, str]:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    return env


def wait_for_dashboard(url: str, head: subprocess.Popen, log: Path, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if head.poll() is not None:
            pytest.fail(f"ray start --head exited with {head.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answers (a head with token auth answers 401 without the token)
        except OSError:
            pass
        time.sleep(1)
    pytest.fail(f"the head's dashboard did not come up at {url}:\n{log.read_text()[-3000:]}")


# ------------------------------------------------------------------------------------------------ the tests
def test_smoke_sweep_submitted_as_a_ray_job_succeeds(tmp_path):
    gcs, dashboard, client, agent_http, agent_grpc, runtime_env, metrics, node_manager, object_manager = free_ports(9)
    temp_dir = tempfile.mkdtemp(prefix="rrc", dir="/tmp")  # short: Ray's socket paths have a length limit
    log = tmp_path / "head.log"
    env = cluster_env()
    url = f"http://127.0.0.1:{dashboard}"
    with open(log, "w") as handle:
        head = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
             f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
             f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
             f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
             f"--temp-dir={temp_dir}", "--num-cpus=3", "--num-gpus=0", "--disable-usage-stats"],
            env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path)
    try:
        wait_for_dashboard(url, head, log)
        out = tmp_path / "smoke_sweep"
        submission = f"ravan-smoke-{os.getpid()}"
        submit = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", url, "--submission-id", submission,
             "--working-dir", str(ROOT),
             "--runtime-env-json", json.dumps({"excludes": [".git", "runs", ".venv", "benchmarks/out"]}),
             "--", "ravan-ray", "sweep", "tune_configs/smoke.yaml", "--output", str(out)],
            env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S, cwd=ROOT)
        logs = (submit.stdout + submit.stderr)[-4000:]
        assert submit.returncode == 0, logs
        status = subprocess.run([str(BIN / "ray"), "job", "status", "--address", url, submission],
                                env=env, capture_output=True, text=True, timeout=60)
        assert "succeeded" in (status.stdout + status.stderr).lower(), status.stdout + status.stderr

        table = pd.read_csv(out / "results.csv")
        assert len(table) == 2 and set(table["status"]) == {"TERMINATED"}, logs
        for run_dir in table["run_dir"]:
            assert list(pd.read_csv(Path(run_dir) / "metrics.csv")["round"]) == [1, 2]
    finally:
        stop_group(head)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not any(alive(pid, started) for pid, started in processes_of(head.pid).items() if pid != head.pid)


TWO_NODE_SCRIPT = r"""
import json, logging, sys
from pathlib import Path

import ray
import ray._private.utils
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

from ravan_ray.sweep import run_sweep

# Cluster() records its address in /tmp/ray for ray.init("auto"); other Rays on this machine may read it.
ray._private.utils.write_ray_address = lambda *args, **kwargs: None
temp_dir, tune_config, out, dashboard_port, agent_port = sys.argv[1:]
# The nodes take the machine's default node IP: a driver given 127.0.0.1 would have it rewritten to that IP
# by ray.init. Node A fits the trial's driver (1.5 CPU) and one client actor (1 CPU), node B one client actor: the
# trial's placement group has to span both nodes.
cluster = Cluster(initialize_head=True, head_node_args={
    "num_cpus": 3, "resources": {"node_a": 1}, "temp_dir": temp_dir,
    "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": int(dashboard_port),
    "dashboard_agent_listen_port": int(agent_port)})
cluster.add_node(num_cpus=1, resources={"node_b": 1}, temp_dir=temp_dir)
cluster.wait_for_nodes()
ray.init(address=cluster.address, logging_level=logging.WARNING, log_to_driver=False)
try:
    results = run_sweep(tune_config, output=out)
    names = {n["NodeID"]: ("node_a" if "node_a" in n["Resources"] else "node_b") for n in ray.nodes()}
    actors = [a for a in list_actors(address=f"http://127.0.0.1:{dashboard_port}", detail=True, limit=1000)
              if a.class_name in ("ClientActor", "ParameterServer")]
    clients = [a for a in actors if a.class_name == "ClientActor"]
    print("RESULT " + json.dumps({"results": str(results),
                                  "client_nodes": sorted(names.get(a.node_id, a.node_id) for a in clients),
                                  "placement_groups": sorted({str(a.placement_group_id) for a in actors})}))
finally:
    ray.shutdown()
    cluster.shutdown()
"""


def test_a_trial_spreads_its_client_actors_over_two_nodes_and_stays_exact(tmp_path):
    import yaml

    values = yaml.safe_load(SMOKE.read_text())
    values.update(name="two_nodes", search_space={}, driver_cpus=1.5, placement_strategy="SPREAD")
    values["base"]["resources"] = {"cpus_per_client": 1, "pool_size": 2}
    tune_config = tmp_path / "two_nodes.yaml"
    tune_config.write_text(yaml.safe_dump(values))
    script = tmp_path / "two_nodes.py"
    script.write_text(TWO_NODE_SCRIPT)
    temp_dir = tempfile.mkdtemp(prefix="rrc", dir="/tmp")
    dashboard, agent = free_ports(2)
    try:
        done = subprocess.run([sys.executable, str(script), temp_dir, str(tune_config), str(tmp_path / "out"),
                               str(dashboard), str(agent)],
                              env=cluster_env(), capture_output=True, text=True, timeout=JOB_TIMEOUT_S, cwd=ROOT)
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, (done.stdout + done.stderr)[-4000:]
    result = json.loads(lines[-1][len("RESULT "):])

    assert result["client_nodes"] == ["node_a", "node_b"]
    # the server and both clients ran inside the one placement group Tune made for the trial
    assert len(result["placement_groups"]) == 1 and result["placement_groups"][0] not in ("None", "")
    table = pd.read_csv(result["results"])
    assert list(table["status"]) == ["TERMINATED"]
    metrics = pd.read_csv(Path(table["run_dir"][0]) / "metrics.csv")
    assert list(metrics["round"]) == [1, 2]
    assert metrics["test_accuracy"].notna().all()
    assert (metrics["agg_error"].abs() < 1e-4).all()  # Ravan's aggregation is exact wherever clients ran
