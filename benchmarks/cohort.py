"""Cohort training benchmarks (ravan_ray/cohort.py).

    python benchmarks/cohort.py peer  --out benchmarks/out/cohort   # the peer workload, cohort 1 vs 3, FedIT + Ravan
    python benchmarks/cohort.py scale --out benchmarks/out/cohort   # 10,000 clients, 100 a round, pool mode
    python benchmarks/cohort.py step  --out benchmarks/out/cohort   # client-steps/s and peak memory vs cohort size
    python benchmarks/cohort.py shapes --out DIR                    # MiniLM / BERT-base / ViT-B/16 / tiny BERT shapes
    python benchmarks/cohort.py layer --sizes 3 8 --steps 5        # one adapted layer: alone, vmap, cohort_forward
    python benchmarks/cohort.py costs --out DIR                     # DIR/step.csv -> the CIFAR-100 run, the goals

``peer``: the peer workload of benchmarks/peer.py (MiniLM, Banking77, LoRA r=8 / Ravan at the same budget, 3
clients a round x 10 local steps of 32) through ``ravan-ray run``, once with every client alone (three
single-threaded actors share the 2 cores, the CPU default) and once with the round's 3 clients as one cohort on one
actor that takes both cores; with ``--gpu``, three actors of a third of a GPU each against one actor of the whole
GPU. ``--rounds`` (default 4) keeps it short; the first round includes the start-up.

``scale``: a tiny BERT, 10,000 clients (Banking77's 10,003 training queries, iid: one or two each), 100 clients a
round in pool mode (2 actors), cohort 1 against ``--cohort-size``: seconds per round and the machine's peak memory
in use (MemTotal - MemAvailable, sampled every 0.2 s, less what was in use before the run). ``--set key=value``
(repeatable, applied last) changes the population, the model and the resources, e.g. 1,000 MiniLM-shaped clients
on four 0.25-GPU actors (benchmarks/gpu.sh).

``step``: Ray-free, one ModelHost: the client-steps per second of a cohort of k clients (k = 1, 3, 8, 32, 100
by default) for the shapes named by ``--models`` (config directories or hub ids; weights are random when a
directory has only a config), in the precisions of ``--dtypes``, for Ravan and FedIT, with the peak memory
(CUDA's allocator peak; on a CPU the process's peak RSS). Meant for a GPU; on a CPU it measures the CPU. A
directory whose config names an ``image_size`` is measured as image classification (uint8 images through its image
processor, as a run does), any other as text classification (64 tokens a row). ``shapes`` writes the directories
``--shapes`` measures; benchmarks/gpu.sh runs all of it, and a federation, on a GPU machine. Each (model, dtype,
method) first takes one untimed single-client step, so CUDA's start-up (context, cuBLAS handles, kernel choice)
is not charged to cohort size 1.

``costs``: from OUT/step.csv, the two GPU goals (a 3-client ViT-B/16 round of 50 steps in at most half the
one-by-one time; a 32-client MiniLM round of 10 steps in at most a fifth), with what the paper's CIFAR-100 setup
(ViT-B/16, 50 such rounds) costs in device-minutes of client training per run, one by one and as cohorts of 3. A
round's time at cohort size k is k clients x steps / (client-steps/s at k); evaluation and aggregation are not in
it.

``process_s``: the command's wall time (start-up, data preparation and model loads included); ``run_s``: the
run's own wall time (metrics.csv's last wall_s). Writes OUT/<kind>.csv and OUT/<kind>.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from peer import WORKLOAD  # noqa: E402
from systems import md_table  # noqa: E402


def memory_in_use() -> int:
    with open("/proc/meminfo") as meminfo:
        fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in meminfo}
    return fields["MemTotal"] - fields["MemAvailable"]


class PeakMemory:
    """The machine's peak memory in use while the block runs, above what was in use before it."""

    def __enter__(self):
        self.baseline = self.peak = memory_in_use()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, memory_in_use())
            time.sleep(0.2)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.used = self.peak - self.baseline
        return False


def ravan_run(run_dir: Path, overrides: list[str]) -> tuple[float, pd.DataFrame]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
    command = [sys.executable, "-m", "ravan_ray.cli", "run", "--output", str(run_dir), "--quiet",
               *[arg for o in overrides for arg in ("--set", o)]]
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env, cwd=ROOT)
    return time.perf_counter() - started, pd.read_csv(run_dir / "metrics.csv")


def peer(out: Path, rounds: int, extra: list[str], gpu: bool) -> pd.DataFrame:
    if gpu:  # three actors on a third of the GPU each, against one actor with the whole GPU training all three
        alone = ["resources.gpus_per_client=0.33", "resources.cpus_per_client=2", "resources.pool_size=3"]
        cohort = ["resources.cohort_size=3", "resources.gpus_per_client=1", "resources.cpus_per_client=2",
                  "resources.pool_size=1"]
        settings = {"alone (3 actors x 1/3 GPU)": ("alone", alone), "cohort of 3 (1 actor x 1 GPU)": ("cohort", cohort)}
    else:
        settings = {"alone (3 actors x 1 core)": ("1", ["resources.cpus_per_client=1"]),
                    "cohort of 3 (1 actor x 2 cores)": ("3", ["resources.cohort_size=3",
                                                              "resources.cpus_per_client=2"])}
    rows = []
    for method in ("fedit", "ravan"):
        for label, (run_name, setting) in settings.items():
            overrides = [f"{k}={v}" for k, v in {**WORKLOAD, "method.name": method, "federation.rounds": rounds,
                                                 "federation.eval_every": rounds}.items()] + setting + extra
            wall, metrics = ravan_run(out / "runs" / f"{method}-{run_name}", overrides)
            steady = metrics["round_s"].iloc[1:]
            rows.append({"method": method, "training": label, "process_s": round(wall, 1),
                         "run_s": round(float(metrics["wall_s"].iloc[-1]), 1),
                         "s_per_round": round(float(metrics["round_s"].mean()), 2),
                         "steady_s_per_round": round(float(steady.mean()), 2),
                         "final_train_loss": round(float(metrics["train_loss"].iloc[-1]), 4),
                         "test_accuracy": round(float(metrics["test_accuracy"].iloc[-1]), 4)})
            print(rows[-1], flush=True)
    return pd.DataFrame(rows)


def scale(out: Path, rounds: int, cohort_size: str, extra: list[str]) -> pd.DataFrame:
    rows = []
    for size in dict.fromkeys(["1", str(cohort_size)]):
        overrides = ["model.name=tiny-bert", "data.name=banking77",
                     "data.max_test_samples=200", "data.max_length=24", "data.partition.kind=iid",
                     "data.partition.min_size=1", "federation.num_clients=10000", "federation.clients_per_round=100",
                     f"federation.rounds={rounds}", "federation.local_steps=2", "federation.batch_size=4",
                     f"federation.eval_every={rounds}", "resources.cpus_per_client=1", "resources.pool_size=2",
                     "output.checkpoint_every=1000", f"resources.cohort_size={size}", "seed=0", *extra]
        settings = dict(o.split("=", 1) for o in overrides)
        with PeakMemory() as peak:
            wall, metrics = ravan_run(out / "runs" / f"scale-cohort{size}", overrides)
        rows.append({"model": Path(settings["model.name"]).name, "clients": int(settings["federation.num_clients"]),
                     "per_round": int(settings["federation.clients_per_round"]), "cohort_size": size,
                     "pool": settings["resources.pool_size"], "process_s": round(wall, 1),
                     "run_s": round(float(metrics["wall_s"].iloc[-1]), 1),
                     "first_round_s": round(float(metrics["round_s"].iloc[0]), 2),
                     "steady_s_per_round": round(float(metrics["round_s"].iloc[1:].mean()), 2),
                     "peak_memory_gb": round(peak.used / 2**30, 2)})
        print(rows[-1], flush=True)
    return pd.DataFrame(rows)


# The two GPU goals: (shape, clients a round, local steps, the cohort round's largest share of the
# one-by-one round's time). The first is also the paper's CIFAR-100 setup, whose 50 rounds give a run's cost.
GOALS = (("vit-b16", 3, 50, 0.5), ("minilm-l6", 32, 10, 0.2))
CIFAR100_ROUNDS = 50


def costs(steps_per_s: pd.DataFrame) -> pd.DataFrame:
    """The goals read off ``step``'s client-steps/s (see the docstring): per goal shape, precision and method, the
    round one by one (k clients x steps at cohort 1's rate) against the round as one cohort (at cohort k's rate)."""
    rates = steps_per_s.set_index(["model", "dtype", "method", "cohort"]).sort_index()["client_steps_per_s"]
    rows = []
    for model, clients, local_steps, share in GOALS:
        for (dtype, method), by_size in rates[rates.index.get_level_values("model") == model].groupby(level=[1, 2]):
            by_size = by_size.droplevel([0, 1, 2])
            if not {1, clients} <= set(by_size.index):
                continue
            alone, cohort = (clients * local_steps / by_size[k] for k in (1, clients))
            cifar100 = model == GOALS[0][0]
            rows.append({"model": model, "dtype": dtype, "method": method, "clients": clients,
                         "local_steps": local_steps, "round_s_one_by_one": round(alone, 2),
                         "round_s_cohort": round(cohort, 2), "ratio": round(cohort / alone, 3),
                         "goal": f"<= {share}", "met": bool(cohort <= share * alone),
                         "cifar100_run_min_one_by_one": round(CIFAR100_ROUNDS * alone / 60, 1) if cifar100 else None,
                         "cifar100_run_min_cohort": round(CIFAR100_ROUNDS * cohort / 60, 1) if cifar100 else None})
    if not rows:
        raise SystemExit("step.csv has no rows at cohort 1 and the goal's size for " +
                         " or ".join(f"{model} (cohort {clients})" for model, clients, *_ in GOALS))
    return pd.DataFrame(rows)


SHAPES = ("minilm-l6", "bert-base", "vit-b16", "tiny-bert")


def write_shapes(folder: Path) -> list[str]:
    """Config-only directories (random weights, no hub download) of the shapes the GPU plan names: MiniLM-L6
    (all-MiniLM-L6-v2's config: 6 layers, 384 wide, 12 heads) and BERT-base (bert-base-uncased's config), both with
    the tiny BERT's tokenizer files (the same uncased WordPiece vocabulary of 30,522), ViT-B/16 at
    224 px (google/vit-base-patch16-224's config and image processor), and the tests' tiny BERT as the launch-bound
    extreme. A directory with a config and no weights builds its model from the config (ravan_ray/models.py), so
    the folder is all a machine without network access needs."""
    from transformers import BertConfig, ViTConfig, ViTImageProcessor

    from ravan_ray.tiny import write_bert

    minilm, bert, vit, tiny = (folder / name for name in SHAPES)
    write_bert(tiny)
    BertConfig().save_pretrained(bert)  # the defaults are bert-base: 12 layers, 768 wide, vocab 30,522
    BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
               intermediate_size=1536).save_pretrained(minilm)
    for text_model in (bert, minilm):
        for tokenizer_file in tiny.glob("*"):
            if tokenizer_file.name != "config.json":
                shutil.copy(tokenizer_file, text_model / tokenizer_file.name)
    ViTConfig().save_pretrained(vit)  # the defaults are ViT-B/16 at 224 x 224
    ViTImageProcessor().save_pretrained(vit)
    return [str(minilm), str(bert), str(vit), str(tiny)]


def is_image_model(model: str) -> bool:
    config = Path(model) / "config.json"
    return config.exists() and "image_size" in json.loads(config.read_text())


def step(out: Path, models: list[str], dtypes: list[str], sizes: list[int], steps: int) -> pd.DataFrame:
    import numpy as np
    import torch

    from ravan_ray.config import load_config
    from ravan_ray.cohort import train_cohort
    from ravan_ray.methods.base import ClientTask
    from ravan_ray.training import ModelHost

    rows = []
    for model in models:
        for dtype in dtypes:
            for method in ("ravan", "fedit"):
                image = is_image_model(model)
                config = load_config(None, [f"model.name={model}", f"model.dtype={dtype}", f"method.name={method}",
                                            f"federation.local_steps={steps}", "federation.batch_size=32",
                                            "model.dropout=0"]
                                     + (["model.task=image_classification"] if image else []))
                host = ModelHost(config, {"label_names": [str(i) for i in range(10)], "pad_token_id": 0})
                state = host.initial_state()
                rng = np.random.default_rng(0)

                def data():
                    labels = rng.integers(0, 10, 64)
                    if image:
                        # uint8 pixels at the processor's size, as the image task keeps them; the processor's
                        # normalisation on the CPU is part of every step, as in a run
                        return {"pixels": rng.integers(0, 256, (64, 224, 224, 3), dtype=np.uint8), "labels": labels}
                    ids = rng.integers(1000, 20000, (64, 64))
                    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels}

                train_cohort(host, [ClientTask(0, 1, 1.0, 0)], state, [None], [data()])  # warm-up, untimed
                for k in sizes:
                    tasks = [ClientTask(c, 1, 1.0, 0) for c in range(k)]
                    datas = [data() for _ in tasks]
                    if host.device.type == "cuda":
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                    started = time.perf_counter()
                    train_cohort(host, tasks, state, [None] * k, datas)
                    if host.device.type == "cuda":
                        torch.cuda.synchronize()
                        peak = torch.cuda.max_memory_allocated() / 2**30
                    else:
                        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
                    seconds = time.perf_counter() - started
                    rows.append({"model": Path(model).name, "dtype": dtype, "method": method, "cohort": k,
                                 "client_steps_per_s": round(k * steps / seconds, 3), "peak_memory_gb": round(peak, 2),
                                 "device": host.device.type})
                    print(rows[-1], flush=True)
    return pd.DataFrame(rows)


def layer(sizes: list[int], reps: int) -> pd.DataFrame:
    """Forward + backward of one adapted 384-wide layer (MiniLM's query) for a cohort of k clients, each with 32 rows
    of 64 tokens: the clients one after another, the cohort through vmap of the layer's forward, and through the
    layer's own ``cohort_forward``. Milliseconds per cohort step (best of ``reps``)."""
    import torch
    from torch.func import functional_call, vmap

    from ravan_ray.adapters import LoRALinear
    from ravan_ray.methods.ravan import RavanLinear

    torch.manual_seed(0)
    rows, width = 32 * 64, 384
    out = []
    for kind in ("ravan", "lora"):
        base = torch.nn.Linear(width, width)
        adapted = RavanLinear(base, heads=4, rank=39) if kind == "ravan" else LoRALinear(base, rank=8)
        for k in sizes:
            x = torch.randn(k * rows, width, requires_grad=True)
            stacked = {name: getattr(adapted, name).detach().expand(k, *getattr(adapted, name).shape).clone()
                       .requires_grad_(True) for name in adapted.trainable_names}
            stacked["lora_B" if kind == "lora" else "cores"].data.normal_(0, 0.01)

            def alone():
                for c in range(k):
                    functional_call(adapted, {n: t[c] for n, t in stacked.items()}, (x[c * rows:(c + 1) * rows],),
                                    strict=False).square().mean().backward()

            def mapped():
                blocks = x.unflatten(0, (k, -1))
                vmap(lambda t, r: functional_call(adapted, t, (r,), strict=False))(stacked, blocks) \
                    .square().mean().backward()

            def batched():
                adapted.cohort_forward(x.unflatten(0, (k, -1)), stacked).square().mean().backward()

            timings = {}
            for label, step_fn in (("alone", alone), ("vmap", mapped), ("cohort_forward", batched)):
                step_fn()
                best = math.inf
                for _ in range(reps):
                    started = time.perf_counter()
                    step_fn()
                    best = min(best, time.perf_counter() - started)
                timings[label] = round(best * 1e3, 1)
            out.append({"layer": kind, "cohort": k, **{f"{label}_ms": v for label, v in timings.items()},
                        "torch_threads": torch.get_num_threads()})
            print(out[-1], flush=True)
    return pd.DataFrame(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["peer", "scale", "step", "shapes", "layer", "costs"])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "cohort")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--cohort-size", default="50", help="scale: the cohort size compared with 1 (or auto)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="peer, scale: a config override applied after the benchmark's own (repeatable)")
    parser.add_argument("--gpu", action="store_true",
                        help="peer: three 1/3-GPU actors one by one against one whole-GPU actor's cohort of 3")
    parser.add_argument("--models", nargs="*", default=["minilm"])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[1, 3, 8, 32, 100])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--shapes", type=Path, default=None,
                        help="step: also measure the directories `shapes` wrote there (MiniLM, BERT-base, ViT-B/16, "
                             "tiny BERT)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.kind == "shapes":
        print("\n".join(write_shapes(args.out)))
        return
    if args.kind == "peer":
        table = peer(args.out, args.rounds, args.overrides, args.gpu)
    elif args.kind == "scale":
        table = scale(args.out, args.rounds, args.cohort_size, args.overrides)
    elif args.kind == "layer":
        table = layer(args.sizes, args.steps)
    elif args.kind == "costs":
        table = costs(pd.read_csv(args.out / "step.csv"))
    else:
        shapes = [str(args.shapes / name) for name in SHAPES] if args.shapes else []
        models = args.models + shapes
        table = step(args.out, models, args.dtypes, args.sizes, args.steps)
    table.to_csv(args.out / f"{args.kind}.csv", index=False)
    markdown = md_table(list(table.columns), table.astype(object).values.tolist())
    (args.out / f"{args.kind}.md").write_text(markdown + "\n")
    print(markdown)


if __name__ == "__main__":
    main()
