"""Differential privacy: the accountant against the library, clipping bounds, the noise on the sum, Ravan's per-head
update (s_i H_i, head subsets), DP-SGD, z = 0 with C = inf equal to no privacy, seeded noise across a resume, and
one-line errors for bad privacy settings."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import TINY_OVERRIDES, tiny_model
from ravan_ray.cli import format_summary, main
from ravan_ray.config import load_config
from ravan_ray.federation import run_federation
from ravan_ray.methods import build_method
from ravan_ray.methods.base import ClientUpdate
from ravan_ray.methods.lora import factor_product
from ravan_ray.methods.private_terms import NOISE_STD
from ravan_ray.privacy.accounting import calibrate_noise, epsilon_for
from ravan_ray.privacy.client_level import clip, gaussian_noise, global_norm, noise_generator, privatize_updates
from ravan_ray.results import TIMING_COLUMNS

TINY_ARGS = [arg for o in TINY_OVERRIDES for arg in ("--set", o)]


# ----------------------------------------------------------------------------------------------- accountant
@pytest.mark.parametrize("q, z, steps", [(0.15, 1.0, 12), (3 / 20, 2.5, 100), (0.01, 1.1, 10_000)])
def test_accountant_epsilon_matches_dp_accounting_rdp_for_known_q_z_t(q, z, steps):
    import dp_accounting

    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps)
    assert epsilon_for(q, z, steps, 1e-5) == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-12)


def test_calibrated_noise_multiplier_spends_the_target_epsilon_over_the_run():
    z = calibrate_noise(3.0, 1e-5, [(0.15, 12)])
    assert epsilon_for(0.15, z, 12, 1e-5) <= 3.0 + 1e-6
    assert epsilon_for(0.15, 0.97 * z, 12, 1e-5) > 3.0  # and not much more noise than that needs


def test_calibration_over_clients_holds_for_the_client_that_spends_most():
    usage = [(0.5, 20), (0.25, 40)]
    z = calibrate_noise(2.0, 1e-5, usage)
    assert max(epsilon_for(q, z, s, 1e-5) for q, s in usage) == pytest.approx(2.0, rel=1e-3)


# ----------------------------------------------------------------------------------------------- clipping
@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=12), st.floats(1e-3, 1e3))
def test_clipping_bounds_every_update_norm_and_leaves_small_ones_unchanged(values, clip_norm):
    delta = {"a": torch.tensor(values[: len(values) // 2 + 1], dtype=torch.float64),
             "b": torch.tensor(values[len(values) // 2 + 1:], dtype=torch.float64)}
    clipped, was_clipped = clip(delta, clip_norm)
    assert global_norm(clipped) <= clip_norm * (1 + 1e-12)
    if global_norm(delta) <= clip_norm:
        assert not was_clipped and all(clipped[k] is delta[k] for k in delta)


def _method_and_state(*overrides):
    from ravan_ray.training import with_targets

    config = load_config(None, [*TINY_OVERRIDES, *overrides])
    model = tiny_model(config).model
    config = with_targets(config, model)
    method = build_method(config)
    object.__setattr__(model, "ravan_head_parameters", [])
    object.__setattr__(model, "ravan_adapted", method.wrap_model(model))
    state = method.initial_state(model)
    generator = torch.Generator().manual_seed(1)
    state = {k: torch.randn(v.shape, generator=generator) for k, v in state.items()}
    return config, method, state, generator


def _ravan_update(state, client, heads, scale, generator, move_cores=True):
    tensors, meta = {}, {}
    for key in state:
        layer = key[: -len("/cores")]
        cores = state[key][heads] + (0.5 * torch.randn(state[key][heads].shape, generator=generator) if move_cores else 0)
        tensors[key] = scale * cores  # what Ravan uploads: s_i H_i of the heads it trained
        meta[layer] = heads
    return ClientUpdate(client, tensors, 10, 0.0, {"heads": meta, "heads_trained": len(heads)})


def test_ravan_update_is_s_h_minus_broadcast_on_trained_heads_and_zero_on_the_others():
    _, method, state, generator = _method_and_state("method.name=ravan", "model.train_head=false")
    # a client that trained heads 1 and 3 and only moved s_i (H_i unchanged): its update is (s_i - 1) H_i
    update = _ravan_update(state, 0, [1, 3], 1.5, generator, move_cores=False)
    delta = method.privacy_delta(state, update)
    for key, tensor in delta.items():
        assert tensor.shape == state[key].shape
        torch.testing.assert_close(tensor[[1, 3]], 0.5 * state[key][[1, 3]].double(), rtol=1e-6, atol=1e-6)
        assert not tensor[[0, 2]].any()


def test_privatized_uploads_of_ravan_clients_with_head_subsets_all_have_clipped_norms():
    config, method, state, generator = _method_and_state(
        "method.name=ravan", "model.train_head=false", "privacy.mode=client", "privacy.noise_multiplier=0",
        "privacy.clip_norm=0.3", "privacy.delta=1e-3")
    updates = [_ravan_update(state, c, heads, 1.2, generator)
               for c, heads in enumerate([[0, 1, 2, 3], [1, 3], [2]])]
    private, metrics = privatize_updates(method, config, state, updates, 1, 0.0, 0.3)
    assert metrics["clip_fraction"] == 1.0
    for update in private:
        assert global_norm(method.privacy_delta(state, update)) <= 0.3 * (1 + 1e-6)
    # the client with one head has the smallest update before clipping
    norms = [global_norm(method.privacy_delta(state, u)) for u in updates]
    assert norms[2] < norms[1] < norms[0]


def test_noise_lands_on_ravans_per_head_means_divided_by_each_heads_trainers():
    config, method, state, generator = _method_and_state(
        "method.name=ravan", "model.train_head=false", "privacy.mode=client", "privacy.noise_multiplier=1",
        "privacy.clip_norm=100", "privacy.delta=1e-3")
    heads = [[0, 1], [1], [1, 2]]  # head 0: one trainer, head 1: three, head 2: one, head 3: none
    updates = [_ravan_update(state, c, h, 1.0, generator) for c, h in enumerate(heads)]
    private, _ = privatize_updates(method, config, state, updates, 4, 1.0, 100.0)
    noisy, clean = method.aggregate(state, private, 4), method.aggregate(state, updates, 4)
    noise = gaussian_noise(method.privacy_delta(state, updates[0]), 100.0, noise_generator(config.seed, 4))
    for key in state:
        difference = noisy[key].double() - clean[key].double()
        torch.testing.assert_close(difference[[0, 2]], noise[key][[0, 2]], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(difference[1], noise[key][1] / 3, rtol=1e-5, atol=1e-4)
        assert not difference[3].any()  # nobody trained head 3: it keeps its value, no noise


def test_noise_on_an_averaging_method_is_the_sums_noise_over_m():
    config, method, state, generator = _method_and_state(
        "method.name=fedit", "model.train_head=false", "privacy.mode=client", "privacy.noise_multiplier=0.5",
        "privacy.clip_norm=1e6", "privacy.delta=1e-3")
    updates = [ClientUpdate(c, {k: v + torch.randn(v.shape, generator=generator) for k, v in state.items()}, 10, 0.0)
               for c in range(3)]
    private, _ = privatize_updates(method, config, state, updates, 2, 0.5, 1e6)
    assert all(u.meta[NOISE_STD] == 0.5e6 for u in private)  # z C travels with the uploads, for post-processing
    noise = gaussian_noise(method.privacy_delta(state, updates[0]), 0.5e6, noise_generator(config.seed, 2))
    noisy, clean = method.aggregate(state, private, 2), method.aggregate(state, updates, 2)
    for key in state:
        torch.testing.assert_close(noisy[key].double() - clean[key].double(), noise[key] / 3, rtol=1e-4, atol=1.0)


# ------------------------------------------------------------- methods whose rule needs more than the uploads' sum
PRODUCT_AND_SLICE_METHODS = ["fed_plora", "fedex_lora", "flora", "flexlora", "hetlora"]


def _round_two_updates(method_name: str, *overrides: str):
    """(config, method, round 2's broadcast state, three clients' real round-2 updates at levels 1, 0.5 and 0.25)."""
    from ravan_ray.federation import prepare_data
    from ravan_ray.methods.base import ClientTask
    from ravan_ray.training import ModelHost

    config = load_config(None, [*TINY_OVERRIDES, f"method.name={method_name}", "privacy.mode=client",
                                "privacy.noise_multiplier=1", "privacy.clip_norm=1", "privacy.delta=1e-3",
                                "method.hetlora_lambda=0", *overrides])
    data = prepare_data(config)
    host = ModelHost(config, data.task_info)
    state = host.initial_state()
    for round_index in (1, 2):
        updates = []
        for client, level in enumerate((1.0, 0.5, 0.25)):
            local = {k: v[data.partitions[client]] for k, v in data.train.items()}
            updates.append(host.train_client(ClientTask(client, round_index, level, config.seed), state, None, local))
        if round_index == 1:
            state = host.method.aggregate(state, updates, 1)
    return config, host.method, state, updates


@pytest.mark.parametrize("method_name", PRODUCT_AND_SLICE_METHODS)
def test_zero_noise_and_no_clipping_reproduce_each_methods_own_aggregate(method_name):
    """The per-client terms each method clips (slices, effective-weight changes, norm-weighted factors) rebuild its
    server rule exactly: with z = 0 and C = inf the private aggregate is the non-private one (float64 rounding)."""
    config, method, state, updates = _round_two_updates(method_name)
    private, metrics = privatize_updates(method, config, state, updates, 2, 0.0, float("inf"))
    assert metrics["clip_fraction"] == 0.0
    clean, noised = method.aggregate(state, updates, 2), method.aggregate(state, private, 2)
    shared = [k for k in clean if k in noised and clean[k].is_floating_point()]
    assert any(k.endswith(("/lora_B", "/base_weight")) for k in shared)
    if method_name == "flexlora":  # an SVD's singular vectors are defined up to sign: compare the products B A
        for layer in method.ranks:
            torch.testing.assert_close(factor_product(noised, layer), factor_product(clean, layer),
                                       rtol=1e-5, atol=1e-6)
        shared = [k for k in shared if not k.endswith(("/lora_A", "/lora_B"))]
    for key in shared:
        torch.testing.assert_close(noised[key], clean[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("method_name", PRODUCT_AND_SLICE_METHODS)
def test_clipped_noised_updates_of_each_method_aggregate_to_a_finite_state_that_moved(method_name):
    config, method, state, updates = _round_two_updates(method_name)
    norms = [global_norm(method.privacy_delta(state, u)) for u in updates]
    clip_norm = float(np.median(norms))
    private, metrics = privatize_updates(method, config, state, updates, 2, 1.0, clip_norm)
    assert 0 < metrics["clip_fraction"] < 1 and metrics["update_norm"] == pytest.approx(clip_norm)
    noised, clean = method.aggregate(state, private, 2), method.aggregate(state, updates, 2)
    assert all(torch.isfinite(v).all() for v in noised.values() if v.is_floating_point())
    assert any(not torch.equal(noised[k], clean[k]) for k in clean if k.endswith(("/lora_B", "/base_weight")))


def test_noise_lands_on_fed_ploras_per_module_means_divided_by_each_modules_trainers():
    config, method, state, updates = _round_two_updates("fed_plora", "model.train_head=false")
    private, _ = privatize_updates(method, config, state, updates, 2, 1.0, 1e3)
    unclipped, _ = privatize_updates(method, config, state, updates, 2, 0.0, 1e3)
    noisy, clean = method.aggregate(state, private, 2), method.aggregate(state, unclipped, 2)
    noise = gaussian_noise(method.privacy_delta(state, updates[0]), 1e3, noise_generator(config.seed, 2))
    for layer, rank in method.ranks.items():
        trainers = torch.tensor([sum(j in u.meta["modules"][layer] for u in updates) for j in range(rank)])
        key = f"{layer}/lora_A"
        difference = noisy[key].double() - clean[key].double()
        for module in range(rank):
            if trainers[module] == 0:
                assert not difference[module].any()  # nobody trained it: it keeps its value, no noise
            else:
                torch.testing.assert_close(difference[module], noise[key][module] / trainers[module],
                                           rtol=1e-4, atol=1e-2)


def test_flora_under_client_dp_broadcasts_the_noised_merged_update_not_the_clients_stacks():
    config, method, state, updates = _round_two_updates("flora")
    private, _ = privatize_updates(method, config, state, updates, 2, 1.0, 1.0)
    noised = method.aggregate(state, private, 2)
    assert not any(k.endswith(("/stack_A", "/stack_B")) for k in noised)  # they would publish each client's factors
    dense = sum(noised[f"{layer}/base_weight"].numel() * noised[f"{layer}/base_weight"].element_size()
                for layer in method.ranks)
    assert int(noised["eval/flora/stack_bytes"][-1]) == dense


def test_hetlora_keeps_the_broadcast_factors_where_the_noised_sum_of_norms_is_within_three_noise_stds():
    from dataclasses import replace

    config, method, state, updates = _round_two_updates("hetlora")
    private, _ = privatize_updates(method, config, state, updates, 2, 0.0, float("inf"))
    layer = next(iter(method.ranks))
    total = float(sum(u.tensors[f"{layer}/weighted_weight"][0] for u in private))  # sum_c n_c, noiseless here
    for noise_std, kept in ((0.0, False), (total / 3.1, False), (total / 2.9, True), (total, True)):
        aggregated = method.aggregate(state, [replace(u, meta={**u.meta, NOISE_STD: noise_std}) for u in private], 2)
        for factor in ("lora_B", "lora_A"):
            key = f"{layer}/{factor}"
            assert torch.equal(aggregated[key], state[key]) == kept, (noise_std, factor)


# ----------------------------------------------------------------------------------------------- DP-SGD
def test_dp_sgd_leaves_ravans_untrained_heads_unchanged_and_counts_clipped_examples():
    from ravan_ray.federation import prepare_data
    from ravan_ray.methods.base import ClientTask
    from ravan_ray.training import ModelHost

    config = load_config(None, [*TINY_OVERRIDES, "privacy.mode=sample", "privacy.noise_multiplier=1",
                                "privacy.clip_norm=0.01"])
    data = prepare_data(config)
    host = ModelHost(config, data.task_info)
    state = host.initial_state()
    local = {k: v[data.partitions[0]] for k, v in data.train.items()}
    update = host.train_client(ClientTask(0, 1, 0.5, config.seed), state, None, local)
    assert update.meta["clip_fraction"] == 1.0  # every example's gradient is above 0.01
    for name, layer in host.adapted.items():
        trained = update.meta["heads"][name]
        untrained = [h for h in range(layer.heads) if h not in trained]
        torch.testing.assert_close(layer.cores.detach()[untrained], state[f"{name}/cores"][untrained], rtol=0, atol=0)
        assert (layer.cores.detach()[trained] != state[f"{name}/cores"][trained]).any()


# ----------------------------------------------------------------------------------------------- end to end
def _metrics(path):
    return pd.read_csv(path / "metrics.csv").drop(columns=list(TIMING_COLUMNS))


def test_zero_noise_and_infinite_clip_norm_is_bit_identical_to_no_privacy(ray_session, tiny_config, tmp_path):
    from safetensors.torch import load_file

    run_federation(tiny_config("compute.distribution=uniform"), tmp_path / "none")
    run_federation(tiny_config("compute.distribution=uniform", "privacy.mode=client", "privacy.noise_multiplier=0",
                               "privacy.clip_norm=.inf", "privacy.delta=1e-3", "privacy.client_sampling=fixed"),
                   tmp_path / "private")  # the clients of a run without privacy
    privacy_columns = ["epsilon", "clip_fraction", "clip_norm", "update_norm"]
    private = _metrics(tmp_path / "private")
    assert (private["clip_fraction"] == 0).all() and np.isinf(private["epsilon"]).all()
    pd.testing.assert_frame_equal(_metrics(tmp_path / "none").drop(columns=privacy_columns),
                                  private.drop(columns=privacy_columns))
    final = [load_file(str(tmp_path / run / "checkpoints" / "round_00002" / "state.safetensors"))
             for run in ("none", "private")]
    assert final[0].keys() == final[1].keys()
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])


def test_client_level_noise_is_seeded_so_a_resumed_run_is_bit_identical(ray_session, tiny_config, tmp_path):
    overrides = ("privacy.mode=client", "privacy.noise_multiplier=0.5", "privacy.clip_norm=0.05",
                 "privacy.adaptive_clip=true", "privacy.clipped_count_stddev=1.0", "privacy.delta=1e-3")
    run_federation(tiny_config(*overrides), tmp_path / "clean")

    class Interrupted(RuntimeError):
        pass

    def stop_after_round_one(row, checkpoint):
        if row["round"] == 1:
            raise Interrupted

    with pytest.raises(Interrupted):
        run_federation(tiny_config(*overrides), tmp_path / "resumed", on_round=stop_after_round_one)
    run_federation(tiny_config(*overrides), tmp_path / "resumed", resume=True)
    clean = _metrics(tmp_path / "clean")
    pd.testing.assert_frame_equal(clean, _metrics(tmp_path / "resumed"))
    assert clean["clip_norm"].nunique() == 2  # adaptive clipping moved the bound, and the resume restored it
    assert clean["epsilon"].is_monotonic_increasing
    assert clean["epsilon"].iloc[-1] == pytest.approx(epsilon_for(3 / 6, 0.5, 2, 1e-3))


def test_sample_level_run_reports_epsilon_per_round_and_the_final_epsilon(ray_session, tiny_config, tmp_path):
    import json

    run_federation(tiny_config("method.name=fed_sb", "privacy.mode=sample", "privacy.target_epsilon=5",
                               "privacy.clip_norm=1"), tmp_path)
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert metrics["epsilon"].is_monotonic_increasing and summary["epsilon"] == pytest.approx(5, rel=1e-3)
    assert summary["delta"] == 1e-5 and summary["noise_multiplier"] > 0
    assert metrics["clip_fraction"].between(0, 1).all() and metrics["test_accuracy"].notna().all()
    assert "sample level, epsilon 5 at delta 1e-05" in format_summary(summary, tmp_path)  # the run's last words


# ----------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("overrides, words", [
    (["privacy.mode=client", "privacy.target_epsilon=0", "privacy.clip_norm=1"], "target_epsilon"),
    (["privacy.mode=client", "privacy.target_epsilon=-1", "privacy.clip_norm=1"], "target_epsilon"),
    (["privacy.mode=client", "privacy.noise_multiplier=1"], "clip_norm"),
    (["privacy.mode=client", "privacy.noise_multiplier=1", "privacy.clip_norm=1", "privacy.delta=0.2"],
     "1 / federation.num_clients"),
    (["privacy.mode=sample", "privacy.noise_multiplier=1", "privacy.clip_norm=1", "privacy.delta=0.5"],
     "smallest client"),
    (["privacy.mode=client", "privacy.noise_multiplier=1", "privacy.clip_norm=1", "privacy.delta=1e-3",
      "method.scoring=gradient"], "scoring=gradient"),
    (["privacy.mode=client", "privacy.noise_multiplier=1", "privacy.target_epsilon=1", "privacy.clip_norm=1"],
     "exactly one"),
    (["privacy.mode=sample", "privacy.noise_multiplier=1", "privacy.clip_norm=1", "method.name=hetlora"],
     "hetlora_lambda=0"),
])
def test_bad_privacy_settings_exit_2_with_one_line(overrides, words, tmp_path, capsys):
    args = [arg for o in overrides for arg in ("--set", o)]
    assert main(["run", *TINY_ARGS, *args, "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err, err
