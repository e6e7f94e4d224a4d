"""The baselines as their papers and code run them: FLoRA's catch-up downlink, HetLoRA's rank self-pruning and
its two norm scopes, PEFT's lora_alpha / r scaling (per client for rank-heterogeneous methods), FedSA-LoRA's
local task head, FedEx-LoRA's round-1 downlink, and config errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from conftest import TINY_INFO, TINY_OVERRIDES
from ravan_ray.cli import main
from ravan_ray.config import load_config
from ravan_ray.methods import build_method
from ravan_ray.methods.base import EVAL_PREFIX, HEAD_PREFIX, ClientTask, ClientUpdate
from ravan_ray.methods.hetlora import rank_key, tail_norm
from ravan_ray.training import ModelHost
from toys import one_thread, rand  # noqa: F401  (one_thread: an autouse fixture)


class Toy(nn.Module):
    """Two adapted layers (query 16 -> 16, value 16 -> 8) and a two-parameter task head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.query = nn.Linear(16, 16).double()
        self.value = nn.Linear(16, 8).double()
        self.classifier = nn.Linear(2, 1).double()


def toy(name: str, *overrides: str, head: bool = False):
    config = load_config(None, [f"method.name={name}", "model.target_modules=[query, value]",
                                "federation.num_clients=6", *overrides])
    method = build_method(config)
    model = Toy()
    object.__setattr__(model, "ravan_head_parameters", ["classifier.weight", "classifier.bias"] if head else [])
    object.__setattr__(model, "ravan_adapted", method.wrap_model(model))
    model.requires_grad_(False)
    return method, model


def lora_update(client: int, ranks: dict[str, int], seed: int, num_samples: int = 10, **extra) -> ClientUpdate:
    shapes = {"query": (16, 16), "value": (8, 16)}
    tensors = {}
    for i, (layer, rank) in enumerate(ranks.items()):
        d_out, d_in = shapes[layer]
        tensors[f"{layer}/lora_B"] = rand(d_out, rank, seed=seed + 2 * i)
        tensors[f"{layer}/lora_A"] = rand(rank, d_in, seed=seed + 2 * i + 1)
    return ClientUpdate(client, {**tensors, **extra}, num_samples, 0.0)


def local_data(seed: int, n: int = 16) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"input_ids": rng.integers(1000, 3000, (n, 12)), "attention_mask": np.ones((n, 12), dtype=np.int64),
            "labels": rng.integers(0, 3, n)}


def no_batch_loss():
    raise AssertionError("not needed by this method")


# ------------------------------------------------------------------------------------------------ FLoRA
def test_flora_charges_a_client_absent_for_k_rounds_the_k_stacks_it_missed_or_the_merged_weights():
    method, model = toy("flora", "method.lora_rank=1")  # r = floor(1 (16+16) / 32) = 1 on both layers
    stack = 8 * (1 * (16 + 16) + 1 * (16 + 8))  # one client's rank-1 modules, both layers, float64
    weights = 8 * (16 * 16 + 8 * 16)
    state = method.initial_state(model)
    for round_index in (1, 2, 3):  # client 0 trains every round, the others never
        state = method.aggregate(state, [lora_update(0, {"query": 1, "value": 1}, seed=round_index)], round_index)
    # before round 4: client 0 needs round 3's stack; a client never sampled needs rounds 1-3
    assert method.downlink_bytes(state, [0]) == stack
    assert method.downlink_bytes(state, [5]) == 3 * stack
    assert method.downlink_bytes(state, [0, 5]) == 4 * stack
    for round_index in range(4, 9):
        state = method.aggregate(state, [lora_update(0, {"query": 1, "value": 1}, seed=round_index)], round_index)
    # 8 missed rounds of stacks (8 x 448 bytes) cost more than the merged weights (3,072): those are sent instead
    assert method.downlink_bytes(state, [5]) == min(8 * stack, weights) == weights
    assert method.downlink_bytes(state, [0]) == stack


# ------------------------------------------------------------------------------------------------ HetLoRA
def test_hetlora_prunes_a_clients_last_rank_when_its_norm_shrank_and_the_client_keeps_the_lower_rank():
    method, model = toy("hetlora", "method.hetlora_gamma=0.75")  # r_max = 8; gamma 0.75: ranks 6, 7 may go
    state = {f"{layer}/{f}": rand(*shape, seed=i) for i, (layer, f, shape) in enumerate(
        [("query", "lora_B", (16, 8)), ("query", "lora_A", (8, 16)), ("value", "lora_B", (8, 8)),
         ("value", "lora_A", (8, 16))])}
    method.load_state(model, state, None)
    task = ClientTask(3, 2, 1.0, 0)
    meta = method.begin_training(model, task, no_batch_loss)
    assert meta["rank"] == {"query": 8, "value": 8}
    with torch.no_grad():  # local training shrank query's last two ranks and grew value's
        model.query.lora_B[:, 6:] *= 0.5
        model.value.lora_B[:, 6:] *= 2.0
    tensors, client_state = method.upload(model, task, meta)
    assert meta["pruned"] == {"query": True, "value": False}
    assert tensors["query/lora_B"].shape == (16, 6) and tensors["query/lora_A"].shape == (6, 16)
    assert tensors["value/lora_B"].shape == (8, 8)
    assert {k: int(v) for k, v in client_state.items()} == {rank_key("query"): 6, rank_key("value"): 8}

    method.load_state(model, state, client_state)  # its next round: rank 6 in query although its level allows 8
    assert method.begin_training(model, ClientTask(3, 3, 1.0, 0), no_batch_loss)["rank"] == {"query": 6, "value": 8}


def test_hetlora_never_prunes_with_gamma_one_or_from_a_zero_start():
    method, model = toy("hetlora", "method.hetlora_gamma=1")
    method.load_state(model, method.initial_state(model), None)
    meta = method.begin_training(model, ClientTask(0, 1, 1.0, 0), no_batch_loss)
    with torch.no_grad():
        model.query.lora_B.zero_()
    method.upload(model, ClientTask(0, 1, 1.0, 0), meta)
    assert meta["pruned"] == {}  # floor(1 x 8) = 8: nothing to prune
    method, model = toy("hetlora")
    method.load_state(model, method.initial_state(model), None)  # round 1: B = 0, the last rank's norm is 0
    meta = method.begin_training(model, ClientTask(0, 1, 1.0, 0), no_batch_loss)
    method.upload(model, ClientTask(0, 1, 1.0, 0), meta)
    assert meta["pruned"] == {"query": False, "value": False}


def test_hetlora_adds_lambda_times_the_last_ranks_norm_product_to_the_clients_loss():
    host = ModelHost(load_config(None, [*TINY_OVERRIDES, "method.name=hetlora", "method.hetlora_lambda=0.5"]), TINY_INFO)
    method, model = host.method, host.model
    state = host.initial_state()
    state.update({k: rand(*v.shape, seed=i).float() for i, (k, v) in enumerate(state.items()) if "lora_B" in k})
    data, rows = local_data(0), torch.arange(8)
    host.load(state)
    model.eval()
    plain = host._loss(data, rows)
    meta = method.begin_training(model, ClientTask(0, 2, 1.0, 0), lambda: plain)
    penalised = host._loss(data, rows)
    penalty = sum(tail_norm(host.adapted[n], 7, 8) for n in host.adapted)  # floor(0.99 x 8) = 7: the last rank
    assert torch.allclose(penalised, plain + 0.5 * penalty)
    method.upload(model, ClientTask(0, 2, 1.0, 0), meta)  # the hook goes with the task
    assert torch.allclose(host._loss(data, rows), plain)


def test_hetlora_pruning_lowers_a_clients_rank_after_local_training_when_the_penalty_shrinks_its_last_rank():
    config = load_config(None, [*TINY_OVERRIDES, "method.name=hetlora", "method.hetlora_lambda=50",
                                "federation.local_steps=3"])
    host = ModelHost(config, TINY_INFO)
    state = host.initial_state()
    state.update({k: rand(*v.shape, seed=i).float() * 0.1 for i, (k, v) in enumerate(state.items()) if "lora_B" in k})
    update = host.train_client(ClientTask(0, 2, 1.0, 0), state, None, local_data(0))
    assert all(update.meta["pruned"].values())
    assert all(update.tensors[f"{n}/lora_A"].shape[0] == 7 for n in host.adapted)  # rank 8 -> floor(0.99 x 8)
    assert all(int(v) == 7 for v in update.client_state.values())


def test_hetlora_sparsity_weights_per_layer_or_over_the_whole_model():
    updates = [lora_update(0, {"query": 2, "value": 2}, seed=10), lora_update(1, {"query": 4, "value": 4}, seed=20)]
    per_layer, model = toy("hetlora")
    whole, _ = toy("hetlora", "method.hetlora_norm=model")

    def norm(u, layer):
        return float(torch.linalg.matrix_norm(per_layer.client_delta(u, layer)))

    weights = np.full(2, 0.5)
    for layer in ("query", "value"):
        n = np.array([norm(u, layer) for u in updates])
        assert np.allclose(per_layer.sparsity_weights(updates, layer, weights), n / n.sum())
    total = np.array([np.sqrt(norm(u, "query") ** 2 + norm(u, "value") ** 2) for u in updates])
    for layer in ("query", "value"):  # one weight per client for every layer
        assert np.allclose(whole.sparsity_weights(updates, layer, weights), total / total.sum())


# ------------------------------------------------------------------------------------------------ lora_alpha
@pytest.mark.parametrize("name, default_scale", [("fedit", 1.0), ("fedex_lora", 2.0), ("ffa_lora", 2.0), ("flora", 2.0),
                                                 ("fedsa_lora", 2.0), ("hetlora", 2.0), ("flexlora", 2.0),
                                                 ("fedsvd", 1.0), ("rolora", 1.0), ("fed_plora", 1.0)])
def test_lora_scale_is_alpha_over_r_and_defaults_to_the_original_codes_alpha(name, default_scale):
    method, model = toy(name, "method.lora_rank=2")
    assert model.query.scale == default_scale and method.lora_scale(2) == default_scale
    method, model = toy(name, "method.lora_rank=2", "method.lora_alpha=12")
    rank = model.query.rank
    assert model.query.scale == 12 / rank  # PEFT: lora_alpha / r
    with torch.no_grad():
        model.query.lora_B.copy_(rand(*model.query.lora_B.shape, seed=1))
    assert torch.allclose(model.query.delta_weight(), 12 / rank * model.query.lora_B @ model.query.lora_A)


def test_a_heterogeneous_rank_client_scales_by_alpha_over_its_own_rank():
    method, model = toy("hetlora", "method.lora_alpha=16")  # r_max = 8
    method.load_state(model, method.initial_state(model), None)
    meta = method.begin_training(model, ClientTask(0, 1, 0.25, 0), no_batch_loss)  # r_c = 2
    assert meta["rank"]["query"] == 2 and model.query.scale == 16 / 2
    method.load_state(model, method.initial_state(model), None)  # the global model: alpha / r_max
    assert model.query.scale == 16 / 8


def test_flexlora_redistributes_the_truncation_of_the_scaled_mean_for_any_alpha():
    method, model = toy("flexlora", "method.lora_alpha=3")  # r_max = 8; client ranks 2 and 8: scales 1.5, 0.375
    updates = [lora_update(0, {"query": 2, "value": 2}, seed=1), lora_update(1, {"query": 8, "value": 8}, seed=5)]
    new = method.aggregate(method.initial_state(model), updates, 1)
    dW = sum(0.5 * method.client_delta(u, "query") for u in updates)
    assert torch.allclose(new[EVAL_PREFIX + "query/delta"], dW)
    method.load_state(model, {k: v for k, v in new.items() if not k.startswith(EVAL_PREFIX)}, None)
    method.begin_training(model, ClientTask(2, 2, 0.25, 0), no_batch_loss)  # a rank-2 client, scale 1.5
    U, S, Vh = torch.linalg.svd(dW)
    assert torch.allclose(model.query.delta_weight(), (U[:, :2] * S[:2]) @ Vh[:2], atol=1e-10)


# ------------------------------------------------------------------------------------------------ FedSA-LoRA
def test_fedsa_keeps_the_task_head_on_the_client_by_default_as_its_glue_config():
    method, model = toy("fedsa_lora", "method.lora_rank=1", head=True)
    state = method.initial_state(model)
    assert not any(k.startswith(HEAD_PREFIX) for k in state)  # nothing of the head is broadcast
    method.load_state(model, state, None)
    seeded = model.classifier.weight.detach().clone()
    meta = method.begin_training(model, ClientTask(0, 1, 1.0, 0), no_batch_loss)
    assert model.classifier.weight.requires_grad
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    tensors, local = method.upload(model, ClientTask(0, 1, 1.0, 0), meta)
    assert not any(k.startswith(HEAD_PREFIX) for k in tensors)  # not uplink either
    assert torch.equal(local[HEAD_PREFIX + "classifier.weight"], seeded + 1.0)

    other = {k: v + 1 for k, v in local.items()}
    new = method.aggregate(state, [ClientUpdate(0, tensors, 10, 0.0, client_state=local),
                                   ClientUpdate(1, tensors, 10, 0.0, client_state=other)], 1)
    assert torch.allclose(new[EVAL_PREFIX + HEAD_PREFIX + "classifier.weight"], seeded + 1.5)  # the global model's
    method.load_state(model, {k: v for k, v in new.items() if not k.startswith(EVAL_PREFIX)}, local)
    assert torch.equal(model.classifier.weight, seeded + 1.0)  # a returning client gets its own head back


def test_fedsa_shares_the_head_when_the_option_is_off():
    method, model = toy("fedsa_lora", "method.lora_rank=1", "method.fedsa_local_head=false", head=True)
    assert any(k.startswith(HEAD_PREFIX) for k in method.initial_state(model))
    method.load_state(model, method.initial_state(model), None)
    meta = method.begin_training(model, ClientTask(0, 1, 1.0, 0), no_batch_loss)
    tensors, local = method.upload(model, ClientTask(0, 1, 1.0, 0), meta)
    assert HEAD_PREFIX + "classifier.weight" in tensors and not any(k.startswith(HEAD_PREFIX) for k in local)


# ------------------------------------------------------------------------------------------------ FedEx-LoRA
def test_fedex_round_one_downlink_does_not_count_the_pretrained_weights_every_client_has():
    method, model = toy("fedex_lora", "method.lora_rank=1")
    factors = 8 * (1 * (16 + 16) + 1 * (16 + 8))
    weights = 8 * (16 * 16 + 8 * 16)
    state = method.initial_state(model)
    assert method.downlink_bytes(state, [0, 1, 2]) == 3 * factors
    new = method.aggregate(state, [lora_update(0, {"query": 1, "value": 1}, seed=1),
                                   lora_update(1, {"query": 1, "value": 1}, seed=3)], 1)
    assert method.downlink_bytes(new, [0, 1, 2]) == 3 * (factors + weights)  # the residual changed W: it is sent


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("override, mentions", [
    ("method.name=fed-plora", "method.name"), ("method.lora_alpha=0", "method.lora_alpha"),
    ("method.lora_alpha=.nan", "method.lora_alpha"), ("method.hetlora_gamma=1.5", "method.hetlora_gamma"),
    ("method.hetlora_lambda=-1", "method.hetlora_lambda"), ("method.hetlora_norm=global", "method.hetlora_norm"),
    ("method.fedsa_local_head=maybe", "method.fedsa_local_head")])
def test_bad_method_values_exit_2_with_one_line_naming_the_key(capsys, override, mentions):
    assert main(["run", "--set", override]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and mentions in err
