"""Simulated system heterogeneity (ravan_ray/system.py): speeds, availability and deadlines are functions of the
seed, the time model's arithmetic, traces, a client cut short training exactly its first steps, and a run's
simulated columns reproducible and consistent with the plan."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import TINY_INFO, TINY_OVERRIDES
from ravan_ray.cli import main
from ravan_ray.cohort import train_cohort
from ravan_ray.config import ConfigError, load_config
from ravan_ray.methods.base import ClientTask
from ravan_ray.results import TIMING_COLUMNS
from ravan_ray.system import SystemModel
from toys import local_data, one_thread  # noqa: F401  (one_thread: an autouse fixture)


def model(*overrides: str, rows=(100,) * 10) -> SystemModel:
    config = load_config(None, ["federation.num_clients=10", "federation.clients_per_round=4",
                                "federation.batch_size=8", "federation.local_steps=10", *overrides])
    return SystemModel(config, list(rows))


def test_speeds_are_log_normal_from_the_seed_and_one_without_a_spread():
    assert np.array_equal(model().speeds, np.ones(10))
    speeds = model("system.speed_sigma=0.5", "seed=3").speeds
    assert np.array_equal(speeds, model("system.speed_sigma=0.5", "seed=3").speeds)
    assert not np.array_equal(speeds, model("system.speed_sigma=0.5", "seed=4").speeds)
    normal = np.random.default_rng([3, 0x5BEED]).standard_normal(10)
    assert np.allclose(np.log(speeds), 0.5 * normal)


def test_availability_is_drawn_per_client_and_round_whoever_else_was_sampled():
    system = model("system.availability=0.6", rows=(100,) * 10)
    everyone = list(range(10))
    for round_index in range(1, 20):
        online = system.online(round_index, everyone)
        assert online == system.online(round_index, everyone)
        assert system.online(round_index, [2, 5]) == [c for c in (2, 5) if c in online]
    share = np.mean([len(system.online(r, everyone)) / 10 for r in range(1, 400)])
    assert abs(share - 0.6) < 0.03


def test_the_time_model_is_traffic_both_ways_plus_steps_times_rows_over_speed():
    # client 1 has 5 rows (fewer than a batch of 8): a step trains 5 of them
    system = model("system.bandwidth_mbps=8", "system.seconds_per_row=0.01", rows=(100, 5) + (100,) * 8)
    system.speeds[:] = [1.0, 0.5] + [1.0] * 8
    plan = system.plan([0, 1], [0, 1], downlink_bytes=2 * 500_000)  # 500 kB each: 0.5 s down + 0.5 s up at 8 Mbit/s
    assert [c.seconds for c in plan.clients] == pytest.approx([1 + 10 * 8 * 0.01, 1 + 10 * 5 * 0.01 / 0.5])
    assert plan.columns() == {"simulated_round_s": pytest.approx(2.0), "offline_clients": 0, "late_clients": 0}
    assert plan.training == [(0, None), (1, None)] and plan.dropped == 0


def test_a_late_client_is_dropped_or_trains_the_steps_it_finishes_by_the_deadline():
    rows = (100,) * 10
    for late, expected in (("drop", [(0, None)]), ("partial", [(0, None), (1, 4)])):
        system = model("system.deadline_s=1", f"system.late={late}", rows=rows)
        system.speeds[:] = [1.0, 0.35] + [1.0] * 8  # client 1: a step takes 8 x 0.01 / 0.35 = 0.229 s; 4 fit in 1 s
        plan = system.plan([0, 1, 2], [0, 1], downlink_bytes=0)  # client 2 offline
        assert plan.training == expected
        columns = plan.columns()
        assert columns["offline_clients"] == 1 and columns["late_clients"] == 1
        assert plan.dropped == (2 if late == "drop" else 1)
        # the round lasts until the deadline when a late client was dropped; until the partial upload otherwise
        assert columns["simulated_round_s"] == pytest.approx(1.0 if late == "drop" else 4 * 0.08 / 0.35)


def test_a_late_client_with_no_whole_step_before_the_deadline_is_dropped_under_partial_too():
    system = model("system.deadline_s=0.05", "system.late=partial")
    assert model("system.deadline_s=0.05", "system.late=partial").plan([0], [0], 0).training == []
    assert system.plan([0], [0], 0).clients[0].late


def test_traces_give_speeds_and_online_windows(tmp_path):
    speeds = tmp_path / "speeds.csv"
    pd.DataFrame({"client": range(10), "speed": np.linspace(0.5, 2, 10)}).to_csv(speeds, index=False)
    windows = tmp_path / "windows.csv"
    pd.DataFrame({"client": [*range(10), 3], "start": [1] * 10 + [5], "end": [2] * 10 + [6]}).to_csv(windows,
                                                                                                  index=False)
    system = model(f"system.speed_trace={speeds}", f"system.availability_trace={windows}")
    assert np.allclose(system.speeds, np.linspace(0.5, 2, 10))
    assert system.online(2, [1, 3]) == [1, 3] and system.online(3, [1, 3]) == [] and system.online(5, [1, 3]) == [3]


@pytest.mark.parametrize("rows,says", [
    ({"client": range(9), "speed": 1.0}, "lists no row for 1 of the 10 clients (9); list every client"),
    ({"client": range(10), "speed": [0.0] + [1.0] * 9}, "every speed must be > 0"),
    ({"client": range(10), "rate": 1.0}, "needs the columns client, speed"),
    ({"client": [*range(9), 12], "speed": 1.0}, "client ids must be integers 0..9"),
])
def test_a_bad_speed_trace_is_one_line(tmp_path, rows, says):
    path = tmp_path / "speeds.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    with pytest.raises(ConfigError, match=says.replace("(", r"\(").replace(")", r"\)")):
        model(f"system.speed_trace={path}")


def test_two_sources_for_one_setting_are_refused():
    with pytest.raises(ConfigError, match="either system.speed_sigma or system.speed_trace"):
        load_config(None, ["system.speed_sigma=0.5", "system.speed_trace=x.csv"])
    with pytest.raises(ConfigError, match="either system.availability or system.availability_trace"):
        load_config(None, ["system.availability=0.5", "system.availability_trace=x.csv"])


def test_a_bad_trace_through_the_cli_is_one_line_and_exit_code_2_before_anything_loads(tmp_path, capsys):
    trace = tmp_path / "windows.csv"
    pd.DataFrame({"client": range(20), "start": 3, "end": 1}).to_csv(trace, index=False)
    for command in (["--dry-run"], ["--output", str(tmp_path / "run")]):
        assert main(["run", "--set", f"system.availability_trace={trace}", *command]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "a window ends before it starts (line 2)" in err, err
    assert not (tmp_path / "run").exists()
    assert main(["run", "--dry-run", "--set", f"system.speed_trace={tmp_path / 'none.csv'}"]) == 2
    assert f"system.speed_trace {tmp_path / 'none.csv'} does not exist" in capsys.readouterr().err


def test_a_client_cut_short_trains_exactly_the_first_steps_of_its_full_run():
    from ravan_ray.training import ModelHost

    short = ModelHost(load_config(None, [*TINY_OVERRIDES, "federation.local_steps=2", "model.dropout=0"]), TINY_INFO)
    full = ModelHost(load_config(None, [*TINY_OVERRIDES, "federation.local_steps=5", "model.dropout=0"]), TINY_INFO)
    state, data = short.initial_state(), local_data(0, 20)
    expected = short.train_client(ClientTask(0, 1, 1.0, 0), state, None, data)
    cut = full.train_client(ClientTask(0, 1, 1.0, 0, steps=2), state, None, data)
    for key, tensor in expected.tensors.items():
        assert torch.equal(tensor, cut.tensors[key]), key
    assert cut.train_loss == expected.train_loss


def test_a_cohort_with_a_client_cut_short_trains_one_by_one_and_says_so():
    from ravan_ray.training import ModelHost

    host = ModelHost(load_config(None, [*TINY_OVERRIDES, "federation.local_steps=3", "model.dropout=0"]), TINY_INFO)
    state = host.initial_state()
    tasks = [ClientTask(0, 1, 1.0, 0), ClientTask(1, 1, 1.0, 0, steps=1)]
    datas = [local_data(0, 16), local_data(1, 16)]
    notes: list[str] = []
    together = train_cohort(host, tasks, state, [None, None], datas, notes.append)
    alone = [host.train_client(t, state, None, d) for t, d in zip(tasks, datas)]
    assert notes == ["clients cut short by system.deadline_s train one by one, not in cohorts"]
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for a, b in zip(alone, together) for k in a.tensors)


SIMULATED = ("federation.num_clients=8", "federation.clients_per_round=4", "federation.rounds=3",
             "system.speed_sigma=1", "system.availability=0.7", "system.deadline_s=0.15", "system.late=partial",
             "system.bandwidth_mbps=20")


def test_availability_and_deadlines_are_reproducible_and_visible_in_metrics(ray_session, tiny_config, tmp_path):
    from ravan_ray.federation import prepare_data, round_clients, run_federation

    config = tiny_config(*SIMULATED)
    for name in ("a", "b"):
        run_federation(config, tmp_path / name)
    first, second = (pd.read_csv(tmp_path / name / "metrics.csv").drop(columns=list(TIMING_COLUMNS))
                     for name in ("a", "b"))
    pd.testing.assert_frame_equal(first, second)
    assert {"simulated_round_s", "offline_clients", "late_clients"} <= set(first.columns)

    # the columns are the plan's: recomputed here from the config alone
    system = SystemModel(config, [len(rows) for rows in prepare_data(config).partitions])
    clients = pd.read_csv(tmp_path / "a" / "clients.csv")
    for row in first.itertuples():
        sampled = round_clients(config, row.round)
        online = system.online(row.round, sampled)
        plan = system.plan(sampled, online, row.downlink_bytes)
        assert plan.columns() == {"simulated_round_s": pytest.approx(row.simulated_round_s),
                                  "offline_clients": row.offline_clients, "late_clients": row.late_clients}
        assert row.dropped_clients == plan.dropped and row.clients == len(plan.training)
        ran = clients[(clients["round"] == row.round) & (clients["status"] == "ok")]
        assert sorted(ran["client"]) == [c for c, _ in plan.training]
    assert first["offline_clients"].sum() > 0 and first["late_clients"].sum() > 0  # this seed exercises both
    # (a run without system settings writes metrics.csv's columns as before: tests/test_behaviour_identity.py)
