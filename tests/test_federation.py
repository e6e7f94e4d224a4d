"""End to end: the federated loop on Ray with a tiny BERT, 2 rounds, against the run-directory contract."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_INFO
from ravan_ray.config import load_config
from ravan_ray.federation import run_federation
from ravan_ray.results import TIMING_COLUMNS, read_metrics

CONTRACT_COLUMNS = {"round", "wall_s", "train_loss", "test_accuracy", "uplink_bytes", "downlink_bytes",
                    "agg_error", "effective_rank", "clients", "heads_trained"}
SUMMARY_KEYS = {"method", "final_test_accuracy", "best_test_accuracy", "rounds", "total_uplink_bytes",
                "total_downlink_bytes", "wall_s"}


def deterministic_columns(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.drop(columns=list(TIMING_COLUMNS))


def test_run_directory_matches_the_design_contract(ray_session, tiny_config, tmp_path, capfd, monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)  # as in a Ray job: no terminal, so no progress bar
    config = tiny_config("federation.eval_every=2")
    summary = run_federation(config, tmp_path)
    # ... and one line per round on stderr instead
    assert [line for line in capfd.readouterr().err.splitlines() if line.startswith("ravan round ")][-1] \
        .startswith("ravan round 2/2 loss ")

    metrics = pd.read_csv(tmp_path / "metrics.csv")
    assert CONTRACT_COLUMNS <= set(metrics.columns)
    assert list(metrics["round"]) == [1, 2]
    assert math.isnan(metrics.loc[0, "test_accuracy"]) and 0 <= metrics.loc[1, "test_accuracy"] <= 1
    assert (metrics["clients"] == 3).all()
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(on_disk) and on_disk["rounds"] == 2 == summary["rounds"]
    assert on_disk["total_uplink_bytes"] == metrics["uplink_bytes"].sum()
    assert "rank_per_head" in (tmp_path / "config.yaml").read_text()
    assert load_config(tmp_path / "config.yaml") == config  # a run's config.yaml runs again as it is
    state = load_file(str(tmp_path / "checkpoints" / "round_00002" / "state.safetensors"))
    assert any(key.endswith("/cores") for key in state)
    assert len(pd.read_csv(tmp_path / "label_histogram.csv")) == config.federation.num_clients
    assert len(pd.read_csv(tmp_path / "clients.csv")) == 2 * config.federation.clients_per_round


def test_uplink_is_selected_heads_times_layers_times_rank_squared(ray_session, tiny_config, tmp_path):
    config = tiny_config("model.train_head=false", "compute.distribution=uniform", "method.heads=4")
    run_federation(config, tmp_path)
    budgets = pd.read_csv(tmp_path / "client_budgets.csv").set_index("client")
    clients = pd.read_csv(tmp_path / "clients.csv")
    ranks = __import__("yaml").safe_load((tmp_path / "config.yaml").read_text())["resolved"]["method"]["rank_per_head"]
    layers, rank = len(ranks), next(iter(ranks.values()))
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    for round_index, sampled in clients.groupby("round"):
        expected = sum(budgets.loc[c, "heads"] * layers * rank * rank * 4 for c in sampled["client"])
        assert metrics.set_index("round").loc[round_index, "uplink_bytes"] == expected
    assert budgets["heads"].nunique() > 1  # the mix really was heterogeneous


def test_ravan_aggregation_error_is_zero_when_every_client_trains_every_head(ray_session, tiny_config, tmp_path):
    run_federation(tiny_config(), tmp_path)
    metrics = read_metrics(tmp_path / "metrics.csv")
    assert all(row["agg_error"] < 1e-5 for row in metrics)
    assert all(row["effective_rank"] > 1 for row in metrics)


def test_pool_and_per_client_modes_with_and_without_overlapped_evaluation_write_identical_metrics(
        ray_session, tiny_config, tmp_path):
    # Each setting differs from the first in one factor (actor mode, or when evaluation runs): three runs show
    # that neither changes the metrics, as a fourth (per_client, between rounds) would only repeat.
    settings = {"pool_overlap": ("resources.actor_mode=pool", "resources.pool_size=2"),
                "pool_between_rounds": ("resources.actor_mode=pool", "resources.pool_size=2",
                                        "federation.overlap_evaluation=false"),
                "per_client_overlap": ("resources.actor_mode=per_client",)}
    for name, overrides in settings.items():
        run_federation(tiny_config(*overrides), tmp_path / name)
    first, *others = (deterministic_columns(pd.read_csv(tmp_path / name / "metrics.csv")) for name in settings)
    assert list(first["round"]) == [1, 2] and first["test_accuracy"].notna().all()
    for other in others:
        pd.testing.assert_frame_equal(first, other)
    per_client_pids = pd.read_csv(tmp_path / "per_client_overlap" / "clients.csv").groupby("client")["pid"].nunique()
    assert (per_client_pids == 1).all()  # one long-lived actor per client


@pytest.mark.parametrize("cores,per_round,expected", [(2, 3, 3), (2, 2, 2), (2, 5, 3), (4, 7, 7), (4, 9, 5),
                                                      (2, 1, 1), (8, 3, 3), (2, 4, 2)])
def test_auto_pool_grows_until_the_last_wave_of_clients_fills_the_cores(ray_session, tiny_config, cores, per_round,
                                                                        expected):
    from actors import ClientFleet

    config = tiny_config("resources.pool_size=null", "resources.cpus_per_client=1", "federation.num_clients=10",
                         f"federation.clients_per_round={per_round}")
    fleet = ClientFleet(config, TINY_INFO, None, [], nodes=[{"CPU": cores}])
    assert fleet.size == expected
    waves = [min(fleet.size, per_round - start) for start in range(0, per_round, fleet.size)]
    assert all(wave >= min(cores, per_round) for wave in waves)  # no wave leaves a core idle
    assert fleet.size * fleet.plan.cpus <= cores + 1e-9  # the reservation still fits the machine


def test_multithreaded_or_gpu_client_actors_keep_one_actor_per_share(ray_session, tiny_config):
    from actors import ClientFleet

    for share in ("resources.cpus_per_client=2", "resources.gpus_per_client=0.5"):
        config = tiny_config("resources.pool_size=null", share, "federation.clients_per_round=3")
        fleet = ClientFleet(config, TINY_INFO, None, [], nodes=[{"CPU": 4, "GPU": 1}])
        res = config.resources
        gpu_fit = int(1 // res.gpus_per_client) if res.gpus_per_client else 3
        assert fleet.size == min(3, int(4 // res.cpus_per_client), gpu_fit)


def test_the_fleet_starts_the_actors_the_first_rounds_clients_will_run_on(ray_session, tiny_config):
    from actors import ClientFleet

    first_round = [1, 4, 5]
    for overrides, slots in ((("resources.actor_mode=per_client",), {1, 4, 5}),  # each client's own actor
                             (("resources.pool_size=2",), {0, 1})):  # the pool's slots by position, 1 of them twice
        fleet = ClientFleet(tiny_config(*overrides), TINY_INFO, None, [], nodes=[{"CPU": 4}])
        try:
            fleet.start(first_round)
            assert set(fleet.actors) == slots
        finally:
            fleet.shutdown()


def test_actors_on_shared_frozen_weights_write_the_same_metrics_as_actors_with_their_own(ray_session, tiny_config,
                                                                                        tmp_path):
    for method in ("ravan", "full_ft"):
        # One round: a client that wrote to a shared page would show in round 1's update already.
        run_federation(tiny_config(f"method.name={method}", "resources.share_frozen_weights=true", "federation.rounds=1"),
                       tmp_path / f"{method}_shared")
        run_federation(tiny_config(f"method.name={method}", "resources.share_frozen_weights=false", "federation.rounds=1"),
                       tmp_path / f"{method}_own")
        shared, own = (deterministic_columns(pd.read_csv(tmp_path / f"{method}_{kind}" / "metrics.csv"))
                       for kind in ("shared", "own"))
        pd.testing.assert_frame_equal(shared, own)


def test_four_client_actors_are_alive_together_on_one_logical_gpu_at_a_quarter_each(ray_session, tiny_config, tmp_path):
    import ray

    config = tiny_config("resources.actor_mode=per_client", "resources.gpus_per_client=0.25",
                         "resources.cpus_per_client=0.25", "federation.num_clients=4",
                         "federation.clients_per_round=4", "federation.rounds=1", "federation.local_steps=40")
    free_gpu_during_round = []

    def record_free_gpu(row, checkpoint):  # called while the four client actors are still alive
        free_gpu_during_round.append(ray.available_resources().get("GPU", 0.0))

    run_federation(config, tmp_path, on_round=record_free_gpu)
    assert ray.cluster_resources()["GPU"] == 1 and free_gpu_during_round == [0.0]
    clients = pd.read_csv(tmp_path / "clients.csv")
    assert clients["pid"].nunique() == 4
    assert set(clients["gpu_ids"].astype(str)) == {"0"}  # all four on the one logical GPU


def test_ravan_under_budget_mix_trains_fewer_heads_on_weak_clients(ray_session, tiny_config, tmp_path):
    config = tiny_config("compute.distribution=skewed_right", "method.heads=4", "method.scoring=gradient")
    run_federation(config, tmp_path)
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    assert (metrics["heads_trained"] < 4).any()
    assert metrics["test_accuracy"].notna().all()


def test_actors_waiting_for_a_node_that_went_down_are_given_up_within_seconds_not_at_the_deadline(
        ray_session, tiny_config, monkeypatch):
    """A node killed outright is counted alive until Ray's health checks give up on it, so a replacement created
    then is placed nowhere: the fleet sees the live nodes shrink below its actors and gives those up."""
    import time

    from actors import ClientFleet
    from actors import client as client_module
    from ravan_ray.cluster import ClusterError, Deadline
    from ravan_ray.methods.base import ClientTask

    config = tiny_config("resources.pool_size=2", "resources.cpus_per_client=8", "federation.num_clients=4",
                         "federation.clients_per_round=2")
    fleet = ClientFleet(config, TINY_INFO, None, [], nodes=[{"CPU": 16}])
    # the node that holds the two 8-CPU actors is still listed when they are created, gone a moment later (the
    # test session's Ray has 4 CPUs: the actors stay pending, as on a node that is dead but not yet known dead)
    nodes = iter([[{"CPU": 16}]])
    monkeypatch.setattr(client_module, "live_nodes", lambda: next(nodes, []))
    monkeypatch.setattr(client_module, "PLACEMENT_CHECK_S", 0.5)
    started = time.monotonic()
    with pytest.raises(ClusterError, match="lost with their node cannot be replaced"):
        fleet.ready({0: [ClientTask(0, 1, 1.0, 0)], 1: [ClientTask(1, 1, 1.0, 0)]}, Deadline(120))
    assert time.monotonic() - started < 30
    assert not fleet.actors  # both given up (and killed)
