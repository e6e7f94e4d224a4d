"""The validation split: held out from the training rows before partitioning (seeded by the run seed),
prepared and evaluated exactly as the test split, written as val_* metrics; the test split never moves."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from ravan_ray.checkpoints import latest_checkpoint, load_checkpoint
from ravan_ray.cli import main
from ravan_ray.config import load_config
from ravan_ray.data import load_splits
from ravan_ray.federation import prepare_data, run_federation
from ravan_ray.tasks import task_class
from ravan_ray.training import ModelHost

from test_tasks import COMMON, TASKS, task_overrides


def synthetic_splits(seed: int, *overrides: str):
    config = load_config(None, ["data.name=synthetic", "data.max_train_samples=400", f"seed={seed}", *overrides])
    return load_splits(config.data, config.seed, config.data.label_field)


def test_the_held_out_rows_leave_training_are_seeded_by_the_run_seed_and_leave_test_alone():
    plain = synthetic_splits(0)
    held = synthetic_splits(0, "data.validation_fraction=0.25")
    assert plain.validation is None
    assert held.validation.num_rows == 100 and held.train.num_rows == 300
    # the held-out rows and the rows that stay are exactly the training rows of the run without a split
    def texts(splits, split):
        return splits.column(split, "text")

    together = sorted(texts(held, "train") + texts(held, "validation"))
    assert together == sorted(texts(plain, "train"))
    assert not set(texts(held, "train")) & set(texts(held, "validation"))
    assert texts(held, "test") == texts(plain, "test")
    again, other_seed = synthetic_splits(0, "data.validation_fraction=0.25"), synthetic_splits(1, "data.validation_fraction=0.25")
    assert texts(again, "validation") == texts(held, "validation")
    assert texts(other_seed, "validation") != texts(held, "validation")


@pytest.mark.parametrize("task", TASKS)
def test_each_task_prepares_validation_as_test_and_test_is_unchanged(tiny, task):
    sets = [*COMMON, *task_overrides(tiny, task)]
    plain = prepare_data(load_config(None, sets))
    held = prepare_data(load_config(None, [*sets, "data.validation_fraction=0.25"]))
    assert plain.validation is None
    assert set(held.validation) == set(held.test)  # evaluate reads it the same way
    assert held.task_info == plain.task_info  # e.g. generation length: from test alone
    for key, array in plain.test.items():
        assert np.array_equal(held.test[key], array), key
    rows = sum(len(p) for p in held.partitions)
    assert rows < sum(len(p) for p in plain.partitions)  # the held-out rows are no client's


def test_a_validation_split_named_by_the_source_is_read_from_its_file(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for split, n in (("train", 30), ("test", 10), ("dev", 7)):
        pd.DataFrame({"text": [f"{split} {i}" for i in range(n)], "label": [i % 2 for i in range(n)]}) \
            .to_json(data / f"{split}.jsonl", orient="records", lines=True)
    config = load_config(None, [f"data.path={data}", "data.validation_split=dev"])
    splits = load_splits(config.data, config.seed)
    assert splits.validation.num_rows == 7 and splits.train.num_rows == 30 and splits.test.num_rows == 10


@pytest.mark.parametrize("sets, message", [
    (["data.validation_fraction=0.1", "data.validation_split=dev"], "set either data.validation_fraction or"),
    (["data.validation_fraction=1.5"], "data.validation_fraction"),
])
def test_validation_config_mistakes_exit_2_with_one_line(sets, message, capsys):
    assert main(["run", *[a for s in sets for a in ("--set", s)], "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_the_server_writes_val_metrics_equal_to_the_tasks_evaluate_on_the_held_out_rows(ray_session, tiny_config,
                                                                                        tmp_path):
    config = tiny_config("data.validation_fraction=0.2", "federation.rounds=1")
    run_federation(config, tmp_path / "run")
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    task_metrics = task_class(config.model.task).metrics
    for name in task_metrics:
        assert f"val_{name.removeprefix('test_')}" in metrics.columns
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["final_val_accuracy"] == metrics["val_accuracy"].iloc[-1]

    data = prepare_data(config)
    state, _, _ = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    host = ModelHost(config, data.task_info)
    expected = host.evaluate(state, data.validation, config.federation.eval_batch_size)
    assert metrics["val_accuracy"].iloc[-1] == pytest.approx(expected["test_accuracy"], abs=1e-12)
    assert metrics["val_loss"].iloc[-1] == pytest.approx(expected["test_loss"], rel=1e-6)
