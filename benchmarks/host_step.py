"""The Ray-free client step (ModelHost.train_client, then ModelHost.evaluate) of every task on a model of
realistic size built from a config (no download): ViT-B/16, BERT-base, MiniLM, T5-Base, a 1B-class LLaMA.
Measures local steps per second, examples per second and peak memory, in float32 and with a bfloat16
base, at batch 32 and at several clients' batches at once (``--batches 32 96``: what packing 3 clients'
steps into one would buy), and the evaluation of the task's own tiny test split (generation included).
For a GPU machine (the Ray-orchestrated run is a CPU check; this isolates what the accelerator does):

    python benchmarks/host_step.py --out benchmarks/out/host_step            # every task, fp32 and bf16
    python benchmarks/host_step.py --tiny --steps 2 --out /tmp/host_step      # the same path on tiny shapes, on CPU

``--assets DIR``: the output of ``ravan-ray tiny DIR`` (tokenizers, image processor and the tiny test
splits), written beforehand where the offline MiniLM tokenizer is installed. Writes OUT/results.csv and
OUT/results.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ravan_ray.config import load_config  # noqa: E402
from ravan_ray.methods.base import ClientTask  # noqa: E402
from ravan_ray.report import markdown_table  # noqa: E402
from ravan_ray.training import ModelHost  # noqa: E402


def model_dirs(root: Path, tiny: bool, assets: Path) -> dict[str, Path]:
    """Config-only model directories (tokenizers from ravan-ray tiny: speed does not depend on them)."""
    from transformers import BertConfig, LlamaConfig, T5Config, ViTConfig

    vocab = 1000  # the tiny tokenizers' size; the embedding size barely changes a step's time
    configs = {
        "vit": ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
                         patch_size=8) if tiny else ViTConfig(),  # ViTConfig() is ViT-B/16 at 224
        "bert": BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
        if tiny else BertConfig(),  # BERT-base
        "minilm": BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
        if tiny else BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
        "t5": T5Config(vocab_size=vocab, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                       decoder_start_token_id=0) if tiny else
        T5Config(vocab_size=vocab, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12, decoder_start_token_id=0),
        "llama": LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2) if tiny else
        LlamaConfig(vocab_size=vocab, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                    num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),  # Llama-3.2-1B's body
    }
    dirs = {}
    for name, config in configs.items():
        target = root / "models" / name
        target.mkdir(parents=True, exist_ok=True)
        for file in (assets / "models" / ("bert" if name == "minilm" else name)).iterdir():  # tokenizer / processor
            if file.name != "config.json":
                (target / file.name).write_bytes(file.read_bytes())
        if name == "vit":
            processor = json.loads((target / "preprocessor_config.json").read_text())
            processor["size"] = {"height": config.image_size, "width": config.image_size}
            (target / "preprocessor_config.json").write_text(json.dumps(processor))
        config.save_pretrained(target)
        dirs[name] = target
    return dirs


def synthetic_data(task: str, rows: int, length: int, image_size: int, rng: np.random.Generator) -> dict:
    """Arrays of the shapes a task prepares (random content: speed does not depend on it)."""
    tokens = rng.integers(5, 900, size=(rows, length))
    mask = np.ones((rows, length), dtype=np.int64)
    if task == "image_classification":
        return {"pixels": rng.integers(0, 256, size=(rows, image_size, image_size, 3), dtype=np.uint8),
                "labels": rng.integers(0, 10, size=rows)}
    if task == "text_classification":
        return {"input_ids": tokens, "attention_mask": mask, "labels": rng.integers(0, 10, size=rows)}
    if task == "causal_lm":
        labels = tokens.copy()
        labels[:, : length // 2] = -100  # the prompt half
        return {"input_ids": tokens, "attention_mask": mask, "labels": labels}
    if task == "seq2seq":
        return {"input_ids": tokens, "attention_mask": mask, "labels": rng.integers(5, 900, size=(rows, 8))}
    return {"input_ids": tokens, "attention_mask": mask, "start_positions": rng.integers(0, length, size=rows),
            "end_positions": rng.integers(0, length, size=rows)}


SETUPS = {  # name -> (task, model directory, task info, sequence length)
    "image_classification": ("image_classification", "vit", {"label_names": [str(i) for i in range(10)]}, 0),
    "text_classification": ("text_classification", "bert", {"label_names": [str(i) for i in range(10)], "pad_token_id": 0}, 128),
    "minilm_banking77_shape": ("text_classification", "minilm", {"label_names": [str(i) for i in range(77)], "pad_token_id": 0}, 32),
    "question_answering": ("question_answering", "bert", {}, 384),
    "seq2seq": ("seq2seq", "t5", {"pad_token_id": 0, "eos_token_ids": [1]}, 256),
    "causal_lm": ("causal_lm", "llama", {"pad_token_id": 2, "eos_token_ids": [2]}, 512),
}

EVAL_DATA = {  # task -> the tiny dataset of ``ravan-ray tiny`` it evaluates on, and its fields
    "image_classification": ["data.path={data}/images"],
    "text_classification": ["data.path={data}/pairs", "data.text_field=sentence1", "data.text_pair_field=sentence2",
                            "data.max_length=48"],
    "question_answering": ["data.path={data}/squad", "data.max_length=64", "data.doc_stride=16"],
    "seq2seq": ["data.path={data}/topics", "data.max_length=40"],
    "causal_lm": ["data.path={data}/instructions", "data.max_length=112"],
}


def measure(name: str, model_dir: Path, dtype: str, batch: int, assets: Path, args) -> dict:
    task, _, info, length = SETUPS[name]
    config = load_config(None, [f"model.task={task}", f"model.name={model_dir}", f"model.dtype={dtype}",
                                f"federation.local_steps={args.steps}", f"federation.batch_size={batch}",
                                "method.name=ravan", "method.lora_rank=32", "method.heads=4"])
    host = ModelHost(config, info)
    image_size = getattr(host.model.config, "image_size", 224)
    data = synthetic_data(task, batch * 4, max(length // (8 if args.tiny else 1), 8), image_size,
                          np.random.default_rng(0))
    state = host.initial_state()
    host.train_client(ClientTask(0, 1, 1.0, 0), state, None, data)  # warm-up (allocator, kernels)
    cuda = host.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    host.train_client(ClientTask(0, 2, 1.0, 0), state, None, data)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    row = {"setup": name, "model": model_dir.name, "dtype": dtype, "device": host.device.type, "batch": batch,
           "length": length, "steps_per_s": args.steps / seconds, "examples_per_s": args.steps * batch / seconds,
           "peak_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else float("nan"),
           "parameters_m": sum(p.numel() for p in host.model.parameters()) / 1e6}
    if batch == args.batches[0] and task in EVAL_DATA:
        try:
            row.update(evaluation(host, config, task, state, assets, cuda))
        except Exception as error:  # the training numbers above stand; say why this row has no evaluation
            row["eval_error"] = f"{type(error).__name__}: {error}"[:200]
    del host
    if cuda:
        torch.cuda.empty_cache()
    return row


def evaluation(host: ModelHost, config, task: str, state, assets: Path, cuda: bool) -> dict:
    """Rows per second of ModelHost.evaluate on the task's tiny test split, prepared by the task itself with
    this model's tokenizer / image processor (greedy generation for causal_lm and seq2seq)."""
    from ravan_ray.tasks import build_task

    overrides = [o.format(data=assets / "data") for o in EVAL_DATA[task]]
    eval_config = load_config(None, [f"model.task={task}", f"model.name={config.model.name}", *overrides,
                                     "data.max_test_samples=64", "data.partition.kind=iid"])
    prepared = build_task(eval_config).prepare()
    host.task.info.update({k: v for k, v in prepared.info.items() if k not in host.task.info})
    rows = len(next(iter(prepared.test.values())))
    host.evaluate(state, prepared.test, 32)  # warm-up
    if cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    metrics = host.evaluate(state, prepared.test, 32)
    if cuda:
        torch.cuda.synchronize()
    return {"eval_rows": rows, "eval_rows_per_s": rows / (time.perf_counter() - started),
            "eval_metrics": ";".join(f"{k}={v:.3g}" for k, v in metrics.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/out/host_step")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (a CPU check of the path)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batches", type=int, nargs="+", default=[32])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--only", nargs="*", help=f"setups among {list(SETUPS)}")
    parser.add_argument("--assets", help="a `ravan-ray tiny` directory (default: written here)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        if args.assets:
            assets = Path(args.assets)
        else:
            from ravan_ray.tiny import write_tiny_assets

            assets = write_tiny_assets(Path(scratch) / "assets")
        dirs = model_dirs(Path(scratch), args.tiny, assets)
        for name, (_, model, _, _) in SETUPS.items():
            if args.only and name not in args.only:
                continue
            for dtype in args.dtypes:
                for batch in args.batches:
                    rows.append(measure(name, dirs[model], dtype, batch, assets, args))
                    print(rows[-1], flush=True)
                    table = pd.DataFrame(rows)  # written after every row: a run cut short keeps what it measured
                    table.to_csv(out / "results.csv", index=False)
    (out / "results.md").write_text(markdown_table(list(table.columns), [
        [f"{v:.3g}" if isinstance(v, float) else v for v in row] for row in table.itertuples(index=False)]) + "\n")
    print(table.to_string(index=False))


if __name__ == "__main__":
    main()
