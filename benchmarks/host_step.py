"""The Ray-free client step (ModelHost.train_client, then ModelHost.evaluate) of every task on a model of
realistic size built from a config (no download): ViT-B/16, BERT-base / MiniLM, T5-Base, a 1B-class LLaMA.
Measures steps per second and peak memory, in float32 and with a bfloat16 base. For a GPU machine (the
Ray-orchestrated run is a CPU check; this isolates what the accelerator does):

    python benchmarks/host_step.py --out benchmarks/out/host_step            # every task, fp32 and bf16
    python benchmarks/host_step.py --tiny --steps 2 --out /tmp/host_step      # the same path on tiny shapes, on CPU

Writes OUT/results.csv and OUT/results.md.
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


def model_dirs(root: Path, tiny: bool) -> dict[str, Path]:
    """Config-only model directories (tokenizers from ravan-ray tiny: speed does not depend on them)."""
    from transformers import BertConfig, LlamaConfig, T5Config, ViTConfig

    from ravan_ray.tiny import write_tiny_assets

    assets = write_tiny_assets(root / "assets")
    vocab = 1000  # the tiny tokenizers' size; the embedding size barely changes a step's time
    configs = {
        "vit": ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
                         patch_size=8) if tiny else ViTConfig(),  # ViTConfig() is ViT-B/16 at 224
        "bert": BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
        if tiny else BertConfig(),  # BERT-base
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
        for file in (assets / "models" / name).iterdir():  # tokenizer / image processor
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


SETUPS = {  # task -> (model directory, task info, sequence length)
    "image_classification": ("vit", {"label_names": [str(i) for i in range(10)]}, 0),
    "text_classification": ("bert", {"label_names": [str(i) for i in range(10)], "pad_token_id": 0}, 128),
    "question_answering": ("bert", {}, 384),
    "seq2seq": ("t5", {"pad_token_id": 0, "eos_token_ids": [1]}, 256),
    "causal_lm": ("llama", {"pad_token_id": 2, "eos_token_ids": [2]}, 512),
}


def measure(task: str, model_dir: Path, info: dict, length: int, dtype: str, args) -> dict:
    config = load_config(None, [f"model.task={task}", f"model.name={model_dir}", f"model.dtype={dtype}",
                                f"federation.local_steps={args.steps}", f"federation.batch_size={args.batch}",
                                "method.name=ravan", "method.lora_rank=32", "method.heads=4"])
    host = ModelHost(config, info)
    image_size = getattr(host.model.config, "image_size", 224)
    data = synthetic_data(task, args.batch * 4, max(length // (8 if args.tiny else 1), 8), image_size,
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
    row = {"task": task, "model": model_dir.name, "dtype": dtype, "device": host.device.type, "batch": args.batch,
           "length": length, "steps_per_s": args.steps / seconds,
           "peak_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else float("nan"),
           "parameters_m": sum(p.numel() for p in host.model.parameters()) / 1e6}
    del host
    if cuda:
        torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/out/host_step")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (a CPU check of the path)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--only", nargs="*")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        dirs = model_dirs(Path(scratch), args.tiny)
        rows = [measure(task, dirs[model], info, length, dtype, args)
                for task, (model, info, length) in SETUPS.items() if not args.only or task in args.only
                for dtype in ("float32", "bfloat16")]
    table = pd.DataFrame(rows)
    table.to_csv(out / "results.csv", index=False)
    (out / "results.md").write_text(markdown_table(list(table.columns), [
        [f"{v:.3g}" if isinstance(v, float) else v for v in row] for row in table.itertuples(index=False)]) + "\n")
    print(table.to_string(index=False))


if __name__ == "__main__":
    main()
