"""Cohort training (ravan_ray/cohort.py): k clients of a round through one forward pass of the frozen base give
each client the update it gets alone (dropout off), for every method that can be batched and every task."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import TINY_INFO, TINY_OVERRIDES
from ravan_ray import cohort as cohort_module
from ravan_ray.cohort import cohorts, train_cohort
from ravan_ray.config import ConfigError, load_config
from ravan_ray.federation import prepare_data, run_federation
from ravan_ray.methods.base import ClientTask
from ravan_ray.results import TIMING_COLUMNS
from ravan_ray.training import ModelHost, make_optimizer
from test_tasks import COMMON, TASKS, task_overrides
from toys import local_data, one_thread  # noqa: F401  (one_thread: an autouse fixture)

BATCHABLE = ["ravan", "fedit", "ffa_lora", "fedex_lora", "fed_sb", "hetlora", "flexlora", "flora", "fedsa_lora",
             "fedsvd", "rolora", "fed_plora"]
LEVELS = (1.0, 0.5, 0.25)  # a heterogeneous mix: Ravan's K_c, the LoRA ranks of HetLoRA / FlexLoRA / Fed-PLoRA
# float32 with another summation order (one batched matmul against k small ones), then Adam: its first steps divide
# each gradient entry by its own magnitude, so entries near zero carry the rounding noise up to ~2e-5 relative
# (seen on FlexLoRA's lora_B). A real difference between the two paths is orders of magnitude larger.
TOLERANCE = 1e-4


def host_for(*overrides: str) -> ModelHost:
    return ModelHost(load_config(None, [*TINY_OVERRIDES, "federation.local_steps=3", "federation.batch_size=8",
                                        "model.dropout=0", *overrides]), TINY_INFO)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||a||; for a tensor that stays at rounding level (a QA head's bias, whose exact gradient is zero),
    over 1e-3 instead: any two summation orders give it different noise."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / max(float(a.norm()), 1e-3))


def assert_same_updates(solo, together) -> None:
    for alone, batched in zip(solo, together):
        assert alone.client_id == batched.client_id
        assert alone.tensors.keys() == batched.tensors.keys()
        for key in alone.tensors:
            assert relative(alone.tensors[key], batched.tensors[key]) < TOLERANCE, key
        assert batched.train_loss == pytest.approx(alone.train_loss, rel=TOLERANCE)
        assert alone.meta == batched.meta
        assert (alone.client_state is None) == (batched.client_state is None)
        for key in alone.client_state or {}:
            assert relative(alone.client_state[key], batched.client_state[key]) < TOLERANCE, key


def federate_both_ways(host: ModelHost, rounds: int, sizes=(16, 16, 5)):
    """Each round: the clients trained one by one and as one cohort from the same state (the one-by-one updates
    are aggregated, so round 2 starts from a trained state); yields (solo updates, cohort updates, notes)."""
    state, solo_states, cohort_states = host.initial_state(), {}, {}
    for round_index in range(1, rounds + 1):
        tasks = [ClientTask(c, round_index, level, 0) for c, level in enumerate(LEVELS)]
        datas = [local_data(c, n) for c, n in zip(range(len(tasks)), sizes)]  # one client has fewer rows than a batch
        solo = [host.train_client(t, state, solo_states.get(t.client_id), d) for t, d in zip(tasks, datas)]
        notes: list[str] = []
        together = train_cohort(host, tasks, state, [cohort_states.get(t.client_id) for t in tasks], datas, notes.append)
        yield solo, together, notes
        solo_states.update({u.client_id: u.client_state for u in solo if u.client_state})
        cohort_states.update({u.client_id: u.client_state for u in together if u.client_state})
        state = host.method.aggregate(state, solo, round_index)


@pytest.mark.parametrize("name", BATCHABLE)
def test_a_cohort_gives_every_client_its_one_by_one_update_under_a_heterogeneous_compute_mix(name):
    host = host_for(f"method.name={name}")
    for solo, together, notes in federate_both_ways(host, rounds=2):
        assert_same_updates(solo, together)
        if not (name == "fed_sb" and solo[0].meta.get("estimate")):
            assert notes == []  # trained as a cohort, not one by one


def test_fed_sb_estimation_round_trains_its_clients_one_by_one_and_says_so():
    host = host_for("method.name=fed_sb")
    _, _, notes = next(federate_both_ways(host, rounds=1))
    assert notes and "trains" in notes[0] and "base.weight" in notes[0]


def test_full_fine_tuning_falls_back_to_one_by_one_with_one_line():
    host = host_for("method.name=full_ft")
    solo, together, notes = next(federate_both_ways(host, rounds=1))
    assert notes == ["full_ft: a cohort's clients train one by one (full fine-tuning trains a full copy of every "
                     "weight per client)"]
    for alone, batched in zip(solo, together):
        assert all(torch.equal(alone.tensors[k], batched.tensors[k]) for k in alone.tensors)


def test_a_clients_unselected_heads_get_no_update_in_a_cohort(monkeypatch):
    from ravan_ray.methods.ravan import Ravan

    host = host_for("method.name=ravan", "method.heads=4")
    state = host.initial_state()
    state = {k: v + 0.01 if k.endswith("/cores") else v for k, v in state.items()}  # non-zero cores: a leak would show
    seen = []
    upload = Ravan.upload

    def spy(self, model, task, meta):
        for name, layer in self.adapted_modules(model).items():
            unselected = [h for h in range(4) if h not in meta["heads"][name]]
            seen.append((len(unselected), torch.equal(layer.cores.detach()[unselected], state[f"{name}/cores"][unselected])))
        return upload(self, model, task, meta)

    monkeypatch.setattr(Ravan, "upload", spy)
    tasks = [ClientTask(c, 1, level, 0) for c, level in enumerate(LEVELS)]
    train_cohort(host, tasks, state, [None] * 3, [local_data(c) for c in range(3)])
    assert sum(count for count, _ in seen) > 0 and all(same for _, same in seen)


def _stacked_forward_and_grads(layer, stacked, blocks, batched):
    from torch.func import functional_call, vmap

    leaves = {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in stacked.items()}
    if batched:
        out = layer.cohort_forward(blocks, leaves)
    else:
        out = vmap(lambda t, r: functional_call(layer, t, (r,), strict=False))(leaves, blocks)
    out.square().sum().backward()
    return out.detach(), {k: v.grad for k, v in leaves.items() if v.requires_grad}


@pytest.mark.parametrize("case", ["ravan per-client heads", "ravan per-client heads, dense", "ravan shared cores",
                                  "ravan shared cores, dense", "lora", "lora shared A and mask",
                                  "lora per-client rank masks"])
def test_the_adapters_hand_written_cohort_forward_equals_vmap_of_their_forward(case):
    from ravan_ray.adapters import LoRALinear
    from ravan_ray.methods.ravan import RavanLinear

    g = torch.Generator().manual_seed(0)
    clients = 3
    if case.startswith("ravan"):
        layer = RavanLinear(torch.nn.Linear(12, 10).double(), heads=4, rank=2, seed=1, layer_name="q")
        layer.compute = "dense" if case.endswith("dense") else "factorised"
        stacked = {"scales": 1 + 0.1 * torch.randn(clients, 4, generator=g, dtype=torch.float64),
                   "head_mask": torch.tensor([[1, 0, 1, 0], [1, 1, 1, 1], [0, 0, 0, 1]], dtype=torch.bool)}
        if case.startswith("ravan per-client heads"):
            stacked["cores"] = torch.randn(clients, 4, 2, 2, generator=g, dtype=torch.float64)
        else:
            with torch.no_grad():
                layer.cores.normal_(generator=g)
        stacked["held_cores"] = torch.randn(clients, 4, 2, 2, generator=g, dtype=torch.float64)
    else:
        layer = LoRALinear(torch.nn.Linear(12, 10).double(), rank=3, seed=1, layer_name="q", scale=0.5)
        stacked = {"lora_B": torch.randn(clients, 10, 3, generator=g, dtype=torch.float64)}
        if case != "lora shared A and mask":
            stacked["lora_A"] = torch.randn(clients, 3, 12, generator=g, dtype=torch.float64)
        if case == "lora per-client rank masks":
            stacked["rank_mask"] = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 1, 1]], dtype=torch.bool)
    blocks = torch.randn(clients, 2, 5, 12, generator=g, dtype=torch.float64)
    out, grads = _stacked_forward_and_grads(layer, stacked, blocks, batched=True)
    reference, reference_grads = _stacked_forward_and_grads(layer, stacked, blocks, batched=False)
    assert out.shape == reference.shape == (clients, 2, 5, 10)
    assert torch.allclose(out, reference, atol=1e-12)
    assert grads.keys() == reference_grads.keys() and grads
    for name in grads:
        assert torch.allclose(grads[name], reference_grads[name], atol=1e-10), name


def test_a_cohort_whose_frozen_weight_differs_between_clients_maps_the_layers_forward():
    from ravan_ray.adapters import LoRALinear

    layer = LoRALinear(torch.nn.Linear(6, 4), rank=2)
    assert layer.cohort_forward(torch.randn(2, 3, 6), {"base.weight": torch.randn(2, 4, 6)}) is None


def test_adam_on_stacked_tensors_is_adam_on_each_clients_tensor():
    config = load_config(None, ["optimizer.name=adam", "optimizer.weight_decay=0.01"])
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(3, 4, 5, generator=generator, dtype=torch.float64)
    gradients = [torch.randn(3, 4, 5, generator=generator, dtype=torch.float64) for _ in range(4)]
    stacked = start.clone().requires_grad_(True)
    separate = [start[c].clone().requires_grad_(True) for c in range(3)]
    together = make_optimizer(config, [stacked], 0.01)
    alone = [make_optimizer(config, [p], 0.01) for p in separate]
    for gradient in gradients:
        stacked.grad = gradient.clone()
        together.step()
        for c, (param, optimizer) in enumerate(zip(separate, alone)):
            param.grad = gradient[c].clone()
            optimizer.step()
    state = together.state[stacked]
    for c, (param, optimizer) in enumerate(zip(separate, alone)):
        torch.testing.assert_close(stacked.detach()[c], param.detach(), rtol=1e-14, atol=0)
        torch.testing.assert_close(state["exp_avg"][c], optimizer.state[param]["exp_avg"], rtol=1e-14, atol=0)
        torch.testing.assert_close(state["exp_avg_sq"][c], optimizer.state[param]["exp_avg_sq"], rtol=1e-14, atol=0)


def test_a_cohort_that_would_not_fit_in_memory_is_cut_smaller_before_it_runs(monkeypatch):
    host = host_for("method.name=fedit")
    activations = 10_000_000  # what the probe step says one client keeps for its backward pass
    monkeypatch.setattr(cohort_module, "activation_bytes", lambda *args: activations)
    # free memory for about two and a half clients: a cohort of three is cut into cohorts of two (and one)
    monkeypatch.setattr(cohort_module, "free_memory", lambda device: int(2.5 * activations / cohort_module.MEMORY_SHARE))
    solo, together, notes = next(federate_both_ways(host, rounds=1))
    assert notes == ["a cohort of 3 clients would not fit in memory; training cohorts of 2"]
    assert_same_updates(solo, together)


def test_the_memory_probe_counts_what_a_clients_step_saves_for_backward():
    host = host_for("method.name=fedit")
    setup = cohort_module.prepare_client(host, ClientTask(0, 1, 1.0, 0), host.initial_state(), None, local_data(0))
    small = cohort_module.activation_bytes(host, [setup], cohort_module.cohort_modules(host))
    setup.batches = [torch.cat([b, b]) for b in setup.batches]  # twice the rows: about twice the activations
    large = cohort_module.activation_bytes(host, [setup], cohort_module.cohort_modules(host))
    assert small > 0 and 1.8 < large / small < 2.2


def test_cohorts_are_fixed_chunks_of_the_sorted_client_ids():
    assert cohorts([7, 2, 9, 4, 1], 2) == [[1, 2], [4, 7], [9]]
    assert cohorts([3, 1], 1) == [[1], [3]]
    assert cohorts([5, 3, 8], 10) == [[3, 5, 8]]


def test_cohort_size_accepts_positive_integers_and_auto_only():
    assert load_config(None, ["resources.cohort_size=auto"]).resources.cohort_size == "auto"
    assert load_config(None, ["resources.cohort_size=4"]).resources.cohort_size == 4
    for bad in ("0", "-2", "some"):
        with pytest.raises(ConfigError, match="cohort_size"):
            load_config(None, [f"resources.cohort_size={bad}"])


@pytest.mark.parametrize("task", TASKS)
def test_every_tasks_per_row_losses_give_its_batch_loss_and_a_padded_cohort_its_clients_updates(tiny, task):
    # SGD: a QA head's bias has a gradient of exactly zero in theory (the softmax over positions shifts with it), so
    # Adam, which normalises the step, would move it by rounding noise alone, differently in any two summation orders
    config = load_config(None, [*COMMON, *task_overrides(tiny, task), "method.name=fedit", "model.dropout=0",
                                "optimizer.name=sgd", "optimizer.lr=0.05", "federation.num_clients=3",
                                "federation.local_steps=2", "federation.batch_size=4"])
    data = prepare_data(config)
    host = ModelHost(config, data.task_info)
    local = [{k: v[rows] for k, v in data.train.items()} for rows in data.partitions]
    rows = np.arange(min(4, len(data.partitions[0])))
    inputs = host.task.batch(local[0], rows, host.device)
    with torch.no_grad():
        sums, counts = host.task.row_losses(host.model, inputs)
        assert float(sums.sum() / counts.sum()) == pytest.approx(float(host.task.loss(host.model, inputs)), rel=1e-5)
    state = host.initial_state()
    tasks = [ClientTask(c, 1, 1.0, config.seed) for c in range(3)]
    solo = [host.train_client(t, state, None, d) for t, d in zip(tasks, local)]
    assert_same_updates(solo, train_cohort(host, tasks, state, [None] * 3, local))


def deterministic(run_dir) -> pd.DataFrame:
    return pd.read_csv(run_dir / "metrics.csv").drop(columns=list(TIMING_COLUMNS))


def test_cohort_runs_agree_across_actor_modes_and_resume_and_match_the_one_by_one_run(ray_session, tiny_config,
                                                                                      tmp_path):
    common = ("model.dropout=0", "compute.distribution=uniform", "federation.rounds=3")
    run_federation(tiny_config(*common), tmp_path / "solo")
    pool = tiny_config(*common, "resources.cohort_size=3", "resources.actor_mode=pool")
    run_federation(pool, tmp_path / "pool")
    run_federation(tiny_config(*common, "resources.cohort_size=3", "resources.actor_mode=per_client"),
                   tmp_path / "per_client")
    pd.testing.assert_frame_equal(deterministic(tmp_path / "pool"), deterministic(tmp_path / "per_client"))
    # interrupted after round 2 (its checkpoint kept, round 3's removed) and resumed: bit-identical
    resumed = tmp_path / "resumed"
    import shutil

    shutil.copytree(tmp_path / "pool", resumed)
    shutil.rmtree(resumed / "checkpoints" / "round_00003")
    frame = pd.read_csv(resumed / "metrics.csv")
    frame[frame["round"] <= 2].to_csv(resumed / "metrics.csv", index=False)
    run_federation(pool, resumed, resume=True)
    pd.testing.assert_frame_equal(deterministic(tmp_path / "pool"), deterministic(resumed))
    solo, together = deterministic(tmp_path / "solo"), deterministic(tmp_path / "pool")
    for column in ("train_loss", "agg_error", "test_loss"):
        np.testing.assert_allclose(together[column], solo[column], rtol=1e-5)
    assert (together["uplink_bytes"] == solo["uplink_bytes"]).all()
    assert not math.isnan(together["test_accuracy"].iloc[-1])
