"""Claims about the federated methods' server rules (each method's paper: its file's docstring), checked without Ray.

Each rule is checked on a small hand-made example by calling ``method.aggregate`` directly, and the
exactness column of the baselines table is checked on a real (tiny) model through ``ModelHost``: the
aggregated ΔW of an exact method equals the weighted mean of the clients' ΔW.
"""

from __future__ import annotations

import inspect
import math
import re

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
import torch
from torch import nn

from conftest import TINY_INFO, TINY_OVERRIDES, tiny_model
from ravan_ray.config import load_config
from ravan_ray.methods import REGISTRY as METHODS
from ravan_ray.methods import REGISTRY, build_method, method_class
from ravan_ray.methods.base import EVAL_PREFIX, ClientTask, ClientUpdate
from ravan_ray.methods.budget import method_rank, per_matrix_budget
from ravan_ray.models import export_weights
from ravan_ray.tasks import build_task
from ravan_ray.training import ModelHost
from toys import make_toy, one_thread, rand  # noqa: F401  (one_thread: an autouse fixture)

toy = make_toy


# ------------------------------------------------------------------------------------------------ helpers
def update(client_id: int, num_samples: int = 10, client_state=None, **tensors) -> ClientUpdate:
    named = {f"query/{key}": value for key, value in tensors.items()}
    return ClientUpdate(client_id, named, num_samples, 0.0, client_state=client_state)


def no_batch_loss():
    raise AssertionError("not needed by this method")


# ------------------------------------------------------------------------------------------------ protocol
def test_every_configurable_method_is_registered_with_a_docstring_naming_its_paper():
    assert set(REGISTRY) == set(METHODS)
    for name in METHODS:
        cls = method_class(name)
        assert cls.name == name
        assert len(inspect.getmodule(cls).__doc__) > 300


def test_budget_matching_gives_every_method_at_most_N_trainable_numbers_per_matrix():
    config = load_config(None, ["method.lora_rank=8", "method.heads=4"]).method
    d = 384
    N = per_matrix_budget(config, d, d)
    assert N == 8 * 2 * d

    def rank(name):
        return method_rank(config.model_copy(update={"name": name}), d, d)

    lora_rank_methods = ("fedit", "fedex_lora", "flora", "fedsa_lora", "hetlora", "flexlora", "rolora", "fed_plora")
    assert {m: rank(m) for m in lora_rank_methods} == dict.fromkeys(lora_rank_methods, 8)
    assert rank("ffa_lora") == rank("fedsvd") == 16  # only B trains: 2 r_L
    assert rank("fed_sb") == 78 == int(np.sqrt(N))
    assert rank("ravan") == 39 == int(np.sqrt(N / 4))  # the paper's Table 10 style: floor(sqrt(N / h))
    assert rank("full_ft") == d
    assert rank("fedit") * 2 * d <= N and rank("ffa_lora") * d <= N
    assert rank("fed_sb") ** 2 <= N and 4 * rank("ravan") ** 2 <= N


def test_an_explicit_budget_overrides_the_lora_rank_and_a_rank_above_the_matrix_size_is_refused():
    config = load_config(None, ["method.budget=1000"]).method
    assert method_rank(config.model_copy(update={"name": "fedit"}), 32, 32) == 1000 // 64
    assert method_rank(config.model_copy(update={"name": "fed_sb"}), 32, 32) == 31
    with pytest.raises(ValueError, match="too small"):
        method_rank(load_config(None, ["method.budget=10"]).method.model_copy(update={"name": "fedit"}), 32, 32)


@pytest.mark.parametrize("name", sorted(set(METHODS) - {"full_ft"}))
def test_a_budget_whose_rank_exceeds_the_matrix_is_refused_with_the_largest_budget_that_fits(name):
    """lora_rank 100000 on MiniLM asked for heads of rank 4,381 on 384 x 384 matrices: memory for nothing."""
    config = load_config(None, ["method.lora_rank=100000", f"method.name={name}"]).method
    with pytest.raises(ValueError) as refused:
        method_rank(config, 384, 384)
    largest = int(re.search(r"method.budget <= (\d+)", str(refused.value)).group(1))
    assert method_rank(config.model_copy(update={"lora_rank": None, "budget": largest}), 384, 384) <= 384
    with pytest.raises(ValueError):
        method_rank(config.model_copy(update={"lora_rank": None, "budget": largest * 2 + 10 ** 6}), 384, 384)
    if name == "ravan":  # the paper's saturation point is named too: sqrt(N h) = d
        assert "sqrt(N h) = d, N = 36864" in str(refused.value)


# ------------------------------------------------------------------------------------------------ server rules
def test_fedit_averages_B_and_A_separately_which_is_not_the_mean_of_products():
    method, model = toy("fedit", "method.aggregation_weights=num_samples")
    state = method.initial_state(model)
    B1, A1, B2, A2 = rand(3, 2, seed=1), rand(2, 4, seed=2), rand(3, 2, seed=3), rand(2, 4, seed=4)
    new = method.aggregate(state, [update(0, 10, lora_B=B1, lora_A=A1), update(1, 30, lora_B=B2, lora_A=A2)], 1)
    assert torch.allclose(new["query/lora_B"], 0.25 * B1 + 0.75 * B2)
    assert torch.allclose(new["query/lora_A"], 0.25 * A1 + 0.75 * A2)
    assert not torch.allclose(new["query/lora_B"] @ new["query/lora_A"], 0.25 * B1 @ A1 + 0.75 * B2 @ A2)


def test_fedex_folds_the_residual_mean_BA_minus_mean_B_mean_A_into_the_base_weight():
    method, model = toy("fedex_lora")
    state = method.initial_state(model)
    B1, A1, B2, A2 = rand(3, 2, seed=1), rand(2, 4, seed=2), rand(3, 2, seed=3), rand(2, 4, seed=4)
    new = method.aggregate(state, [update(0, lora_B=B1, lora_A=A1), update(1, lora_B=B2, lora_A=A2)], 1)
    mean_B, mean_A, mean_BA = (B1 + B2) / 2, (A1 + A2) / 2, (B1 @ A1 + B2 @ A2) / 2
    assert torch.allclose(new["query/lora_B"], mean_B) and torch.allclose(new["query/lora_A"], mean_A)
    s = method.lora_scale(2)
    assert s == 2.0  # FedEx-LoRA's code: lora_alpha = 2 r
    residual = new["query/base_weight"] - state["query/base_weight"]
    assert torch.allclose(residual, s * (mean_BA - mean_B @ mean_A))
    assert torch.allclose(new["query/base_weight"] + s * mean_B @ mean_A, state["query/base_weight"] + s * mean_BA)
    # the updated weights are broadcast, so they are downlink
    assert method.downlink_bytes(new, [0, 1, 2]) == 3 * (3 * 4 + 3 * 2 + 2 * 4) * 8


def test_ffa_lora_keeps_A_frozen_and_out_of_the_state_and_averages_B():
    method, model = toy("ffa_lora", "method.budget=8")
    state = method.initial_state(model)
    assert set(state) == {"query/lora_B"} and state["query/lora_B"].shape == (3, 2)  # r = floor(8 / 3) = 2
    B1, B2 = rand(3, 2, seed=1), rand(3, 2, seed=2)
    new = method.aggregate(state, [update(0, lora_B=B1), update(1, lora_B=B2)], 1)
    assert torch.allclose(new["query/lora_B"], (B1 + B2) / 2)
    A = model.query.lora_A.detach()
    assert torch.allclose(new["query/lora_B"] @ A, (B1 @ A + B2 @ A) / 2)  # exact
    method.begin_training(model, ClientTask(0, 1, 1.0, 0), no_batch_loss)
    assert not model.query.lora_A.requires_grad and model.query.lora_B.requires_grad


def test_hetlora_zero_pads_to_r_max_and_weights_clients_by_the_norm_of_their_update():
    method, model = toy("hetlora")
    state = method.initial_state(model)
    B1, A1 = rand(3, 1, seed=1), rand(1, 4, seed=2)  # a rank-1 client
    B2, A2 = rand(3, 2, seed=3), rand(2, 4, seed=4)  # a rank-2 (= r_max) client
    new = method.aggregate(state, [update(0, lora_B=B1, lora_A=A1), update(1, lora_B=B2, lora_A=A2)], 1)
    n1, n2 = torch.linalg.matrix_norm(B1 @ A1), torch.linalg.matrix_norm(B2 @ A2)
    p1, p2 = n1 / (n1 + n2), n2 / (n1 + n2)
    assert torch.allclose(new["query/lora_B"], p1 * torch.cat([B1, torch.zeros(3, 1, dtype=B1.dtype)], 1) + p2 * B2)
    assert torch.allclose(new["query/lora_A"], p1 * torch.cat([A1, torch.zeros(1, 4, dtype=A1.dtype)], 0) + p2 * A2)


def test_a_heterogeneous_rank_client_truncates_the_global_to_its_rank_and_uploads_only_those_ranks():
    method, model = toy("hetlora")
    state = {"query/lora_B": rand(3, 2, seed=1), "query/lora_A": rand(2, 4, seed=2)}
    method.load_state(model, state, None)
    meta = method.begin_training(model, ClientTask(0, 1, 0.5, 0), no_batch_loss)  # r_c = round(0.5 * 2) = 1
    layer = model.query
    assert meta["rank"] == {"query": 1}
    assert torch.allclose(layer.delta_weight(), layer.scale * state["query/lora_B"][:, :1] @ state["query/lora_A"][:1])
    tensors, _ = method.upload(model, ClientTask(0, 1, 0.5, 0), meta)
    assert tensors["query/lora_B"].shape == (3, 1) and tensors["query/lora_A"].shape == (1, 4)
    method.load_state(model, state, None)  # the next client in this process starts from the full rank again
    assert torch.allclose(layer.delta_weight(), method.lora_scale(2) * state["query/lora_B"] @ state["query/lora_A"])


def test_flexlora_averages_full_products_and_redistributes_their_best_low_rank_truncation():
    method, model = toy("flexlora")
    state = method.initial_state(model)
    E = torch.eye(3, 4, dtype=torch.float64)
    B1, A1 = torch.tensor([[3.0], [0.0], [0.0]], dtype=torch.float64), E[:1]  # rank 1: 3 e1 e1^T
    B2 = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)  # rank 2: 2 e2 e2^T + e3 e3^T
    A2 = E[1:3]
    new = method.aggregate(state, [update(0, lora_B=B1, lora_A=A1), update(1, lora_B=B2, lora_A=A2)], 1)
    s = method.lora_scale(1)
    assert s == method.lora_scale(2) == 2.0  # alpha = 2 r_c: every client's scale is 2
    mean = s * torch.diag(torch.tensor([1.5, 1.0, 0.5], dtype=torch.float64)) @ E  # of the clients' s B_c A_c
    assert torch.allclose(new[EVAL_PREFIX + "query/delta"], mean)  # the global model: W0 + the exact mean
    rank2 = s * torch.diag(torch.tensor([1.5, 1.0, 0.0], dtype=torch.float64)) @ E
    assert torch.allclose(new["query/lora_B"] @ new["query/lora_A"], rank2)  # broadcast: rank r_max = 2 of dW
    assert method.downlink_bytes(new, [0, 1, 2]) == 3 * (3 * 2 + 2 * 4) * 8  # eval/ is not sent

    method.load_state(model, {k: v for k, v in new.items() if not k.startswith(EVAL_PREFIX)}, None)
    method.begin_training(model, ClientTask(0, 2, 0.5, 0), no_batch_loss)  # a rank-1 client
    assert torch.allclose(model.query.delta_weight(), s * 1.5 * torch.outer(E[0, :3], E[0]))  # dW's rank-1 part
    pretrained = model.query.base.weight.detach().clone()
    method.load_state(model, new, None)  # the server's global model
    assert torch.allclose(model.query.base.weight - pretrained, mean)
    assert torch.count_nonzero(model.query.delta_weight()) == 0


@settings(max_examples=60, deadline=None)
@given(d_out=st.integers(2, 24), d_in=st.integers(2, 24), client_ranks=st.lists(st.integers(1, 6), min_size=1, max_size=4),
       rank=st.integers(1, 12), seed=st.integers(0, 2**31 - 1))
def test_flexlora_truncation_from_the_factors_is_the_best_rank_r_approximation_of_the_dense_sum(
        d_out, d_in, client_ranks, rank, seed):
    from ravan_ray.methods.flexlora import truncated_factors

    rank = min(rank, d_out, d_in)  # r_max never exceeds min(d_out, d_in)
    generator = torch.Generator().manual_seed(seed)
    Bs = [torch.randn(d_out, r, generator=generator, dtype=torch.float64) for r in client_ranks]
    As = [torch.randn(r, d_in, generator=generator, dtype=torch.float64) for r in client_ranks]
    B, A = truncated_factors(torch.cat(Bs, dim=1), torch.cat(As, dim=0), rank)
    assert B.shape == (d_out, rank) and A.shape == (rank, d_in)

    dense = sum(b @ a for b, a in zip(Bs, As))
    U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
    best = (U[:, :rank] * S[:rank]) @ Vh[:rank]
    # Eckart-Young: the error is the tail of the singular values; equal to the dense SVD's truncation
    # wherever that is unique (singular values rank and rank + 1 apart)
    tail = float(torch.sqrt((S[rank:] ** 2).sum()))
    assert abs(float(torch.linalg.matrix_norm(dense - B @ A)) - tail) <= 1e-8 * (1 + float(S[0]))
    if rank < len(S) and S[rank - 1] - S[rank] > 1e-6 * S[0]:
        assert torch.allclose(B @ A, best, atol=1e-8 * (1 + float(S[0])))
    # A has orthonormal rows, also where dW has fewer than ``rank`` directions (those ranks restart as
    # a fresh LoRA: B = 0 there, A orthonormal, so they can still train)
    assert torch.allclose(A @ A.T, torch.eye(rank, dtype=torch.float64), atol=1e-10)


def test_an_unset_learning_rate_is_the_methods_default_and_a_set_one_wins():
    from ravan_ray.training import preflight

    assert build_method(load_config(None, ["method.name=ravan"])).lr == 2e-2
    assert build_method(load_config(None, ["method.name=fedsvd"])).lr == 2e-2
    assert build_method(load_config(None, ["method.name=fedit"])).lr == 1e-2
    assert build_method(load_config(None, ["method.name=full_ft"])).lr == 2e-4
    assert build_method(load_config(None, ["method.name=full_ft", "optimizer.lr=1e-4"])).lr == 1e-4
    # the lr a run actually used goes into config.yaml's resolved section
    assert preflight(load_config(None, [*TINY_OVERRIDES, "method.name=full_ft"]), TINY_INFO)["lr"] == 2e-4


def test_flora_stacks_client_modules_so_the_merged_update_is_W_plus_sum_p_B_A():
    method, model = toy("flora", "method.aggregation_weights=num_samples")
    state = method.initial_state(model)
    assert method.downlink_bytes(state, [0, 1, 2]) == 0  # round 1: nothing to send but the (absent) head
    clients = [(rand(3, 2, seed=2 * c), rand(2, 4, seed=2 * c + 1), 10 * (c + 1)) for c in range(3)]
    new = method.aggregate(state, [update(c, n, lora_B=B, lora_A=A) for c, (B, A, n) in enumerate(clients)], 1)
    p = np.array([10, 20, 30]) / 60
    expected = sum(w * B @ A for w, (B, A, _) in zip(p, clients))
    assert new["query/stack_B"].shape == (3, 6) and new["query/stack_A"].shape == (6, 4)
    assert torch.allclose(new["query/stack_B"] @ new["query/stack_A"], expected)
    assert torch.allclose(new["query/base_weight"], state["query/base_weight"] + method.lora_scale(2) * expected)
    # the broadcast is the stacks (growing with the clients per round), or the merged weights when those are
    # smaller, as here: 3 clients' rank-2 stacks on a 3 x 4 matrix hold 42 numbers, W 12
    assert method.downlink_bytes(new, [0, 1, 2]) == 3 * min(3 * 6 + 6 * 4, 3 * 4) * 8


def test_flora_clients_start_each_round_from_a_fresh_lora():
    method, model = toy("flora")
    method.load_state(model, method.initial_state(model), None)
    method.begin_training(model, ClientTask(0, 1, 1.0, 0), no_batch_loss)
    first = model.query.lora_A.detach().clone()
    method.begin_training(model, ClientTask(0, 2, 1.0, 0), no_batch_loss)
    assert torch.count_nonzero(model.query.lora_B) == 0 and not torch.equal(first, model.query.lora_A)


def test_fedsa_shares_A_and_keeps_B_on_the_client():
    method, model = toy("fedsa_lora")
    state = method.initial_state(model)
    assert set(state) == {"query/lora_A"}
    A1, A2, B1, B2 = rand(2, 4, seed=1), rand(2, 4, seed=2), rand(3, 2, seed=3), rand(3, 2, seed=4)
    updates = [update(0, lora_A=A1, client_state={"query/lora_B": B1}),
               update(1, lora_A=A2, client_state={"query/lora_B": B2})]
    new = method.aggregate(state, updates, 1)
    assert torch.allclose(new["query/lora_A"], (A1 + A2) / 2)
    assert torch.allclose(new[EVAL_PREFIX + "query/lora_B"], (B1 + B2) / 2)
    assert method.downlink_bytes(new, [0, 1]) == 2 * 2 * 4 * 8  # A only

    client = {k: v for k, v in new.items() if not k.startswith(EVAL_PREFIX)}
    method.load_state(model, client, {"query/lora_B": B1})  # a returning client gets its own B back
    assert torch.equal(model.query.lora_B.detach(), B1)
    tensors, local = method.upload(model, ClientTask(0, 2, 1.0, 0), {})
    assert set(tensors) == {"query/lora_A"} and torch.equal(local["query/lora_B"], B1)
    model.query.lora_B.data.zero_()
    method.load_state(model, new, None)  # the server's global model: B = the mean of the clients' B
    assert torch.allclose(model.query.lora_B.detach(), (B1 + B2) / 2)


def test_full_ft_trains_everything_but_the_embeddings():
    host = ModelHost(load_config(None, [*TINY_OVERRIDES, "method.name=full_ft"]), TINY_INFO)
    trained = set(host.method.mutable_parameters(host.model))
    names = {n for n, _ in host.model.named_parameters()}
    assert {n for n in names if "embeddings" in n and "LayerNorm" not in n}.isdisjoint(trained)
    assert {n for n in names if ".encoder." in n} <= trained
    assert set(host.adapted) == set(host.method.resolved()["layer_shapes"])
    assert all(type(m) is nn.Linear for m in host.adapted.values())


# ------------------------------------------------------------------------------------------------ on a model
def local_data(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = 12 + 6 * seed  # clients of different sizes, so num_samples weights are not uniform
    return {"input_ids": rng.integers(1000, 3000, (n, 12)), "attention_mask": np.ones((n, 12), dtype=np.int64),
            "labels": rng.integers(0, 3, n)}


def aggregation_error(host: ModelHost, old_state, new_state, updates) -> tuple[float, float]:
    """(sum over layers ||ΔW(aggregated) - sum_c w_c ΔW_c||_F, sum over layers ||sum_c w_c ΔW_c||_F),
    the definition of the server's agg_error diagnostic."""
    method = host.method
    aggregated = host.layer_deltas(new_state)
    reference = {name: torch.zeros_like(delta) for name, delta in aggregated.items()}
    for u, w in zip(updates, method.client_weights(updates)):
        view, client_state = method.client_view(old_state, u)
        if view is None:  # nothing trained (Fed-SB's estimation round): no client update to compare with
            return math.nan, 0.0
        for name, delta in host.layer_deltas(view, client_state).items():
            reference[name] += float(w) * delta
    error = sum(float(torch.linalg.matrix_norm(aggregated[n] - reference[n])) for n in aggregated)
    return error, sum(float(torch.linalg.matrix_norm(reference[n])) for n in aggregated)


def federate(name: str, rounds: int, levels=(1.0, 1.0, 1.0), *overrides: str):
    """Train 3 clients per round on one ModelHost and aggregate; yields (round, error, scale, state)."""
    host = ModelHost(load_config(None, [*TINY_OVERRIDES, f"method.name={name}", "federation.local_steps=3",
                                        "federation.batch_size=8", *overrides]), TINY_INFO)
    state, client_states = host.initial_state(), {}
    for round_index in range(1, rounds + 1):
        tasks = [ClientTask(c, round_index, level, 0) for c, level in enumerate(levels)]
        updates = [host.train_client(t, state, client_states.get(t.client_id), local_data(t.client_id)) for t in tasks]
        client_states.update({u.client_id: u.client_state for u in updates if u.client_state})
        new_state = host.method.aggregate(state, updates, round_index)
        error, scale = aggregation_error(host, state, new_state, updates)
        yield round_index, error, scale, new_state
        state = new_state


@pytest.mark.parametrize("name", ["full_ft", "fedex_lora", "ffa_lora", "fed_sb", "flora", "ravan", "fedsvd", "rolora"])
def test_exact_methods_aggregate_to_the_weighted_mean_of_the_clients_updates(name):
    for round_index, error, scale, _ in federate(name, 2, (1.0, 1.0, 1.0), "method.aggregation_weights=num_samples"):
        if name == "fed_sb" and round_index == 1:
            assert math.isnan(error)  # the estimation round: nobody trained, there is no mean to compare with
            continue
        assert scale > 1e-4  # the clients really moved the weights
        assert error <= 1e-5 * scale, (round_index, error, scale)


@pytest.mark.parametrize("name", ["fedit", "fed_plora"])
def test_fedit_and_fed_plora_with_differing_clients_are_clearly_inexact(name):
    for _, error, scale, _ in federate(name, 2):
        assert error > 1e-3 * scale


def test_flexlora_global_model_is_the_exact_mean_while_hetlora_is_not():
    levels = (0.25, 0.5, 1.0)
    for _, error, scale, state in federate("flexlora", 2, levels):
        assert error <= 1e-5 * scale
    for _, error, scale, _ in federate("hetlora", 2, levels):
        assert error > 1e-2 * scale


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_a_clients_update_does_not_depend_on_the_clients_the_process_served_before(name):
    """Pool mode: one actor serves many clients, so everything a client may change is reset between them."""
    config = load_config(None, [*TINY_OVERRIDES, f"method.name={name}", "federation.local_steps=2"])
    shared, fresh = ModelHost(config, TINY_INFO), ModelHost(config, TINY_INFO)
    state = shared.initial_state()
    shared.train_client(ClientTask(0, 1, 0.25, 0), state, None, local_data(0))
    after_another = shared.train_client(ClientTask(1, 1, 1.0, 0), state, None, local_data(1))
    alone = fresh.train_client(ClientTask(1, 1, 1.0, 0), state, None, local_data(1))
    assert after_another.tensors.keys() == alone.tensors.keys()
    for key, value in alone.tensors.items():
        assert torch.equal(after_another.tensors[key], value), key


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_a_host_on_shared_frozen_weights_never_writes_them_and_trains_as_on_its_own_copy(name):
    """resources.share_frozen_weights: every actor of a node builds its model on the same read-only arrays.
    Two rounds, so the methods that change base weights when loading a state (FlexLoRA, FedEx-LoRA, FLoRA,
    Fed-SB after its warm-up, full FT) do so, and the server's evaluation load too."""
    config = load_config(None, [*TINY_OVERRIDES, f"method.name={name}", "federation.local_steps=2"])
    frozen = export_weights(tiny_model(config))
    pretrained = {key: array.copy() for key, array in frozen.arrays.items()}
    on_shared, on_own = ModelHost(config, TINY_INFO, frozen), ModelHost(config, TINY_INFO)

    shared_addresses = {array.ctypes.data for array in frozen.arrays.values()}
    mutable = set(on_shared.method.mutable_parameters(on_shared.model))
    for param_name, param in on_shared.model.named_parameters():
        assert (param.data_ptr() in shared_addresses) == (param_name not in mutable), param_name

    state, client_states = on_shared.initial_state(), {}
    for round_index in (1, 2):
        updates = []
        for client in (0, 1):
            task = ClientTask(client, round_index, (0.5, 1.0)[client], 0)
            update = on_shared.train_client(task, state, client_states.get(client), local_data(client))
            reference = on_own.train_client(task, state, client_states.get(client), local_data(client))
            for key, value in reference.tensors.items():
                assert torch.equal(update.tensors[key], value), (round_index, key)
            updates.append(update)
        client_states.update({u.client_id: u.client_state for u in updates if u.client_state})
        state = on_shared.method.aggregate(state, updates, round_index)
        on_shared.load(state)  # what the server does before evaluating
    for key, array in frozen.arrays.items():
        assert np.array_equal(array, pretrained[key]), key


def test_shared_weights_keep_dtypes_numpy_lacks_and_tied_tensors():
    from ravan_ray.models import model_from_weights

    loaded = tiny_model()
    loaded.model.to(torch.bfloat16)
    frozen = export_weights(loaded)
    query, pooler = "bert.encoder.layer.0.attention.self.query.weight", "bert.pooler.dense.weight"
    frozen.slots[query] = frozen.slots[pooler]  # tie two 32 x 32 weights, as T5 ties its embeddings
    model = model_from_weights(build_task(load_config(None, TINY_OVERRIDES), TINY_INFO).skeleton(), frozen).model
    params = dict(model.named_parameters(remove_duplicate=False))
    assert params[pooler].dtype == torch.bfloat16
    assert torch.equal(params[pooler], dict(loaded.model.named_parameters())[pooler])
    assert params[query] is params[pooler]
    assert all(not t.is_meta for t in model.state_dict().values())


def test_clients_never_receive_the_servers_eval_keys(monkeypatch):
    host = ModelHost(load_config(None, [*TINY_OVERRIDES, "method.name=fedsa_lora"]), TINY_INFO)
    state = host.initial_state()
    state.update({f"{EVAL_PREFIX}{name}/lora_B": torch.ones_like(layer.lora_B) for name, layer in host.adapted.items()})
    seen = []
    original = host.method.load_state
    monkeypatch.setattr(host.method, "load_state", lambda m, s, c: (seen.append(set(s)), original(m, s, c)))
    update = host.train_client(ClientTask(0, 1, 1.0, 0), state, None, local_data(0))
    assert seen and not any(k.startswith(EVAL_PREFIX) for k in seen[0])
    # a first-time client starts from B = 0, not from the server's mean B (all ones here)
    assert all(b.abs().max() < 0.1 for b in update.client_state.values())
