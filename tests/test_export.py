"""``ravan-ray export``: the exported model (a PEFT LoRA directory, or the merged model) computes what the
platform's global model computes, and loads with the libraries a user has (peft, transformers' AutoModelFor...).

The run directories are made without Ray: a ModelHost trains two clients for two rounds, the method aggregates,
and the run's config.yaml and checkpoint are written with the platform's own functions (what the federation
driver writes, minus the orchestration, which export does not read).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ravan_ray.adapters import LoRALinear
from ravan_ray.checkpoints import save_checkpoint
from ravan_ray.cli import main
from ravan_ray.config import load_config, read_yaml, save_config
from ravan_ray.export import EXPORT_INFO, export_run
from ravan_ray.methods import REGISTRY, method_class
from ravan_ray.methods.base import ClientTask
from ravan_ray.methods.ravan import INITS, RavanLinear
from ravan_ray.training import ModelHost

from conftest import TINY_INFO, TINY_OVERRIDES
from toys import local_data, one_thread  # noqa: F401  (one_thread: autouse fixture)

TOLERANCE = 1e-4
METHODS = ["ravan", "fedit", "fedex_lora", "fed_sb"]
ROUNDS = 2


def lm_data(seed: int, n: int = 8, width: int = 12) -> dict[str, np.ndarray]:
    """n rows of a client's tokenised instruction data: the loss on the second half of each row (the response)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 1000, (n, width))
    labels = ids.copy()
    labels[:, : width // 2] = -100
    return {"input_ids": ids, "attention_mask": np.ones((n, width), dtype=np.int64), "labels": labels}


def classifier_setup(method: str):
    config = load_config(None, [*TINY_OVERRIDES, f"method.name={method}", "method.lora_rank=2", "method.heads=2",
                                "federation.local_steps=2", "federation.batch_size=8", "model.dropout=0"])
    return config, dict(TINY_INFO), local_data


def lm_setup(method: str, tiny: Path):
    config = load_config(None, [*TINY_OVERRIDES, "model.task=causal_lm", f"model.name={tiny / 'models' / 'llama'}",
                                f"method.name={method}", "method.lora_rank=2", "method.heads=2",
                                "federation.local_steps=2", "federation.batch_size=8", "model.dropout=0"])
    return config, {"pad_token_id": 2, "eos_token_ids": [2], "max_new_tokens": 0}, lm_data


def image_setup(method: str, tiny: Path):
    config = load_config(None, [*TINY_OVERRIDES, "model.task=image_classification",
                                f"model.name={tiny / 'models' / 'vit'}", f"method.name={method}", "method.lora_rank=2",
                                "method.heads=2", "model.dropout=0"])

    def images(seed: int, n: int = 8) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        return {"pixels": rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8), "labels": rng.integers(0, 4, n)}

    return config, {"label_names": ["red", "green", "blue", "grey"]}, images


def write_run(run_dir: Path, config, task_info, data_for, rounds: int = ROUNDS):
    """Train 2 clients per round for ``rounds`` rounds, aggregate, and write config.yaml and the checkpoints as a
    run does; returns (the global state after every round, by round)."""
    host = ModelHost(config, task_info)
    state = host.initial_state()
    states = {0: state}
    for round_index in range(1, rounds + 1):
        updates = [host.train_client(ClientTask(client, round_index, 1.0, config.seed), state, None,
                                     data_for(10 * round_index + client)) for client in (0, 1)]
        state = host.method.aggregate(state, updates, round_index)
        save_checkpoint(run_dir, round_index, state, {}, {"seed": config.seed, "rows": []}, keep=rounds)
        states[round_index] = state
    save_config(config, run_dir / "config.yaml", extra={"method": host.method.resolved(), "task": task_info})
    return states


def global_outputs(config, task_info, state, inputs) -> torch.Tensor:
    """The platform's global model's logits: a fresh host loaded with the global state, as the server evaluates."""
    host = ModelHost(config, task_info)
    host.load(state)
    host.model.eval()
    with torch.no_grad():
        return host.model(**inputs).logits


def probe_inputs(config, data_for) -> dict[str, torch.Tensor]:
    """A few rows the model never trained on, as model inputs."""
    rows = data_for(999, n=4)
    if "pixels" in rows:
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(config.model.name)
        return {"pixel_values": processor(images=list(rows["pixels"]), return_tensors="pt")["pixel_values"]}
    inputs = {k: torch.as_tensor(v) for k, v in rows.items() if k in ("input_ids", "attention_mask")}
    inputs["attention_mask"][0, -3:] = 0  # a padded row too
    return inputs


def load_peft(out: Path, auto_class: str, model_config: dict):
    import transformers
    from peft import PeftModel

    config = json.loads((out / "adapter_config.json").read_text())
    base = getattr(transformers, auto_class).from_pretrained(config["base_model_name_or_path"], **model_config)
    return PeftModel.from_pretrained(base, out).eval()


def check_export(tmp_path: Path, config, task_info, data_for) -> dict[str, Path]:
    """Export the run in every format its method has and compare each export's logits with the global model's;
    returns {format: directory}."""
    states = write_run(tmp_path / "run", config, task_info, data_for)
    inputs = probe_inputs(config, data_for)
    expected = global_outputs(config, task_info, states[ROUNDS], inputs)
    method = config.method.name
    formats = ["merged"] if method_class(method).merged_export_only else ["merged", "peft"]
    import transformers

    exported = {}
    for fmt in formats:
        out = export_run(tmp_path / "run", tmp_path / fmt, fmt)
        info = json.loads((out / EXPORT_INFO).read_text())
        assert (info["format"], info["round"], info["method"]) == (fmt, ROUNDS, method)
        if fmt == "merged":
            model = getattr(transformers, info["auto_class"]).from_pretrained(out).eval()
        else:
            model = load_peft(out, info["auto_class"], info["model_config"])
        with torch.no_grad():
            got = model(**inputs).logits
        assert torch.allclose(got, expected, atol=TOLERANCE, rtol=0), (fmt, (got - expected).abs().max())
        exported[fmt] = out
        saved_preprocessor = "preprocessor_config.json" if "pixel_values" in inputs else "tokenizer_config.json"
        assert (out / saved_preprocessor).is_file()
    # the federation moved the model: the comparison is not between two copies of the pretrained model
    assert not torch.allclose(expected, global_outputs(config, task_info, states[0], inputs), atol=TOLERANCE)
    return exported


@pytest.mark.parametrize("method", METHODS)
def test_exported_classifier_outputs_equal_the_global_model(tmp_path, method):
    check_export(tmp_path, *classifier_setup(method))


@pytest.mark.parametrize("method", METHODS)
def test_exported_causal_lm_outputs_equal_the_global_model(tmp_path, tiny, method):
    check_export(tmp_path, *lm_setup(method, tiny))


@pytest.mark.parametrize("method", ["ravan", "fedex_lora"])
def test_exported_image_classifier_outputs_equal_the_global_model(tmp_path, tiny, method):
    check_export(tmp_path, *image_setup(method, tiny))


def test_fedex_lora_is_merged_only_and_the_others_are_loras():
    assert method_class("fedex_lora").merged_export_only is not None
    assert all(method_class(name).merged_export_only is None for name in ("ravan", "fedit", "fed_sb"))


@pytest.mark.parametrize("method", sorted(set(REGISTRY) - set(METHODS)))
def test_every_other_method_exports_its_global_model_exactly(tmp_path, method):
    """Each method's PEFT export (where it declares one) and merged export compute its global model."""
    check_export(tmp_path, *classifier_setup(method))


def test_peft_directory_loads_in_peft_with_the_base_it_names(tmp_path):
    from peft import AutoPeftModel, PeftConfig

    config, info, data_for = classifier_setup("ravan")
    states = write_run(tmp_path / "run", config, info, data_for)
    assert main(["export", str(tmp_path / "run"), "--format", "peft", "--output", str(tmp_path / "out")]) == 0
    saved = PeftConfig.from_pretrained(tmp_path / "out")
    exported = json.loads((tmp_path / "out" / EXPORT_INFO).read_text())
    assert saved.peft_type == "LORA" and saved.modules_to_save == ["classifier"] == exported["modules_to_save"]
    assert set(saved.target_modules) == set(exported["target_modules"]) and len(saved.target_modules) == 4
    # tiny-bert is built from a config (no weights anywhere): the export carries that base and names it
    assert Path(saved.base_model_name_or_path) == (tmp_path / "out" / "base").resolve()
    # Ravan's h heads of rank r are one LoRA of rank h r with scale 1 (alpha = rank)
    rank_per_head = read_yaml(tmp_path / "run" / "config.yaml")["resolved"]["method"]["rank_per_head"]
    assert {saved.r} == {config.method.heads * r for r in rank_per_head.values()} and saved.lora_alpha == saved.r
    model = AutoPeftModel.from_pretrained(tmp_path / "out")  # loads the base by its name, then the adapter
    inputs = probe_inputs(config, data_for)
    with torch.no_grad():
        got = model.eval()(**inputs).logits
    assert torch.allclose(got, global_outputs(config, info, states[ROUNDS], inputs), atol=TOLERANCE, rtol=0)


def test_round_option_exports_that_rounds_global_model(tmp_path):
    import transformers

    config, info, data_for = classifier_setup("fedit")
    states = write_run(tmp_path / "run", config, info, data_for)
    assert main(["export", str(tmp_path / "run"), "--round", "1", "--format", "merged",
                 "--output", str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / EXPORT_INFO).read_text())["round"] == 1
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    inputs = probe_inputs(config, data_for)
    with torch.no_grad():
        got = model(**inputs).logits
    assert torch.allclose(got, global_outputs(config, info, states[1], inputs), atol=TOLERANCE, rtol=0)
    assert not torch.allclose(got, global_outputs(config, info, states[2], inputs), atol=TOLERANCE)


def test_layers_of_different_ranks_export_through_the_rank_pattern(tmp_path, tiny):
    """Fed-SB's rank floor(sqrt(N)) differs between LLaMA's query (64 x 64) and grouped value (32 x 64) projections."""
    from peft import PeftConfig

    out = check_export(tmp_path, *lm_setup("fed_sb", tiny))["peft"]
    saved = PeftConfig.from_pretrained(out)
    ranks = json.loads((out / EXPORT_INFO).read_text())["rank"]
    assert len(set(ranks.values())) == 2 and saved.rank_pattern
    model = load_peft(out, "AutoModelForCausalLM", {})
    for name, rank in ranks.items():
        assert model.base_model.model.get_submodule(name).r["default"] == rank


def test_peft_format_refuses_a_method_that_merged_into_w_in_one_line(tmp_path, capsys):
    config, info, data_for = classifier_setup("fedex_lora")
    write_run(tmp_path / "run", config, info, data_for, rounds=1)
    code = main(["export", str(tmp_path / "run"), "--format", "peft", "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--format merged" in err and "fedex_lora" in err
    assert not (tmp_path / "out").exists()  # nothing written


def test_peft_format_refuses_a_global_model_whose_weights_changed_outside_the_adapters(tmp_path, monkeypatch):
    """The guard beyond what a method declares: were FedEx-LoRA to claim a LoRA form, the export would see its W."""
    from ravan_ray.export import ExportError
    from ravan_ray.methods.fedex_lora import FedExLoRA

    config, info, data_for = classifier_setup("fedex_lora")
    write_run(tmp_path / "run", config, info, data_for, rounds=1)
    monkeypatch.setattr(FedExLoRA, "merged_export_only", None)
    with pytest.raises(ExportError, match="outside its adapters"):
        export_run(tmp_path / "run", tmp_path / "out", "peft")


@pytest.fixture
def one_round_run(tmp_path):
    config, info, data_for = classifier_setup("fedit")
    write_run(tmp_path / "run", config, info, data_for, rounds=1)
    return tmp_path / "run"


@pytest.mark.parametrize("case, expected", [
    ("no_run_dir", "not a run directory"),
    ("missing_round", "no checkpoint of round 5; checkpoints: 1"),
    ("unknown_format", "export format 'onnx' is unknown"),
    ("output_not_empty", "is not an empty directory"),
    ("no_checkpoint", "no checkpoint yet"),
])
def test_export_bad_input_is_one_line_with_exit_code_2(one_round_run, tmp_path, capsys, case, expected):
    run, out, fmt, extra = one_round_run, tmp_path / "out", "peft", []
    if case == "no_run_dir":
        run = tmp_path / "nowhere"
    elif case == "missing_round":
        extra = ["--round", "5"]
    elif case == "unknown_format":
        fmt = "onnx"
    elif case == "output_not_empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "no_checkpoint":
        import shutil

        shutil.rmtree(run / "checkpoints")
    code = main(["export", str(run), "--format", fmt, "--output", str(out), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and expected in err, err
    assert case == "output_not_empty" or not out.exists()


@settings(max_examples=25, deadline=None)
@given(heads=st.integers(1, 3), rank=st.integers(1, 2), init=st.sampled_from(INITS), seed=st.integers(0, 2**16))
def test_ravan_layer_is_the_lora_of_its_stacked_heads(heads, rank, init, seed):
    """B' = [s_1 B_1 H_1 ... s_h B_h H_h], A' = [A_1; ...; A_h], scale 1: scale B' A' is the layer's update."""
    layer = RavanLinear(torch.nn.Linear(6, 7).double(), heads=heads, rank=rank, init=init, seed=seed, layer_name="q")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.cores.copy_(torch.randn(layer.cores.shape, generator=generator, dtype=torch.float64))
        layer.scales.copy_(torch.rand(heads, generator=generator, dtype=torch.float64) + 0.5)
    B, A, scale = layer.lora_factors()
    assert B.shape == (7, heads * rank) and A.shape == (heads * rank, 6) and scale == 1.0
    expected = sum(layer.scales[i] * layer.bases_B[i] @ layer.cores[i] @ layer.bases_A[i] for i in range(heads))
    assert torch.allclose(scale * B @ A, expected, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(rank=st.integers(1, 4), active=st.integers(1, 4), scale=st.floats(0.25, 4), seed=st.integers(0, 2**16))
def test_lora_layer_factors_give_its_update_with_masked_ranks_out(rank, active, scale, seed):
    layer = LoRALinear(torch.nn.Linear(6, 7).double(), rank=rank, seed=seed, layer_name="v", scale=scale)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=torch.Generator().manual_seed(seed),
                                       dtype=torch.float64))
    layer.set_rank_mask(min(active, rank))
    B, A, factor_scale = layer.lora_factors()
    assert factor_scale == scale
    assert torch.allclose(factor_scale * B @ A, layer.delta_weight(), atol=1e-12)
    x = torch.randn(3, 6, dtype=torch.float64)
    assert torch.allclose(layer(x), layer.base(x) + factor_scale * x @ A.T @ B.T, atol=1e-12)
