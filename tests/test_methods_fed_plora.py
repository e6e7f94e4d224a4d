"""Fed-PLoRA: parallel one-rank modules; Select-N-Fold trains r_i of them and folds the rest into W, so a client
starts from exactly the global model; the server averages each module over the clients that trained it."""

from __future__ import annotations

from functools import partial

import torch
from hypothesis import given, settings, strategies as st

from conftest import TINY_INFO, TINY_OVERRIDES
from ravan_ray.config import load_config
from ravan_ray.methods import build_method
from ravan_ray.methods.base import ClientTask, ClientUpdate
from ravan_ray.methods.fed_plora import fold
from ravan_ray.training import ModelHost
from toys import make_toy, one_thread, rand, local_data  # noqa: F401  (one_thread: an autouse fixture)

toy = partial(make_toy, "fed_plora", rank=4, d_in=6, d_out=5)


def applied_weight(layer) -> torch.Tensor:
    """The weight an adapted layer applies: its base plus the adapter's update."""
    return layer.base.weight + layer.delta_weight().to(layer.base.weight.dtype)


def trained_state(host: ModelHost) -> dict:
    state = host.initial_state()
    state.update({k: rand(*v.shape, seed=i).float() * 0.1 for i, (k, v) in enumerate(state.items()) if "lora_B" in k})
    return state


def no_batch_loss():
    raise AssertionError("not needed by this method")


def test_select_n_fold_starts_a_low_rank_client_from_exactly_the_global_model():
    host = ModelHost(load_config(None, [*TINY_OVERRIDES, "method.name=fed_plora"]), TINY_INFO)
    state = trained_state(host)
    host.load(state)
    global_weights = {name: applied_weight(layer).detach().clone() for name, layer in host.adapted.items()}
    meta = host.method.begin_training(host.model, ClientTask(1, 2, 0.25, 0), no_batch_loss)  # r_i = 2 of R = 8
    for name, layer in host.adapted.items():
        assert len(meta["modules"][name]) == 2
        assert torch.allclose(applied_weight(layer), global_weights[name], atol=1e-6)  # no initialisation noise
    # HetLoRA's truncation, by contrast, starts the same client from the global model minus its last 6 ranks
    het = ModelHost(load_config(None, [*TINY_OVERRIDES, "method.name=hetlora"]), TINY_INFO)
    het.load(state)
    het.method.begin_training(het.model, ClientTask(1, 2, 0.25, 0), no_batch_loss)
    assert any(not torch.allclose(applied_weight(layer), global_weights[name], atol=1e-4)
               for name, layer in het.adapted.items())


def test_a_client_trains_and_uploads_only_its_selected_modules():
    host = ModelHost(load_config(None, [*TINY_OVERRIDES, "method.name=fed_plora"]), TINY_INFO)
    state = trained_state(host)
    update = host.train_client(ClientTask(1, 2, 0.5, 0), state, None, local_data(1))  # r_i = 4
    for name, layer in host.adapted.items():
        chosen = update.meta["modules"][name]
        assert len(chosen) == 4 and update.tensors[f"{name}/lora_B"].shape[1] == 4
        assert update.tensors[f"{name}/lora_A"].shape[0] == 4
        assert not torch.equal(update.tensors[f"{name}/lora_B"], state[f"{name}/lora_B"][:, chosen])  # trained
        others = [j for j in range(layer.rank) if j not in chosen]
        assert torch.equal(layer.lora_A.detach()[others], state[f"{name}/lora_A"][others])  # the folded did not


def test_the_selection_is_random_per_client_and_round_and_reproducible():
    method, model = toy()
    method.load_state(model, method.initial_state(model), None)
    picks = {}
    for client, round_index in ((0, 1), (1, 1), (0, 2), (0, 1)):
        meta = method.begin_training(model, ClientTask(client, round_index, 0.5, 7), no_batch_loss)
        picks.setdefault((client, round_index), []).append(meta["modules"]["query"])
        method.load_state(model, method.initial_state(model), None)
    assert picks[0, 1][0] == picks[0, 1][1]  # the same (seed, round, client): the same modules
    assert len({tuple(p[0]) for p in picks.values()}) > 1


def test_each_module_is_the_mean_over_the_clients_that_trained_it_and_the_rest_keep_their_values():
    method, model = toy()  # R = 4
    state = method.initial_state(model)
    state["query/lora_B"] = rand(5, 4, seed=1)
    b = {c: rand(5, 2, seed=10 + c) for c in range(3)}
    a = {c: rand(2, 6, seed=20 + c) for c in range(3)}
    selections = {0: [0, 1], 1: [1, 2], 2: [1, 2]}
    updates = [ClientUpdate(c, {"query/lora_B": b[c], "query/lora_A": a[c]}, 10 * (c + 1), 0.0,
                            meta={"modules": {"query": selections[c]}}) for c in range(3)]
    new = method.aggregate(state, updates, 2)
    B, A = new["query/lora_B"], new["query/lora_A"]
    assert torch.allclose(B[:, 0], b[0][:, 0]) and torch.allclose(A[0], a[0][0])  # one trainer
    assert torch.allclose(B[:, 1], (b[0][:, 1] + b[1][:, 0] + b[2][:, 0]) / 3)  # three trainers, uniform weights
    assert torch.allclose(A[2], (a[1][1] + a[2][1]) / 2)
    assert torch.equal(B[:, 3], state["query/lora_B"][:, 3]) and torch.equal(A[3], state["query/lora_A"][3])
    assert method.downlink_bytes(new, [0, 1]) == 2 * (5 * 4 + 4 * 6) * 8  # all R modules to every client


@settings(max_examples=60, deadline=None)
@given(d_out=st.integers(1, 10), d_in=st.integers(1, 10), rank=st.integers(1, 8), scale=st.floats(0.1, 4.0),
       data=st.data())
def test_folding_the_unselected_modules_leaves_the_layers_function_unchanged(d_out, d_in, rank, scale, data):
    selected = data.draw(st.sets(st.integers(0, rank - 1)))
    seed = data.draw(st.integers(0, 2**31 - 1))
    W, B, A = rand(d_out, d_in, seed=seed), rand(d_out, rank, seed=seed + 1), rand(rank, d_in, seed=seed + 2)
    folded = [j for j in range(rank) if j not in selected]
    mask = torch.zeros(rank, dtype=torch.float64)
    mask[list(selected)] = 1
    assert torch.allclose(fold(W, B, A, folded, scale) + scale * (B * mask) @ A, W + scale * B @ A, atol=1e-10)


def test_with_every_client_at_full_rank_nothing_is_folded_and_the_aggregate_is_fedits():
    method, model = toy()  # R = 4
    method.load_state(model, method.initial_state(model), None)
    pretrained = model.query.base.weight.detach().clone()
    meta = method.begin_training(model, ClientTask(0, 1, 1.0, 0), no_batch_loss)
    assert meta["modules"]["query"] == [0, 1, 2, 3] and torch.equal(model.query.base.weight, pretrained)

    fedit = build_method(load_config(None, ["method.name=fedit", "method.lora_rank=4", "model.target_modules=[query]",
                                            "federation.num_clients=6"]))
    state = method.initial_state(model)
    updates = [ClientUpdate(c, {"query/lora_B": rand(5, 4, seed=c), "query/lora_A": rand(4, 6, seed=10 + c)},
                            10, 0.0, meta={"modules": {"query": [0, 1, 2, 3]}}) for c in range(3)]
    ours, theirs = method.aggregate(state, updates, 1), fedit.aggregate(state, updates, 1)
    assert torch.allclose(ours["query/lora_B"], theirs["query/lora_B"])
    assert torch.allclose(ours["query/lora_A"], theirs["query/lora_A"])
