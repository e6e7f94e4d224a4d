"""Every task end to end from the CLI, on tiny models built from config directories and small generated
data (``ravan-ray tiny``), for Ravan, FedIT and a heterogeneous-rank method; plus each task's own claims."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from ravan_ray.cli import main
from ravan_ray.config import load_config
from ravan_ray.federation import prepare_data
from ravan_ray.results import TIMING_COLUMNS
from ravan_ray.tasks import task_class

COMMON = ["data.partition.min_size=2", "federation.num_clients=4", "federation.clients_per_round=2",
          "federation.rounds=3", "federation.local_steps=4", "federation.batch_size=8", "federation.eval_every=1",
          "resources.cpus_per_client=0.5", "resources.pool_size=1", "optimizer.lr=0.01", "data.partition.kind=iid"]


def task_overrides(tiny, task: str) -> list[str]:
    m, d = tiny / "models", tiny / "data"
    return {
        "text_classification": ["model.task=text_classification", f"model.name={m / 'bert'}", f"data.path={d / 'pairs'}",
                                "data.text_field=sentence1", "data.text_pair_field=sentence2", "data.max_length=48",
                                "data.max_train_samples=160", "data.max_test_samples=40"],
        "image_classification": ["model.task=image_classification", f"model.name={m / 'vit'}", f"data.path={d / 'images'}",
                                 "data.max_train_samples=160", "data.max_test_samples=40"],
        "causal_lm": ["model.task=causal_lm", f"model.name={m / 'llama'}", f"data.path={d / 'instructions'}",
                      "data.max_length=112", "data.max_train_samples=160", "data.max_test_samples=24"],
        "question_answering": ["model.task=question_answering", f"model.name={m / 'bert'}", f"data.path={d / 'squad'}",
                               "data.max_length=32", "data.doc_stride=8", "data.max_train_samples=160",
                               "data.max_test_samples=30"],
        "seq2seq": ["model.task=seq2seq", f"model.name={m / 't5'}", f"data.path={d / 'topics'}", "data.max_length=40",
                    "data.max_train_samples=160", "data.max_test_samples=30"],
    }[task]


def cli_run(tiny, task: str, out, *extra: str) -> int:
    sets = [*COMMON, *task_overrides(tiny, task), *extra]
    return main(["run", *[a for s in sets for a in ("--set", s)], "--output", str(out)])


TASKS = ["text_classification", "image_classification", "causal_lm", "question_answering", "seq2seq"]


@pytest.mark.parametrize("task", TASKS)
def test_each_task_runs_from_the_cli_keeps_the_run_contract_and_its_loss_falls(ray_session, tiny, tmp_path, task):
    assert cli_run(tiny, task, tmp_path) == 0
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    cls = task_class(task)
    assert list(metrics.columns[4:4 + len(cls.metrics)]) == list(cls.metrics)  # the task's own metrics
    assert list(metrics["round"]) == [1, 2, 3]
    assert (metrics["agg_error"] < 1e-4).all()  # Ravan, every client training every head: exact
    assert metrics["test_loss"].iloc[-1] < metrics["test_loss"].iloc[0]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["task"] == task and summary["metric"] == cls.primary_metric
    assert summary[f"final_{cls.primary_metric}"] == pytest.approx(metrics[cls.primary_metric].iloc[-1])
    resolved = yaml.safe_load((tmp_path / "config.yaml").read_text())["resolved"]
    assert resolved["method"]["target_modules"]  # found in the model: the attention query and value projections
    assert (tmp_path / "checkpoints" / "round_00003" / "state.safetensors").is_file()
    assert len(pd.read_csv(tmp_path / "clients.csv")) == 3 * 2


# Methods and tasks are independent seams, so each task takes one more method here (alternating plain
# LoRA and a rank-heterogeneous method under a budget mix) rather than every pair: each method meets
# tasks of both kinds (classification and generation) and every task meets a method besides Ravan.
@pytest.mark.parametrize("task,method,mix", [
    ("text_classification", "hetlora", "uniform"), ("image_classification", "fedit", "homogeneous"),
    ("causal_lm", "hetlora", "uniform"), ("question_answering", "fedit", "homogeneous"),
    ("seq2seq", "hetlora", "uniform"),
])
def test_each_task_runs_with_plain_lora_or_a_heterogeneous_rank_method(ray_session, tiny, tmp_path, task, method, mix):
    assert cli_run(tiny, task, tmp_path, f"method.name={method}", f"compute.distribution={mix}",
                   "federation.rounds=1") == 0
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    assert list(metrics["round"]) == [1] and metrics["uplink_bytes"].gt(0).all()
    assert metrics[task_class(task).primary_metric].notna().all()


def test_a_task_resumes_bit_identically(ray_session, tiny, tmp_path):
    """Resume after round 1 gives the metrics of an uninterrupted run (causal_lm: generation included)."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert cli_run(tiny, "causal_lm", full, "federation.rounds=2") == 0
    shutil.copytree(full, cut)  # the same run, interrupted after round 1's checkpoint
    shutil.rmtree(cut / "checkpoints" / "round_00002")
    assert main(["resume", str(cut)]) == 0
    a, b = (pd.read_csv(d / "metrics.csv").drop(columns=list(TIMING_COLUMNS)) for d in (full, cut))
    pd.testing.assert_frame_equal(a, b)


# ------------------------------------------------------------------------------------- model building
def task_config(tiny, task: str, *extra: str):
    return load_config(None, [*COMMON, *task_overrides(tiny, task), *extra])


@pytest.mark.parametrize("task,targets,head", [
    ("text_classification", ["query", "value"], ["classifier.weight", "classifier.bias"]),
    ("image_classification", ["q_proj", "v_proj"], ["classifier.weight", "classifier.bias"]),
    ("causal_lm", ["q_proj", "v_proj"], []),
    ("question_answering", ["query", "value"], ["qa_outputs.weight", "qa_outputs.bias"]),
    ("seq2seq", ["q", "v"], []),
])
def test_a_model_built_from_a_config_dir_has_the_tasks_head_and_its_query_value_targets(tiny, task, targets, head):
    from ravan_ray.models import default_targets
    from ravan_ray.tasks import build_task

    config = task_config(tiny, task)
    data = prepare_data(config)
    loaded = build_task(config, data.task_info).load_model()
    assert loaded.head_parameters == head
    assert default_targets(loaded.model) == targets


def test_decoder_only_classification_pads_with_eos_when_the_tokenizer_has_no_pad(ray_session, tiny, tmp_path):
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tiny / "models" / "llama").pad_token is None
    assert cli_run(tiny, "text_classification", tmp_path, f"model.name={tiny / 'models' / 'llama'}",
                   "federation.rounds=1") == 0
    info = yaml.safe_load((tmp_path / "config.yaml").read_text())["resolved"]["task"]
    assert info["pad_token_id"] == AutoTokenizer.from_pretrained(tiny / "models" / "llama").eos_token_id
    assert pd.read_csv(tmp_path / "metrics.csv")["test_accuracy"].notna().all()


def test_a_config_dir_is_built_with_the_run_seed(tiny):
    from ravan_ray.tasks import build_task

    a, b, c = (build_task(task_config(tiny, "seq2seq", f"seed={s}"), {"pad_token_id": 0}).load_model().model
               for s in (0, 0, 1))
    weight = "encoder.block.0.layer.0.SelfAttention.q.weight"
    assert torch.equal(a.get_parameter(weight), b.get_parameter(weight))
    assert not torch.equal(a.get_parameter(weight), c.get_parameter(weight))


# ------------------------------------------------------------------------------------- causal LM
def test_instruction_labels_cover_the_response_and_its_end_token_only(tiny):
    config = task_config(tiny, "causal_lm")
    data = prepare_data(config)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny / "models" / "llama")
    rows = [json.loads(line) for line in (tiny / "data" / "instructions" / "test.jsonl").read_text().splitlines()]
    test = data.test
    for row_index in range(5):
        labels = test["labels"][row_index]
        trained = labels[labels != -100]
        assert trained[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(trained[:-1]).strip() == test["references"][row_index]
        first = int(np.argmax(labels != -100))
        assert "### Response:" in tokenizer.decode(test["input_ids"][row_index][:first])  # the prompt is not trained
    assert set(test["references"]) <= {r["output"] for r in rows}


def test_instruction_tuning_uses_the_chat_template_where_the_tokenizer_has_one(tiny, tmp_path):
    from transformers import AutoTokenizer

    model_dir = tmp_path / "chat-llama"
    shutil.copytree(tiny / "models" / "llama", model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}"
                               "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    tokenizer.save_pretrained(model_dir)
    data = prepare_data(task_config(tiny, "causal_lm", f"model.name={model_dir}", "data.max_length=120"))
    ids, labels = data.test["input_ids"][0], data.test["labels"][0]
    first = int(np.argmax(labels != -100))
    prompt = tokenizer.decode(ids[:first])
    assert prompt.startswith("<|user|>") and prompt.endswith("<|assistant|>") and "### Instruction" not in prompt
    assert tokenizer.decode(labels[labels != -100], skip_special_tokens=True).strip() == data.test["references"][0]


def test_a_prompt_longer_than_max_length_is_one_line_or_skipped(ray_session, tiny, tmp_path, capsys):
    assert cli_run(tiny, "causal_lm", tmp_path / "a", "data.max_length=40") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "data.max_length=40" in err and "long_prompts=skip" in err
    data = prepare_data(task_config(tiny, "causal_lm", "data.max_length=64", "data.long_prompts=skip"))
    assert 0 < len(data.train["input_ids"]) < 160
    assert "skipped" in capsys.readouterr().out


def test_exact_match_counts_a_completion_equal_to_the_reference(tiny):
    """A model that always answers "odd" (its LM head favours that token, then the end token) is right exactly
    on the references that are "odd"."""
    from ravan_ray.tasks import build_task

    config = task_config(tiny, "causal_lm")
    data = prepare_data(config)
    task = build_task(config, data.task_info)
    model = task.load_model().model
    tokenizer = task.decoding_tokenizer()
    odd, eos = tokenizer("odd", add_special_tokens=False)["input_ids"], tokenizer.eos_token_id
    assert len(odd) == 1
    original = model.forward

    def forward(*args, **kwargs):  # next token: "odd", then the end token after it
        out = original(*args, **kwargs)
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] > 0:
            after_odd = ids[:, -1] == odd[0]
            out.logits[after_odd, -1, :] = -1e9
            out.logits[after_odd, -1, eos] = 1e9
            out.logits[~after_odd, -1, :] = -1e9
            out.logits[~after_odd, -1, odd[0]] = 1e9
        return out

    model.forward = forward
    metrics = task.evaluate(model, data.test, 16, torch.device("cpu"))
    expected = float(np.mean([r == "odd" for r in data.test["references"]]))
    assert expected > 0 and metrics["test_accuracy"] == pytest.approx(expected)
    assert metrics["test_perplexity"] == pytest.approx(math.exp(metrics["test_loss"]))


# ------------------------------------------------------------------------------------- question answering
def test_long_contexts_become_overlapping_windows_whose_labels_point_at_the_answer(tiny):
    from transformers import AutoTokenizer

    from ravan_ray.tasks import build_task

    config = task_config(tiny, "question_answering")
    data = prepare_data(config)
    windows_of = build_task(config).prepare().train_examples
    tokenizer = AutoTokenizer.from_pretrained(tiny / "models" / "bert")
    examples = data.test["example"]
    assert len(examples) > len(data.test["contexts"])  # contexts longer than a window make several
    found = 0
    for window in range(len(examples)):
        start, end = data.test["start_positions"][window], data.test["end_positions"][window]
        if start == 0:
            continue  # the answer is not in this window: labelled [CLS]
        text = tokenizer.decode(data.test["input_ids"][window][start:end + 1])
        assert text.lower() in [a.lower() for a in data.test["answers"][examples[window]]]
        found += 1
    assert found >= len(data.test["contexts"])  # every answer is inside at least one window
    assert sum(len(p) for p in data.partitions) == len(data.train["input_ids"]) == len(windows_of)
    assert len(np.unique(windows_of)) < len(windows_of)
    owner = {}
    for client, rows in enumerate(data.partitions):  # an example's windows stay with one client
        for example in np.unique(windows_of[rows]):
            assert owner.setdefault(example, client) == client


def test_best_span_is_the_highest_scoring_valid_span_over_an_examples_windows():
    from ravan_ray.tasks.question_answering import best_spans

    context = "Ada lives in Oslo and works as a pilot."
    offsets = np.full((2, 6, 2), -1, dtype=np.int32)
    offsets[0, 2:6] = [[0, 3], [4, 9], [10, 12], [13, 17]]  # Ada lives in Oslo
    offsets[1, 2:6] = [[13, 17], [18, 21], [22, 27], [33, 38]]  # Oslo and works ... pilot
    start = np.full((2, 6), -5.0, dtype=np.float32)
    end = np.full((2, 6), -5.0, dtype=np.float32)
    start[0, 5], end[0, 5] = 2.0, 2.0  # "Oslo" in window 0: score 4
    start[1, 5], end[1, 5] = 3.0, 3.0  # "pilot" in window 1: score 6, the best
    start[1, 0], end[1, 0] = 9.0, 9.0  # [CLS] scores higher but is not in the context
    assert best_spans(start, end, offsets, np.array([0, 0]), np.array([context], dtype=object), 30) == ["pilot"]
    end[1, 5] = -5.0
    end[1, 2] = 3.0  # end before start in window 1 is invalid: "Oslo" from window 0 wins
    assert best_spans(start, end, offsets, np.array([0, 0]), np.array([context], dtype=object), 30) == ["Oslo"]


@pytest.mark.parametrize("prediction,truth,em,f1", [
    ("The Oslo", "oslo", 1.0, 1.0),  # articles, case
    ("Oslo, Norway.", "Oslo Norway", 1.0, 1.0),  # punctuation
    ("in Oslo", "Oslo", 0.0, 2 / 3),  # precision 1/2, recall 1: F1 2/3
    ("pilot", "a baker", 0.0, 0.0),
])
def test_squad_exact_match_and_f1_follow_the_official_normalisation(prediction, truth, em, f1):
    from ravan_ray.tasks.question_answering import exact_match, f1_score

    assert exact_match(prediction, truth) == em
    assert f1_score(prediction, truth) == pytest.approx(f1)


def test_mrqa_detected_answers_are_read_like_squad_answers():
    from ravan_ray.tasks.question_answering import answer_spans

    mrqa = {"text": ["Oslo"], "char_spans": [{"start": [13], "end": [16]}], "token_spans": []}
    assert answer_spans(mrqa, "x") == [("Oslo", 13)] == answer_spans({"text": ["Oslo"], "answer_start": [13]}, "x")


# ------------------------------------------------------------------------------------- seq2seq, images
def test_seq2seq_generates_class_names_for_integer_targets(tiny):
    config = task_config(tiny, "seq2seq")
    data = prepare_data(config)
    names = json.loads((tiny / "data" / "topics" / "label_names.json").read_text())
    assert set(data.test["references"]) <= set(names)
    assert data.partition_kind == "iid" and data.histogram.shape[1] == len(names)  # class ids to split on


def test_images_of_different_sizes_are_resized_to_the_processors_input(tiny, tmp_path):
    from PIL import Image

    folder = tmp_path / "mixed"
    shutil.copytree(tiny / "data" / "images", folder)
    Image.new("RGB", (40, 24), "red").save(folder / "train" / "red" / "odd.png")
    data = prepare_data(task_config(tiny, "image_classification", f"data.path={folder}",
                                    "data.max_train_samples=1000"))
    assert data.train["pixels"].shape[1:] == (16, 16, 3) and data.train["pixels"].dtype == np.uint8


# ------------------------------------------------------------------------------------- partitioning
def test_a_task_without_labels_splits_iid_with_a_message_or_on_partition_label_field(tiny, capsys):
    data = prepare_data(task_config(tiny, "causal_lm", "data.partition.kind=dirichlet"))
    assert data.partition_kind == "iid" and "data.partition.label_field" in capsys.readouterr().err
    data = prepare_data(task_config(tiny, "causal_lm", "data.partition.kind=dirichlet",
                                    "data.partition.label_field=category", "data.partition.alpha=0.1"))
    assert data.partition_kind == "dirichlet"
    assert list(data.histogram.columns) == [0, 1, 2]
    shares = data.histogram.to_numpy() / data.histogram.to_numpy().sum(axis=1, keepdims=True)
    assert shares.max(axis=1).mean() > 0.6  # alpha 0.1: most clients dominated by one category


# ------------------------------------------------------------------------------------- bad input
def test_task_bad_inputs_exit_2_with_one_line(ray_session, tiny, tmp_path, capsys):
    one_class = tmp_path / "one-class"
    for split in ("train", "test"):
        shutil.copytree(tiny / "data" / "images" / split / "red", one_class / split / "red")
    gpt2 = tmp_path / "gpt2"
    from transformers import GPT2Config

    GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=1000).save_pretrained(gpt2)
    shutil.copy(tiny / "models" / "llama" / "tokenizer.json", gpt2)
    shutil.copy(tiny / "models" / "llama" / "tokenizer_config.json", gpt2)
    cases = [
        ("question_answering", ["data.question_field=query"], "data.question_field 'query'"),
        ("image_classification", [f"data.path={one_class}"], "at least 2 class folders"),
        ("image_classification", [f"model.name={tiny / 'models' / 'llama'}"], "does not fit model.task"),
        ("causal_lm", [f"model.name={gpt2}"], "c_attn"),
        ("causal_lm", [f"model.name={gpt2}", "model.target_modules=[c_attn]"], "Conv1D"),
        ("seq2seq", ["model.target_modules=[nope]"], "nope"),
        ("text_classification", ["data.text_pair_field=hypothesis"], "data.text_pair_field 'hypothesis'"),
    ]
    for task, extra, mentions in cases:
        assert cli_run(tiny, task, tmp_path / "run", *extra) == 2, (task, extra)
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and mentions in err, (task, extra, err)
        assert not (tmp_path / "run" / "metrics.csv").exists()


# ------------------------------------------------------------------------------------- memory and precision
def one_client_update(config):
    from conftest import TINY_INFO
    from ravan_ray.methods.base import ClientTask
    from ravan_ray.training import ModelHost

    host = ModelHost(config, TINY_INFO)
    rng = np.random.default_rng(0)
    data = {"input_ids": rng.integers(1000, 2000, size=(16, 12)), "attention_mask": np.ones((16, 12), dtype=np.int64),
            "labels": rng.integers(0, 3, size=16)}
    return host, host.train_client(ClientTask(0, 1, 1.0, 0), host.initial_state(), None, data)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_half_precision_base_trains_float32_adapters_and_heads(dtype):
    from conftest import TINY_OVERRIDES

    host, update = one_client_update(load_config(None, [*TINY_OVERRIDES, f"model.dtype={dtype}"]))
    params = dict(host.model.named_parameters())
    assert params["bert.encoder.layer.0.attention.self.query.base.weight"].dtype == getattr(torch, dtype)
    assert params["bert.encoder.layer.0.attention.self.query.cores"].dtype == torch.float32
    assert params["classifier.weight"].dtype == torch.float32
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in update.tensors.values())
    assert math.isfinite(update.train_loss)
    # the update is read off the adapter, not off a half-precision weight difference that would round it away
    deltas = host.layer_deltas({**host.initial_state(), **update.tensors})
    for name, layer in host.adapted.items():
        torch.testing.assert_close(deltas[name], layer.delta_weight().double())


def test_gradient_checkpointing_gives_the_same_update():
    from conftest import TINY_OVERRIDES

    _, plain = one_client_update(load_config(None, TINY_OVERRIDES))
    _, checkpointed = one_client_update(load_config(None, [*TINY_OVERRIDES, "model.gradient_checkpointing=true"]))
    for key, value in plain.tensors.items():
        torch.testing.assert_close(checkpointed.tensors[key], value)
    assert checkpointed.train_loss == pytest.approx(plain.train_loss)


# ------------------------------------------------------------------------------------- configs and reports
@pytest.mark.parametrize("tune_config", sorted(p.name for p in (__import__("pathlib").Path(__file__).parents[1]
                                                                 / "tune_configs").glob("*.yaml")))
def test_every_tune_config_passes_the_offline_dry_run(tune_config, capsys):
    from pathlib import Path

    path = Path(__file__).parents[1] / "tune_configs" / tune_config
    assert main(["sweep", str(path), "--dry-run"]) == 0
    assert "tune config OK" in capsys.readouterr().out


def test_the_report_shows_each_tasks_own_metrics(ray_session, tiny, tmp_path):
    from ravan_ray.report import write_report

    assert cli_run(tiny, "question_answering", tmp_path / "runs" / "qa", "federation.rounds=2") == 0
    report = write_report([tmp_path / "runs"], tmp_path / "report").read_text()
    assert "final test f1 %" in report and "final test exact match %" in report and "final test loss" in report
    assert "Test f1 per round" in report
