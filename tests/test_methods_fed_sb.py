"""Fed-SB's initialisation as LoRA-SB's code does it: gradients of W summed over local batches with no weight
step, dW = -eta sign(sum) with eta = lr / warm-up steps, B = U_r, A = V_r^T, R = S_r, W unchanged; and what it
costs in bytes."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from hypothesis import given, settings, strategies as st

from conftest import TINY_INFO, TINY_OVERRIDES
from ravan_ray.config import load_config
from ravan_ray.methods.base import ClientTask, ClientUpdate
from ravan_ray.methods.fed_sb import bases_keys, core_key, grad_key, sign_update_bases
from ravan_ray.training import ModelHost
from toys import Toy, make_toy, one_thread, local_data  # noqa: F401  (one_thread: an autouse fixture)

toy = partial(make_toy, "fed_sb", "optimizer.lr=0.01", rank=1)


def test_round_one_makes_no_weight_step_and_uploads_the_sum_of_its_local_batch_gradients():
    host = ModelHost(load_config(None, [*TINY_OVERRIDES, "method.name=fed_sb", "federation.local_steps=3"]), TINY_INFO)
    state, task, data = host.initial_state(), ClientTask(2, 1, 1.0, 0), local_data(2)
    update = host.train_client(task, state, None, data)

    params = dict(host.model.named_parameters())
    for name, pretrained in host.pristine.items():  # no weight moved: not W, not the cores, not the head
        assert torch.equal(params[name], pretrained), name
    assert set(update.tensors) == {grad_key(layer) for layer in host.adapted}  # only the gradient sums go up

    # the same S batches, the same dropout draws: the gradient of W summed over them
    host.load(state)
    host.model.train()
    weights = {name: layer.base.weight for name, layer in host.adapted.items()}
    for weight in weights.values():
        weight.requires_grad_(True)
    torch.manual_seed(int(task.generator(stream=2).initial_seed()))
    expected = {name: torch.zeros_like(w) for name, w in weights.items()}
    for batch in host._batch_order(len(data["labels"]), 3, 8, task.generator(stream=0)):
        grads = torch.autograd.grad(host._loss(data, batch), list(weights.values()))
        for name, grad in zip(weights, grads):
            expected[name] += grad
    for name in weights:
        assert torch.allclose(update.tensors[grad_key(name)], expected[name], atol=1e-6), name


def test_the_learning_rate_is_zero_only_while_the_state_has_no_bases():
    method, model = toy()
    state = method.initial_state(model)
    method.load_state(model, state, None)
    assert method.lr == 0.0
    ones = torch.ones(3, 4, dtype=torch.float64)
    new = method.aggregate(state, [ClientUpdate(0, {grad_key("query"): ones}, 4, 0.0)], 1)
    method.load_state(model, new, None)
    assert method.lr == 0.01


def test_the_bases_are_the_svd_of_minus_eta_sign_of_the_summed_gradients_and_W_is_unchanged():
    method, model = toy()  # N = 7: r = floor(sqrt 7) = 2
    state = method.initial_state(model)
    G1, G2 = (torch.randn(3, 4, generator=torch.Generator().manual_seed(s), dtype=torch.float64) for s in (1, 2))
    new = method.aggregate(state, [ClientUpdate(0, {grad_key("query"): G1}, 4, 0.0),
                                   ClientUpdate(1, {grad_key("query"): G2}, 40, 0.0)], 1)
    eta = 0.01 / (0.02 * 12 * 3 * 10)  # lr / (warm-up ratio x rounds x clients per round x local steps)
    U, S, Vh = torch.linalg.svd(-eta * torch.sign(G1 + G2))  # the pooled sum: no data-size weights
    B, A = new[bases_keys("query")[0]], new[bases_keys("query")[1]]
    assert torch.allclose(B.abs(), U[:, :2].abs()) and torch.allclose(A.abs(), Vh[:2].abs())  # up to signs
    assert torch.allclose(B.T @ B, torch.eye(2, dtype=B.dtype)) and torch.allclose(A @ A.T, torch.eye(2, dtype=A.dtype))
    assert torch.allclose(new[core_key("query")], torch.diag(S[:2]))
    best = (U[:, :2] * S[:2]) @ Vh[:2]
    assert torch.allclose(B @ new[core_key("query")] @ A, best)  # the initial model: W + the rank-r truncation
    assert not any(key.endswith("base_weight") for key in new)  # W itself never changes

    method.load_state(model, new, None)
    pretrained = Toy().query.weight
    assert torch.equal(model.query.base.weight, pretrained)
    assert torch.allclose(model.query.delta_weight(), best)


def test_with_a_lora_alpha_the_core_starts_at_S_over_the_scale_so_the_initial_model_is_the_same():
    method, model = toy("method.lora_alpha=1")  # r = 2: scale 1/2
    G = torch.randn(3, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    new = method.aggregate(method.initial_state(model), [ClientUpdate(0, {grad_key("query"): G}, 4, 0.0)], 1)
    U, S, Vh = torch.linalg.svd(-method.initial_step() * torch.sign(G))
    assert torch.allclose(new[core_key("query")], torch.diag(S[:2]) * 2)
    method.load_state(model, new, None)
    assert torch.allclose(model.query.delta_weight(), (U[:, :2] * S[:2]) @ Vh[:2])


def test_bases_go_once_to_each_client_the_first_time_it_is_sampled_after_round_one():
    method, model = toy()
    state = method.initial_state(model)
    assert method.downlink_bytes(state, [0, 1, 2]) == 0  # round 1: nothing but the (absent) head
    G = torch.ones(3, 4, dtype=torch.float64)
    after1 = method.aggregate(state, [ClientUpdate(c, {grad_key("query"): G}, 4, 0.0) for c in (0, 1)], 1)
    bases, core = (3 * 2 + 2 * 4) * 8, 2 * 2 * 8
    assert method.downlink_bytes(after1, [0, 4]) == 2 * (core + bases)  # nobody holds the bases yet
    R = torch.eye(2, dtype=torch.float64)
    after2 = method.aggregate(after1, [ClientUpdate(c, {core_key("query"): R}, 4, 0.0) for c in (0, 4)], 2)
    assert method.downlink_bytes(after2, [0, 4, 5]) == 3 * core + bases  # only client 5 still lacks them


@settings(max_examples=40, deadline=None)
@given(d_out=st.integers(1, 12), d_in=st.integers(1, 12), lr=st.floats(1e-4, 1.0), seed=st.integers(0, 2**31 - 1))
def test_at_full_rank_the_bases_and_core_reproduce_the_sign_update_exactly(d_out, d_in, lr, seed):
    G = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    B, A, S = sign_update_bases(G, lr, min(d_out, d_in))
    assert torch.allclose(B @ torch.diag(S) @ A, -lr * torch.sign(G), atol=1e-10)
    assert (S[:-1] >= S[1:]).all()  # sorted: truncating keeps the best rank-r approximation


@settings(max_examples=30, deadline=None)
@given(lr=st.floats(1e-5, 1e-1), ratio=st.floats(1e-3, 1.0), rounds=st.integers(1, 200), per_round=st.integers(1, 6),
       steps=st.integers(1, 60), seed=st.integers(0, 2**31 - 1))
def test_the_initial_update_is_one_sign_step_of_lr_over_the_warm_up_steps(lr, ratio, rounds, per_round, steps, seed):
    """LoRA-SB / Fed-SB's eff_lr = lr / (warmup_ratio x total steps), total steps = every mini-batch the clients train
    on (rounds x clients per round x local steps); a warm-up under one step is none (eta = lr). At full rank
    (r = 3 on 3 x 4) every entry of the initial update B R A is +-eta, so its Frobenius norm is eta sqrt(12)."""
    method, model = make_toy("fed_sb", f"optimizer.lr={lr}", f"method.fed_sb_warmup_ratio={ratio}",
                             f"federation.rounds={rounds}", f"federation.clients_per_round={per_round}",
                             f"federation.local_steps={steps}", rank=2)  # N = 14: r = floor(sqrt 14) = 3
    G = torch.randn(3, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    new = method.aggregate(method.initial_state(model), [ClientUpdate(0, {grad_key("query"): G}, 4, 0.0)], 1)
    eta = lr / max(1.0, ratio * rounds * per_round * steps)
    B, A = new[bases_keys("query")[0]], new[bases_keys("query")[1]]
    update = B @ new[core_key("query")] @ A
    assert method.initial_step() == pytest.approx(eta, rel=1e-12)
    assert torch.allclose(update, -eta * torch.sign(G), rtol=1e-9, atol=eta * 1e-9)
    assert torch.linalg.matrix_norm(new[core_key("query")]).item() == pytest.approx(eta * 12 ** 0.5, rel=1e-9)
    assert eta <= lr


def test_at_the_benchmarks_scale_the_initial_step_is_lr_over_4_8_not_lr():
    method, _ = make_toy("fed_sb", "optimizer.lr=2e-3", "federation.rounds=8", "federation.local_steps=10")
    assert method.initial_step() == pytest.approx(2e-3 / (0.02 * 8 * 3 * 10))  # 240 steps, 4.8 of warm-up
    assert method.resolved()["initial_step"] == method.initial_step()


def test_a_warm_up_ratio_outside_0_1_is_one_config_line():
    from ravan_ray.config import ConfigError
    for bad in ("0", "1.5", "-0.1"):
        with pytest.raises(ConfigError, match="fed_sb_warmup_ratio"):
            load_config(None, ["method.name=fed_sb", f"method.fed_sb_warmup_ratio={bad}"])
