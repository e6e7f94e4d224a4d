"""Shared fixtures: one local Ray per test session (ray.init costs seconds), tiny configs."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray for the whole session: 4 logical CPUs and 1 logical GPU (fractional GPU shares are
    scheduled on it without a real device), with no dashboard."""
    import ray

    if not ray.is_initialized():
        # address="local": a private Ray, never a cluster this machine knew before (a dead one would hang the suite)
        ray.init(address="local", num_cpus=4, num_gpus=1, include_dashboard=False, logging_level=logging.WARNING,
                 log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """The tiny model directories and datasets of ``ravan-ray tiny``, written once per session."""
    from ravan_ray.cli import main

    out = tmp_path_factory.mktemp("tiny")
    assert main(["tiny", str(out)]) == 0
    return out


TINY_OVERRIDES = [
    "model.name=tiny-bert",
    "data.name=synthetic",
    "data.max_train_samples=240",
    "data.max_test_samples=60",
    "data.max_length=24",
    "data.partition.min_size=4",
    "federation.num_clients=6",
    "federation.clients_per_round=3",
    "federation.rounds=2",
    "federation.local_steps=2",
    "federation.batch_size=8",
    "federation.eval_every=1",
    "resources.cpus_per_client=0.5",
    "resources.pool_size=1",  # one client actor beside the server: a run starts two processes, not four
]


# What a 3-class text-classification task tells every process (TaskData.info): for ModelHost in tests.
TINY_INFO = {"label_names": ["0", "1", "2"], "pad_token_id": 0}


def tiny_model(config=None):
    """The task's model (a LoadedModel) for a config, tiny-bert with 3 classes by default."""
    from ravan_ray.config import load_config
    from ravan_ray.tasks import build_task

    return build_task(config or load_config(None, TINY_OVERRIDES), TINY_INFO).load_model()


@pytest.fixture
def tiny_config():
    """A config for a 2-round run on a 2-layer BERT built from a config (no downloads), with overrides."""
    from ravan_ray.config import load_config

    def make(*overrides: str):
        return load_config(None, [*TINY_OVERRIDES, *overrides])

    return make
