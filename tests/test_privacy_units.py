"""What an epsilon is for: the privacy unit of DP-SGD (an example's own gradient, its windows' gradients summed, clipped
to C), the client sampler the accountant analyses (Poisson with the fixed denominator, or fixed-size under
replace-one neighbours) and the random streams DP draws from. Ray-free."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TINY_OVERRIDES
from ravan_ray.config import load_config
from ravan_ray.federation import client_examples, prepare_data, round_clients, sample_clients
from ravan_ray.methods.base import ClientTask, ClientUpdate
from ravan_ray.privacy import build_mechanism, summary_line
from ravan_ray.privacy.accounting import epsilon_for
from ravan_ray.privacy.client_level import privatize_updates
from ravan_ray.privacy.dp_sgd import DPSGD, NOISE_STREAM, row_groups
from ravan_ray.tasks.base import EXAMPLE_KEY
from ravan_ray.training import ModelHost
from test_tasks import task_config

import dp_accounting


# ----------------------------------------------------------------------------------------------- DP-SGD's unit
def _host_ready_to_train(config, data):
    host = ModelHost(config, data.task_info)
    host.load(host.initial_state())
    task = ClientTask(0, 1, 1.0, config.seed)
    host.method.begin_training(host.model, task, lambda: None)
    # no dropout (an example's gradient alone and in the batch are then the same computation): every module in
    # evaluation mode but those with trainable parameters of their own, which Opacus hooks only in training mode
    host.model.eval()
    for module in host.model.modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            module.train()
    return host


def _batch_of_examples(local, wanted: int) -> np.ndarray:
    """Rows of the first ``wanted`` examples (all their rows), with the example of the most rows among them."""
    if EXAMPLE_KEY not in local:
        return np.arange(wanted)
    examples = local[EXAMPLE_KEY]
    counts = {e: int((examples == e).sum()) for e in np.unique(examples)}
    chosen = sorted(counts, key=lambda e: -counts[e])[:1] + [e for e in np.unique(examples)][:wanted - 1]
    chosen = list(dict.fromkeys(chosen))[:wanted]
    return np.flatnonzero(np.isin(examples, chosen))


@pytest.mark.parametrize("task", ["causal_lm", "seq2seq", "question_answering"])
def test_dp_sgd_clips_each_examples_own_gradient_so_its_share_of_the_sum_is_at_most_the_clip_norm(tiny, task):
    """Before noise, DP-SGD's summed gradient of a batch is sum over its examples of clip_C(g_e), g_e the gradient
    of example e computed alone (QA: the sum of its windows' gradients): every example's contribution has norm <= C
    and depends on that example alone (not on the batch's token counts or widths)."""
    config = task_config(tiny, task, "method.name=fedit", "privacy.mode=sample", "privacy.noise_multiplier=0",
                         "privacy.clip_norm=1", "privacy.delta=1e-3")
    data = prepare_data(config)
    host = _host_ready_to_train(config, data)
    local = {k: v[data.partitions[0]] for k, v in data.train.items()}
    rows = _batch_of_examples(local, 4)
    examples = local.get(EXAMPLE_KEY, np.arange(len(local["input_ids"])))
    groups = row_groups(examples[rows])
    params = [p for p in host.model.parameters() if p.requires_grad]
    if task == "question_answering":
        assert int(torch.bincount(groups).max()) >= 2  # an example of several windows is in the batch

    own = []  # each example's gradient alone: the sum over its rows of each row's own loss
    for e in range(int(groups.max()) + 1):
        its_rows = rows[groups.numpy() == e]
        loss = host._loss(local, torch.from_numpy(its_rows)) * len(its_rows)
        own.append(torch.autograd.grad(loss, params))
    own_norms = torch.tensor([float(torch.sqrt(sum(g.double().pow(2).sum() for g in grads))) for grads in own])
    clip_norm = float(own_norms.median())  # some examples clipped, some not

    dp = DPSGD(host.model, torch.optim.SGD(params, lr=0.0), 0.0, clip_norm, len(own),
               torch.Generator().manual_seed(0))
    try:
        dp.zero_grad()
        host._loss(local, torch.from_numpy(rows)).backward()
        dp.sum_rows_per_example(groups)
        per_example = torch.stack([p.grad_sample.flatten(1).double().norm(dim=1) for p in params], 1).norm(dim=1)
        torch.testing.assert_close(per_example, own_norms.double(), rtol=1e-3, atol=1e-7)
        dp.optimizer.clip_and_accumulate()
        factors = (clip_norm / (own_norms + 1e-6)).clamp(max=1.0)
        assert float((factors * own_norms).max()) <= clip_norm * (1 + 1e-6)  # every share is at most C
        summed = torch.cat([p.summed_grad.flatten().double() for p in params])
        expected = torch.cat([sum(float(f) * grads[i] for f, grads in zip(factors, own)).flatten().double()
                              for i in range(len(params))])
        # float32 gradients of a batch against each example's alone: equal up to rounding (in norm, over all
        # parameters: a QA head's bias has a gradient of rounding size only, the softmax being shift-invariant)
        assert float((summed - expected).norm()) <= 1e-3 * float(expected.norm())
    finally:
        dp.close()


def test_question_answering_dp_sgd_samples_examples_with_all_their_windows_at_the_example_rate(tiny):
    config = task_config(tiny, "question_answering", "privacy.mode=sample", "privacy.noise_multiplier=1",
                         "privacy.clip_norm=1", "privacy.delta=1e-3")
    data = prepare_data(config)
    windows = data.train[EXAMPLE_KEY]
    sizes = client_examples(data)
    assert sizes == [len(np.unique(windows[rows])) for rows in data.partitions]
    assert sum(sizes) < sum(len(rows) for rows in data.partitions)  # fewer examples than windows
    budget = build_mechanism(config).plan_budget(sizes, [[1]] * len(sizes))
    assert budget.sample_rates == tuple(min(1.0, 8 / n) for n in sizes)  # batch_size / the client's examples
    local = windows[data.partitions[0]]
    for batch in ModelHost._example_batches(local, 4, 8, torch.Generator().manual_seed(0)):
        chosen = np.unique(local[batch.numpy()])
        assert len(chosen) == min(8, sizes[0])
        assert np.array_equal(batch.numpy(), np.flatnonzero(np.isin(local, chosen)))  # every window of each


# ----------------------------------------------------------------------------------------------- client sampling
def _client_config(*overrides):
    return load_config(None, [*TINY_OVERRIDES, "privacy.mode=client", "privacy.noise_multiplier=1",
                              "privacy.clip_norm=1", "privacy.delta=1e-3", *overrides])


def _dp_accounting_epsilon(accountant, event, rounds, delta):
    accountant.compose(event, rounds)
    return accountant.get_epsilon(delta)


def test_client_dp_defaults_to_poisson_sampling_and_its_epsilon_is_dp_accountings_add_or_remove_one():
    config = _client_config("federation.num_clients=20", "federation.rounds=50")
    mechanism = build_mechanism(config)
    budget = mechanism.plan_budget([10] * 20, [[]] * 20)
    expected = _dp_accounting_epsilon(
        dp_accounting.rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE),
        dp_accounting.PoissonSampledDpEvent(3 / 20, dp_accounting.GaussianDpEvent(1.0)), 50, 1e-3)
    assert budget.epsilon(50) == pytest.approx(expected, rel=1e-9) == pytest.approx(6.14, abs=0.01)
    summary = mechanism.summary(budget.epsilon(50))
    assert (summary["sampler"], summary["neighbour_relation"]) == ("poisson", "add_or_remove_one")
    assert "poisson sampling, add or remove one neighbours" in summary_line(summary)
    assert config.privacy.sampler == "poisson" and load_config(None, TINY_OVERRIDES).privacy.sampler == "fixed"


def test_fixed_size_client_sampling_is_accounted_without_replacement_under_replace_one_neighbours():
    """Exactly m of N clients, replace-one: a replaced client moves the clipped sum by up to 2 C, so the Gaussian
    event's noise multiplier is z / 2 (20 clients, 3 a round, z = 1, 50 rounds, delta 1e-3: ~67.5)."""
    config = _client_config("federation.num_clients=20", "federation.rounds=50", "privacy.client_sampling=fixed")
    mechanism = build_mechanism(config)
    budget = mechanism.plan_budget([10] * 20, [[]] * 20)
    expected = _dp_accounting_epsilon(
        dp_accounting.rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE),
        dp_accounting.SampledWithoutReplacementDpEvent(20, 3, dp_accounting.GaussianDpEvent(0.5)), 50, 1e-3)
    assert budget.epsilon(50) == pytest.approx(expected, rel=1e-9) == pytest.approx(67.5, abs=0.1)
    summary = mechanism.summary(budget.epsilon(50))
    assert (summary["sampler"], summary["neighbour_relation"]) == ("fixed", "replace_one")
    # calibration to a target epsilon uses the same accountant
    target = _client_config("federation.num_clients=20", "federation.rounds=50", "privacy.client_sampling=fixed",
                            "privacy.noise_multiplier=null", "privacy.target_epsilon=8")
    z = build_mechanism(target).plan_budget([10] * 20, [[]] * 20).noise_multiplier
    assert epsilon_for(3 / 20, z, 50, 1e-3, budget.sampling) == pytest.approx(8, rel=1e-3)


def test_poisson_sampling_draws_each_client_at_rate_q_and_fixed_sampling_exactly_m():
    draws = [sample_clients(7, r, 20, 3, poisson=True) for r in range(1, 2001)]
    counts = np.bincount([c for d in draws for c in d], minlength=20) / 2000
    assert np.allclose(counts, 3 / 20, atol=0.03)
    assert {len(d) for d in draws} >= {0, 3, 6}  # the round size varies, empty rounds included
    assert draws[:5] == [sample_clients(7, r, 20, 3, poisson=True) for r in range(1, 6)]  # seeded
    assert all(len(sample_clients(7, r, 20, 3)) == 3 for r in range(1, 50))
    config = _client_config()
    assert round_clients(config, 4) == sample_clients(config.seed, 4, 6, 3, poisson=True)


def test_under_poisson_sampling_the_server_divides_the_noised_sum_by_the_expected_count_not_by_who_trained():
    from test_privacy import _method_and_state

    config, method, state, generator = _method_and_state(
        "method.name=fedit", "model.train_head=false", "privacy.mode=client", "privacy.noise_multiplier=0",
        "privacy.clip_norm=1e6", "privacy.delta=1e-3")
    updates = [ClientUpdate(c, {k: v + torch.randn(v.shape, generator=generator) for k, v in state.items()}, 10, 0.0)
               for c in range(2)]  # 2 trained; q N = clients_per_round = 3
    private, _ = privatize_updates(method, config, state, updates, 1, 0.0, 1e6)
    aggregated = method.aggregate(state, private, 1)
    for key in state:
        expected = state[key].double() + sum(u.tensors[key].double() - state[key].double() for u in updates) / 3
        torch.testing.assert_close(aggregated[key].double(), expected, rtol=1e-5, atol=1e-5)
    fixed = config.model_copy(deep=True)
    fixed.privacy = fixed.privacy.model_copy(update={"client_sampling": "fixed"})
    aggregated = method.aggregate(state, privatize_updates(method, fixed, state, updates, 1, 0.0, 1e6)[0], 1)
    for key in state:  # fixed-size sampling: the mean over the clients that trained
        expected = sum(u.tensors[key].double() for u in updates) / 2
        torch.testing.assert_close(aggregated[key].double(), expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------- random streams
def test_dp_sgd_noise_generator_is_built_on_the_models_device(monkeypatch):
    """Opacus draws the noise on the parameters' device: the generator is asked for on that device (CPU here)."""
    from ravan_ray.privacy.dp_sgd import SampleLevel

    config = load_config(None, [*TINY_OVERRIDES, "method.name=fedit", "privacy.mode=sample",
                                "privacy.noise_multiplier=1", "privacy.clip_norm=1", "privacy.delta=1e-3"])
    data = prepare_data(config)
    host = ModelHost(config, data.task_info)
    asked, built = [], []
    original = ClientTask.generator

    def spy(self, stream=0, device="cpu"):
        asked.append((stream, torch.device(device)))
        return original(self, stream, device)

    real_init = DPSGD.__init__

    def record(self, model, optimizer, z, c, b, generator, after_noise=None):
        built.append(generator.device)
        real_init(self, model, optimizer, z, c, b, generator, after_noise)

    monkeypatch.setattr(ClientTask, "generator", spy)
    monkeypatch.setattr(DPSGD, "__init__", record)
    local = {k: v[data.partitions[0]] for k, v in data.train.items()}
    host.train_client(ClientTask(0, 1, 1.0, config.seed), host.initial_state(), None, local)
    device = next(p.device for p in host.model.parameters())
    assert (NOISE_STREAM, device) in asked and built == [device]
    assert isinstance(host.privacy, SampleLevel)


def test_flora_fresh_factors_and_dp_sgd_noise_draw_from_distinct_streams():
    from ravan_ray.methods.fed_plora import SELECT_STREAM
    from ravan_ray.methods.flora import FRESH_A_STREAM

    training_loop = {0, 1, 2, 3}  # batches, scoring, dropout, scoring batch
    streams = [NOISE_STREAM, FRESH_A_STREAM, SELECT_STREAM]
    assert len(set(streams)) == len(streams) and not set(streams) & training_loop
    task = ClientTask(1, 2, 1.0, 0)
    assert not torch.equal(torch.randn(8, generator=task.generator(NOISE_STREAM)),
                           torch.randn(8, generator=task.generator(FRESH_A_STREAM)))
