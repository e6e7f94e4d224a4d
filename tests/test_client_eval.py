"""Per-client evaluation (federation.client_eval, ravan_ray/client_eval.py): the held-out split of each client's
rows, the statistics over clients, and a run's per-client metrics equal to evaluating the global model directly on
one client's held-out rows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ravan_ray.cli import main
from ravan_ray.client_eval import hold_out, summarize
from ravan_ray.data import DataError


def test_hold_out_takes_a_seeded_share_of_each_clients_rows_and_keeps_the_rest_for_training():
    parts = [np.arange(0, 10), np.arange(10, 13), np.arange(13, 113)]
    train, test = hold_out(parts, 0.2, seed=5)
    assert [len(t) for t in test] == [2, 1, 20]  # round(0.2 n), at least one
    for rows, kept, held in zip(parts, train, test):
        assert sorted([*kept, *held]) == rows.tolist() and not set(kept) & set(held)
        assert np.all(np.diff(kept) > 0) and np.all(np.diff(held) > 0)
    again, other = hold_out(parts, 0.2, seed=5)[1], hold_out(parts, 0.2, seed=6)[1]
    assert all(np.array_equal(a, b) for a, b in zip(test, again))
    assert any(not np.array_equal(a, b) for a, b in zip(test, other))


def test_hold_out_leaves_every_client_a_training_row():
    train, test = hold_out([np.arange(2), np.arange(2, 12)], 0.9, seed=0)
    assert [len(t) for t in train] == [1, 1] and [len(t) for t in test] == [1, 9]


def test_a_client_with_one_row_cannot_be_split_and_the_message_says_what_to_set():
    with pytest.raises(DataError, match=r"clients 1 have fewer than 2; use data.partition.min_size >= 2"):
        hold_out([np.arange(5), np.array([7])], 0.2, seed=0)


def test_the_statistics_are_the_mean_the_worst_tenth_and_the_spread_over_clients():
    accuracies = [{"test_accuracy": a} for a in np.linspace(0.0, 1.0, 11)]
    assert summarize(accuracies, "test_accuracy", "max") == pytest.approx(
        {"client_test_accuracy_mean": 0.5, "client_test_accuracy_p10": 0.1,
         "client_test_accuracy_std": np.std(np.linspace(0, 1, 11))})
    # lower is better (a loss): the worst tenth is the top of the distribution
    assert summarize(accuracies, "test_accuracy", "min")["client_test_accuracy_p10"] == pytest.approx(0.9)


def test_per_client_metrics_equal_a_direct_evaluation_on_one_clients_rows(ray_session, tiny_config, tmp_path):
    from ravan_ray.checkpoints import latest_checkpoint, load_checkpoint
    from ravan_ray.federation import prepare_data, run_federation
    from ravan_ray.training import ModelHost

    config = tiny_config("federation.client_eval=true", "data.client_test_fraction=0.25", "federation.eval_every=2")
    run_federation(config, tmp_path)
    per_client = pd.read_csv(tmp_path / "client_metrics.csv")
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    assert per_client["round"].unique().tolist() == [2]  # every evaluation round, every client
    assert sorted(per_client["client"]) == list(range(config.federation.num_clients))

    data = prepare_data(config)
    for rows, held in zip(data.partitions, data.client_test):
        assert not set(rows.tolist()) & set(held.tolist())  # held-out rows are not trained on
    state, _, _ = load_checkpoint(latest_checkpoint(tmp_path))
    host = ModelHost(config, data.task_info)
    for client in (0, 4):
        rows = data.client_test[client]
        direct = host.evaluate(state, {k: v[rows] for k, v in data.train.items()}, 256)
        recorded = per_client[per_client["client"] == client].iloc[0]
        assert recorded["rows"] == len(rows)
        assert recorded["test_accuracy"] == pytest.approx(direct["test_accuracy"])
        assert recorded["test_loss"] == pytest.approx(direct["test_loss"], rel=1e-5)
    last = metrics[metrics["round"] == 2].iloc[0]
    expected = summarize(per_client.to_dict("records"), "test_accuracy", "max")
    assert {k: last[k] for k in expected} == pytest.approx(expected)


def test_client_eval_on_a_task_that_cannot_evaluate_training_rows_is_one_line_and_exit_code_2(capsys):
    assert main(["run", "--dry-run", "--set", "federation.client_eval=true", "--set", "model.task=causal_lm",
                 "--set", "data.name=banking77-instruct"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "federation.client_eval needs a task whose training rows it can evaluate" \
        in err, err


def test_a_run_resumed_from_an_earlier_round_repeats_its_per_client_and_simulated_numbers(ray_session, tiny_config,
                                                                                          tmp_path):
    """Per-client metrics, availability and deadlines are functions of (config, seed): playing rounds 2-3 again from
    round 1's checkpoint rewrites metrics.csv, clients.csv and client_metrics.csv with the same numbers."""
    from ravan_ray.federation import run_federation
    from ravan_ray.results import TIMING_COLUMNS

    config = tiny_config("federation.rounds=3", "output.keep_checkpoints=3", "federation.client_eval=true",
                         "system.speed_sigma=1",
                         "system.availability=0.7", "system.deadline_s=0.15", "system.late=partial")
    run_federation(config, tmp_path)
    first = {name: pd.read_csv(tmp_path / name) for name in ("metrics.csv", "client_metrics.csv", "clients.csv")}
    run_federation(config, tmp_path, resume=True, from_round=1)
    volatile = {"metrics.csv": list(TIMING_COLUMNS), "client_metrics.csv": ["eval_s"],
                "clients.csv": ["seconds", "started", "finished", "pid", "gpu_ids"]}
    for name, frame in first.items():
        again = pd.read_csv(tmp_path / name)
        pd.testing.assert_frame_equal(frame.drop(columns=volatile[name]), again.drop(columns=volatile[name]))
    assert sorted(first["client_metrics.csv"]["round"].unique()) == [1, 2, 3]
