"""RoLoRA: B in odd rounds, A in even rounds, the other factor frozen and shared, so each average is exact."""

from __future__ import annotations

from functools import partial

import torch
from hypothesis import given, settings, strategies as st

from conftest import TINY_INFO, TINY_OVERRIDES
from ravan_ray.config import load_config
from ravan_ray.methods.base import ClientTask, ClientUpdate
from ravan_ray.training import ModelHost
from toys import make_toy, one_thread, rand, local_data  # noqa: F401  (one_thread: an autouse fixture)

toy = partial(make_toy, "rolora")


def test_clients_train_and_upload_B_in_odd_rounds_and_A_in_even_rounds():
    host = ModelHost(load_config(None, [*TINY_OVERRIDES, "method.name=rolora"]), TINY_INFO)
    state = host.initial_state()
    state.update({k: rand(*v.shape, seed=1).float() * 0.1 for k, v in state.items() if k.endswith("/lora_B")})
    for round_index, trained, frozen in ((1, "lora_B", "lora_A"), (2, "lora_A", "lora_B"), (3, "lora_B", "lora_A")):
        update = host.train_client(ClientTask(0, round_index, 1.0, 0), state, None, local_data(0))
        assert not any(k.endswith(frozen) for k in update.tensors), round_index
        for name, layer in host.adapted.items():
            assert torch.equal(getattr(layer, frozen).detach(), state[f"{name}/{frozen}"])  # untouched
            assert not torch.equal(update.tensors[f"{name}/{trained}"], state[f"{name}/{trained}"])


def test_an_A_round_from_B_zero_would_not_move_A_which_is_why_B_goes_first():
    host = ModelHost(load_config(None, [*TINY_OVERRIDES, "method.name=rolora"]), TINY_INFO)
    state = host.initial_state()  # B = 0
    update = host.train_client(ClientTask(0, 2, 1.0, 0), state, None, local_data(0))
    for name in host.adapted:
        assert torch.equal(update.tensors[f"{name}/lora_A"], state[f"{name}/lora_A"])


def test_each_rounds_average_is_exact_and_the_other_factor_is_kept():
    method, model = toy()
    state = method.initial_state(model)
    B1, B2 = rand(3, 2, seed=1), rand(3, 2, seed=2)
    after1 = method.aggregate(state, [ClientUpdate(0, {"query/lora_B": B1}, 10, 0.0),
                                      ClientUpdate(1, {"query/lora_B": B2}, 10, 0.0)], 1)
    A = state["query/lora_A"]
    assert torch.equal(after1["query/lora_A"], A)
    assert torch.allclose(after1["query/lora_B"] @ A, (B1 @ A + B2 @ A) / 2)
    A1, A2 = rand(2, 4, seed=3), rand(2, 4, seed=4)
    after2 = method.aggregate(after1, [ClientUpdate(0, {"query/lora_A": A1}, 10, 0.0),
                                       ClientUpdate(2, {"query/lora_A": A2}, 10, 0.0)], 2)
    B = after1["query/lora_B"]
    assert torch.allclose(B @ after2["query/lora_A"], (B @ A1 + B @ A2) / 2)


def test_downlink_is_the_head_in_round_one_then_the_last_trained_factor_or_both_after_two_missed_rounds():
    method, model = toy()
    b_bytes, a_bytes = 3 * 2 * 8, 2 * 4 * 8
    state = method.initial_state(model)
    assert method.downlink_bytes(state, [0, 1, 2]) == 0  # everyone has the seeded initial factors
    after1 = method.aggregate(state, [ClientUpdate(c, {"query/lora_B": rand(3, 2, seed=c)}, 10, 0.0)
                                      for c in (0, 1)], 1)
    assert method.downlink_bytes(after1, [0, 5]) == 2 * b_bytes  # round 1 changed B only
    after2 = method.aggregate(after1, [ClientUpdate(0, {"query/lora_A": rand(2, 4, seed=9)}, 10, 0.0)], 2)
    assert method.downlink_bytes(after2, [0]) == a_bytes  # took part in round 2: it lacks round 2's A
    assert method.downlink_bytes(after2, [1]) == a_bytes + b_bytes  # missed round 2 (and round 1's mean B)
    assert method.downlink_bytes(after2, [5]) == a_bytes + b_bytes  # never sampled


@settings(max_examples=40, deadline=None)
@given(d_out=st.integers(1, 10), d_in=st.integers(1, 10), rank=st.integers(1, 5), clients=st.integers(1, 5),
       seed=st.integers(0, 2**31 - 1))
def test_with_one_factor_shared_the_factor_average_is_the_update_average(d_out, d_in, rank, clients, seed):
    generator = torch.Generator().manual_seed(seed)
    A = torch.randn(rank, d_in, generator=generator, dtype=torch.float64)
    Bs = [torch.randn(d_out, rank, generator=generator, dtype=torch.float64) for _ in range(clients)]
    w = torch.rand(clients, generator=generator, dtype=torch.float64) + 0.1
    w = w / w.sum()
    mean_B = sum(wi * B for wi, B in zip(w, Bs))
    assert torch.allclose(mean_B @ A, sum(wi * B @ A for wi, B in zip(w, Bs)), atol=1e-10)
    B = Bs[0]
    As = [torch.randn(rank, d_in, generator=generator, dtype=torch.float64) for _ in range(clients)]
    mean_A = sum(wi * Ai for wi, Ai in zip(w, As))
    assert torch.allclose(B @ mean_A, sum(wi * B @ Ai for wi, Ai in zip(w, As)), atol=1e-10)
