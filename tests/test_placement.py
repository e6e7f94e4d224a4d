"""What a cluster's nodes hold (client actors sized per node, not to the cluster's sum), addresses that cannot work
(one line within seconds), the private Ray a command starts whatever cluster the machine last knew, and errors
raised inside actors as one line."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import shutil

import pytest
from hypothesis import given, settings, strategies as st

from ravan_ray.cli import error_line
from ravan_ray.cluster import ClusterError, check_address, copies_that_fit, plan_actors, remote_error_line

from conftest import TINY_OVERRIDES


# ------------------------------------------------------------------------------------------------ planning
def test_four_one_cpu_actors_on_three_one_cpu_nodes_are_three_not_four_of_three_quarters():
    plan = plan_actors([{"CPU": 1.0}] * 3, cpus=1.0, gpus=0.0, wanted=4, can_share_cores=True)
    assert (plan.size, plan.cpus) == (3, 1.0)


def test_on_one_machine_the_pool_still_grows_to_share_the_cores():
    plan = plan_actors([{"CPU": 2.0}], cpus=1.0, gpus=0.0, wanted=3, can_share_cores=True)
    assert plan.size == 3 and plan.cpus == pytest.approx(2 / 3)


def test_gpu_shares_limit_the_pool_as_cpus_do():
    plan = plan_actors([{"CPU": 16.0, "GPU": 1.0}, {"CPU": 16.0, "GPU": 1.0}], cpus=1.0, gpus=0.4, wanted=8,
                       can_share_cores=False)
    assert plan.size == 4  # two 0.4-GPU actors per 1-GPU node


def test_an_actor_no_node_can_hold_is_refused_naming_what_it_needs_and_the_largest_node():
    with pytest.raises(ClusterError, match=r"needs 4 CPU, 0 GPU but the largest node has 2 CPU, 0 GPU"):
        plan_actors([{"CPU": 2.0}, {"CPU": 1.0}], cpus=4.0, gpus=0.0, wanted=3, can_share_cores=False)


def test_the_server_is_placed_before_the_actors_are_counted():
    plan = plan_actors([{"CPU": 1.0}, {"CPU": 1.0}], cpus=1.0, gpus=0.0, wanted=2, can_share_cores=False,
                       server={"CPU": 0.5})
    assert plan.size == 1
    with pytest.raises(ClusterError, match="parameter server needs 2 CPU"):
        plan_actors([{"CPU": 1.0}], cpus=1.0, gpus=0.0, wanted=2, can_share_cores=False, server={"CPU": 2.0})


nodes = st.lists(st.fixed_dictionaries({"CPU": st.sampled_from([0.0, 1.0, 2.0, 3.0, 4.0, 8.0]),
                                        "GPU": st.sampled_from([0.0, 1.0, 2.0])}), min_size=1, max_size=5)


@settings(max_examples=300, deadline=None)
@given(nodes=nodes, cpus=st.sampled_from([0.25, 0.5, 1.0, 2.0]), gpus=st.sampled_from([0.0, 0.25, 0.5, 1.0]),
       wanted=st.integers(1, 12), share=st.booleans())
def test_every_planned_actor_fits_some_node_at_once(nodes, cpus, gpus, wanted, share):
    try:
        plan = plan_actors(nodes, cpus, gpus, wanted, share)
    except ClusterError:
        assert sum(copies_that_fit(n, {"CPU": cpus, "GPU": gpus}) for n in nodes) == 0
        return
    assert 1 <= plan.size <= wanted
    # first-fit on the nodes, as Ray places equal reservations: every actor finds room
    left = [dict(n) for n in nodes]
    for _ in range(plan.size):
        node = next((n for n in left if n["CPU"] >= plan.cpus - 1e-9 and n["GPU"] >= plan.gpus - 1e-9), None)
        assert node is not None
        node["CPU"] -= plan.cpus
        node["GPU"] -= plan.gpus
    # and nothing fitted was left out: as many as the nodes hold of the share asked, up to what was wanted
    assert plan.size >= min(wanted, sum(copies_that_fit(n, {"CPU": cpus, "GPU": gpus}) for n in nodes))


# ------------------------------------------------------------------------------------------------ addresses
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("scheme", ["", "ray://"])
def test_an_address_that_does_not_answer_is_one_line_within_seconds(tmp_path, scheme):
    address = f"{scheme}127.0.0.1:{free_port()}"
    started = time.time()
    args = [arg for o in [*TINY_OVERRIDES, f"resources.address={address}"] for arg in ("--set", o)]
    # its own process: a command inside a Ray already started (this test session's) keeps that Ray
    done = subprocess.run([sys.executable, "-m", "ravan_ray.cli", "run", *args, "--output", str(tmp_path / "run")],
                          env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2
    err = done.stderr.strip()
    assert len(err.splitlines()) == 1 and "does not answer" in err and address in err, err
    assert time.time() - started < 30
    assert not (tmp_path / "run" / "metrics.csv").exists()


def test_without_an_address_a_run_starts_its_own_ray_even_when_the_machine_last_knew_a_dead_cluster(tmp_path):
    temp_dir = tempfile.mkdtemp(prefix="rrd", dir="/tmp")  # short: Ray's socket paths have a length limit
    try:
        # What a head started with `ray start` and killed without cleaning up leaves behind.
        with open(os.path.join(temp_dir, "ray_current_cluster"), "w") as handle:
            handle.write(f"127.0.0.1:{free_port()}")
        env = {**os.environ, "RAY_TMPDIR": temp_dir, "TQDM_DISABLE": "1"}
        env.pop("RAY_ADDRESS", None)
        args = [arg for o in [*TINY_OVERRIDES, "federation.rounds=1"] for arg in ("--set", o)]
        started = time.time()
        done = subprocess.run([sys.executable, "-m", "ravan_ray.cli", "run", *args, "--output", str(tmp_path / "run"),
                               "--quiet"], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "Failed to connect to GCS" not in done.stderr
        assert json.loads((tmp_path / "run" / "summary.json").read_text())["rounds"] == 1
        assert time.time() - started < 240
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_an_answering_port_that_is_a_ray_client_server_passes_the_check(tmp_path):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        # Ray Client does its own handshake: an answering port is all the check asks of a ray:// address
        assert check_address(f"ray://127.0.0.1:{listener.getsockname()[1]}") is None


def test_a_gcs_address_with_no_port_number_is_one_line():
    with pytest.raises(ClusterError, match="not HOST:PORT"):
        check_address("head:gcs")


# ------------------------------------------------------------------------------------------------ remote errors
class BadModel(ValueError):
    pass


def test_an_error_raised_in_an_actor_constructor_is_one_line_whatever_its_name(ray_session):
    import ray

    from ravan_ray.models import ModelError

    @ray.remote
    class Broken:
        def __init__(self, error):
            raise error

        def ping(self):
            return True

    for error, expected in ((ModelError("model.name 'models/x' could not be loaded"), "model.name 'models/x' could "
                             "not be loaded"), (ZeroDivisionError("division by zero"),
                                                "ZeroDivisionError: division by zero")):
        actor = Broken.remote(error)
        with pytest.raises(ray.exceptions.RayActorError) as caught:
            ray.get(actor.ping.remote())
        line = remote_error_line(caught.value, where=True)
        assert line.endswith(expected) and " on node " in line and "\n" not in line
        assert error_line(caught.value) == expected


def test_an_error_raised_in_a_task_is_one_line_with_its_message(ray_session):
    import ray

    @ray.remote
    def fails():
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(ray.exceptions.RayTaskError) as caught:
        ray.get(fails.remote())
    assert error_line(caught.value) == "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"


def test_a_remote_traceback_with_a_dotted_exception_name_gives_its_message():
    text = ("The actor died because of an error raised in its creation task, ray::ClientActor.__init__() "
            "(pid=12, ip=10.0.0.3, actor_id=ab)\n  File \"/x/actors/client.py\", line 3, in __init__\n"
            "    self.host = ModelHost(...)\n  File \"/x/ravan_ray/models.py\", line 9, in load\n"
            "    raise ModelError(msg)\nravan_ray.models.ModelError: model.name 'm' could not be loaded: no config.json\n")

    class Died(Exception):
        error_msg = text

    assert remote_error_line(Died(text), where=True) == \
        " on node 10.0.0.3: model.name 'm' could not be loaded: no config.json"
