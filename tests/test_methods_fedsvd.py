"""FedSVD: clients train B against a shared A; the server refactorises the averaged B A through its SVD."""

from __future__ import annotations

from functools import partial

import numpy as np
import torch
from hypothesis import given, settings, strategies as st

from conftest import TINY_INFO, TINY_OVERRIDES
from ravan_ray.config import load_config
from ravan_ray.methods.base import ClientTask, ClientUpdate
from ravan_ray.methods.fedsvd import refactorise
from ravan_ray.training import ModelHost
from toys import make_toy, one_thread, rand  # noqa: F401  (one_thread: an autouse fixture)

toy = partial(make_toy, "fedsvd", rank=1, d_in=6, d_out=5)


def test_the_server_refactorises_the_mean_update_so_A_is_orthonormal_and_the_product_is_the_exact_mean():
    method, model = toy("method.aggregation_weights=num_samples")  # N = 11: r = floor(11 / 5) = 2
    state = method.initial_state(model)
    A = state["query/lora_A"]
    assert A.shape == (2, 6) and set(state) == {"query/lora_A", "query/lora_B"}
    B1, B2 = rand(5, 2, seed=1), rand(5, 2, seed=2)
    new = method.aggregate(state, [ClientUpdate(0, {"query/lora_B": B1}, 10, 0.0),
                                   ClientUpdate(1, {"query/lora_B": B2}, 30, 0.0)], 1)
    B_new, A_new = new["query/lora_B"], new["query/lora_A"]
    assert torch.allclose(B_new @ A_new, 0.25 * B1 @ A + 0.75 * B2 @ A)  # exact: mean(B_c) A = mean(B_c A)
    assert torch.allclose(A_new @ A_new.T, torch.eye(2, dtype=A.dtype))  # A: right singular vectors
    U, S, Vh = torch.linalg.svd(0.25 * B1 @ A + 0.75 * B2 @ A)
    assert torch.allclose(torch.linalg.svdvals(B_new), S[:2])  # B = U_r S_r
    assert torch.allclose((A_new @ Vh[:2].T).abs(), torch.eye(2, dtype=A.dtype), atol=1e-10)
    assert method.downlink_bytes(new, [0, 1, 2]) == 3 * (5 * 2 + 2 * 6) * 8  # both factors to every client


def test_clients_train_and_upload_only_B_against_the_broadcast_A():
    host = ModelHost(load_config(None, [*TINY_OVERRIDES, "method.name=fedsvd"]), TINY_INFO)
    state = host.initial_state()
    rng = np.random.default_rng(0)
    data = {"input_ids": rng.integers(1000, 3000, (16, 12)), "attention_mask": np.ones((16, 12), dtype=np.int64),
            "labels": rng.integers(0, 3, 16)}
    update = host.train_client(ClientTask(0, 1, 1.0, 0), state, None, data)
    assert not any(k.endswith("/lora_A") for k in update.tensors)
    for name, layer in host.adapted.items():
        assert torch.equal(layer.lora_A.detach(), state[f"{name}/lora_A"])  # A did not move
        assert update.tensors[f"{name}/lora_B"].abs().max() > 0  # B did


@settings(max_examples=60, deadline=None)
@given(d_out=st.integers(2, 20), d_in=st.integers(2, 20), rank=st.integers(1, 8), zero_columns=st.integers(0, 8),
       seed=st.integers(0, 2**31 - 1))
def test_refactorising_keeps_the_product_and_gives_A_orthonormal_rows_in_its_old_row_space(
        d_out, d_in, rank, zero_columns, seed):
    rank = min(rank, d_out, d_in)
    B, A = rand(d_out, rank, seed=seed), rand(rank, d_in, seed=seed + 1)
    B[:, : min(zero_columns, rank)] = 0  # a B that uses fewer directions than its rank
    B_new, A_new = refactorise(B, A)
    assert torch.allclose(B_new @ A_new, B @ A, atol=1e-9 * (1 + float((B @ A).abs().max())))
    assert torch.allclose(A_new @ A_new.T, torch.eye(rank, dtype=A.dtype), atol=1e-9)
    projector = torch.linalg.pinv(A) @ A  # onto A's row space
    assert torch.allclose(A_new @ projector, A_new, atol=1e-7)
    gram = B_new.T @ B_new  # B's columns are orthogonal (U_r S_r)
    assert torch.allclose(gram, torch.diag(torch.diagonal(gram)), atol=1e-8 * (1 + float(gram.abs().max())))
