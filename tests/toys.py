"""A toy model for checking a method's rules by hand, shared by the method tests: one float64 target layer
``query`` and nothing else, wrapped by the method as ModelHost would."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ravan_ray.config import load_config
from ravan_ray.methods import build_method


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """A tiny model gains nothing from intra-op threads, and on a shared 2-core machine they fight: 10x slower.
    (Autouse in every test module that imports it.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Toy(nn.Module):
    """One d_out x d_in target layer, nothing else: small enough to compute every rule by hand."""

    def __init__(self, d_in: int = 4, d_out: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.query = nn.Linear(d_in, d_out).double()


def make_toy(name: str, *overrides: str, rank: int = 2, d_in: int = 4, d_out: int = 3):
    """(method, model): the method ``name`` at LoRA rank ``rank`` wrapped around a :class:`Toy`."""
    config = load_config(None, [f"method.name={name}", f"method.lora_rank={rank}", "model.target_modules=[query]",
                                "federation.num_clients=6", *overrides])
    method = build_method(config)
    model = Toy(d_in, d_out)
    object.__setattr__(model, "ravan_adapted", method.wrap_model(model))
    model.requires_grad_(False)  # as ModelHost does: begin_training decides what trains
    return method, model


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def local_data(seed: int, n: int = 16) -> dict[str, np.ndarray]:
    """n rows of a client's tokenised text-classification data (3 classes)."""
    rng = np.random.default_rng(seed)
    return {"input_ids": rng.integers(1000, 3000, (n, 12)), "attention_mask": np.ones((n, 12), dtype=np.int64),
            "labels": rng.integers(0, 3, n)}
