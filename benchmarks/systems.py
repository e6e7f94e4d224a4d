"""Systems benchmarks of the federated loop: Ray overhead, parallelism, actor memory, server share,
communication. Each subcommand prints a markdown table (and writes it to OUT/<name>.md).

    python benchmarks/systems.py overhead   [--rounds 6] [--local-steps 10] [--data PATH]
    python benchmarks/systems.py parallel   [--rounds 4] [--local-steps 5]
    python benchmarks/systems.py memory     [--actors 1 4 8 16]
    python benchmarks/systems.py comm       [--methods ...]          # also the server-share table
    python benchmarks/systems.py all

Every run uses the product's own ``run_federation`` (one Ray session per subcommand, started here, so
Ray start-up is measured once and reported separately). ``--data`` takes a jsonl/csv folder (e.g. the
20 Newsgroups folder); without it the generated default data set is used. ``--set k=v`` adds config
overrides to every run.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ravan_ray.config import load_config  # noqa: E402
from ravan_ray.methods import REGISTRY  # noqa: E402

METHODS = list(REGISTRY)  # every method behind the protocol


def machine() -> str:
    import torch
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, "
            f"torch {torch.__version__}, python {platform.python_version()}, {platform.system()}")


def base_overrides(args, extra: list[str]) -> list[str]:
    sets = [f"output.checkpoint_every=1000", "output.keep_checkpoints=1"]
    if args.data:
        sets.append(f"data.path={args.data}")
    return sets + list(args.set or []) + extra


def md_table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def emit(args, name: str, text: str) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(text + "\n")
    print(text, flush=True)


def start_ray(num_cpus: int, num_gpus: float = 0.0) -> float:
    import logging
    import ray
    t = time.perf_counter()
    ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=False)
    return time.perf_counter() - t


def stop_ray() -> None:
    import ray
    ray.shutdown()


def fed_run(sets: list[str], run_dir: Path, on_round=None) -> tuple[pd.DataFrame, pd.DataFrame, float]:
    from ravan_ray.federation import run_federation
    config = load_config(None, sets)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    t = time.perf_counter()
    run_federation(config, run_dir, on_round=on_round)
    wall = time.perf_counter() - t
    metrics = pd.read_csv(run_dir / "metrics.csv")
    clients = pd.read_csv(run_dir / "clients.csv")
    return metrics, clients, wall


# ----------------------------------------------------------------------------------------- overhead
def overhead(args) -> None:
    import torch
    from ravan_ray.budgets import client_levels
    from ravan_ray.federation import prepare_data, sample_clients
    from ravan_ray.methods.base import ClientTask
    from ravan_ray.training import ModelHost

    R = args.rounds
    sets = base_overrides(args, [f"federation.rounds={R}", f"federation.local_steps={args.local_steps}",
                                 f"federation.eval_every={R}", "resources.pool_size=1",
                                 "resources.cpus_per_client=1", f"method.name={args.method}"])
    config = load_config(None, sets)
    fed = config.federation

    # plain: one process, the same client tasks in the same order, same thread count, no Ray
    t0 = time.perf_counter()
    data = prepare_data(config)
    prep_s = time.perf_counter() - t0
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    host = ModelHost(config, data.task_info)
    load_s = time.perf_counter() - t0
    state = host.initial_state()
    levels = client_levels(fed.num_clients, config.compute.distribution, config.compute.levels, config.seed)
    plain_rounds = []
    for r in range(1, R + 1):
        t = time.perf_counter()
        updates = []
        for cid in sample_clients(config.seed, r, fed.num_clients, fed.clients_per_round):
            rows = data.partitions[cid]
            local = {k: v[rows] for k, v in data.train.items()}
            updates.append(host.train_client(ClientTask(cid, r, float(levels[cid]), config.seed), state, None, local))
        state = host.method.aggregate(state, updates, r)
        plain_rounds.append(time.perf_counter() - t)
    t = time.perf_counter()
    host.evaluate(state, data.test, 128)
    plain_eval = time.perf_counter() - t
    del host
    plain_train = sum(plain_rounds)

    ray_start = start_ray(args.num_cpus)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        metrics, clients, wall = fed_run(sets, Path(tmp) / "run")
    stop_ray()
    rs = metrics["round_s"].tolist()
    steady_fed = statistics.median(rs[1:-1])
    steady_plain = statistics.median(plain_rounds[1:-1])
    client_s = clients.groupby("round")["seconds"].sum()
    # end-to-end: the federated run (without ray.init) vs plain (data prep + model load + training + eval)
    plain_e2e = prep_s + load_s + plain_train + plain_eval
    fed_e2e = wall
    # without one-off start-up and evaluation: rounds 2..R-1 sum vs the same plain rounds
    fed_mid = sum(rs[1:-1])
    plain_mid = sum(plain_rounds[1:-1])
    rows = [
        ["steady-state per round (median of rounds 2..R-1)", f"{steady_plain:.2f}", f"{steady_fed:.2f}",
         f"{steady_fed / steady_plain:.3f}"],
        ["rounds 2..R-1 summed", f"{plain_mid:.2f}", f"{fed_mid:.2f}", f"{fed_mid / plain_mid:.3f}"],
        ["end-to-end (data prep + model load + R rounds + final eval; Ray start excluded)", f"{plain_e2e:.2f}",
         f"{fed_e2e:.2f}", f"{fed_e2e / plain_e2e:.3f}"],
    ]
    detail = md_table(["one-off / component", "seconds"], [
        ["ray.init (federated only)", f"{ray_start:.2f}"],
        ["data prep, plain (tokenize + partition; also inside the federated run)", f"{prep_s:.2f}"],
        ["model load, plain (ModelHost)", f"{load_s:.2f}"],
        ["round 1, federated (includes actor + server model load)", f"{rs[0]:.2f}"],
        [f"round {R}, federated (includes final evaluation + checkpoint)", f"{rs[-1]:.2f}"],
        ["final evaluation, plain", f"{plain_eval:.2f}"],
        ["client training seconds in rounds 2..R-1 as the actor measured them (clients.csv)",
         f"{client_s.iloc[1:-1].sum():.2f}"],
        ["server aggregation, rounds 2..R-1 (agg_s)", f"{metrics['agg_s'].iloc[1:-1].sum():.3f}"],
    ])
    ratio = steady_fed / steady_plain
    text = (f"Overhead: method={args.method}, {fed.clients_per_round} clients/round, {fed.local_steps} local steps x "
            f"batch {fed.batch_size}, max_length {config.data.max_length}, R={R} rounds, pool_size 1, 1 CPU/client, "
            f"torch threads 1, data={'path ' + args.data if args.data else 'generated'}\n\n"
            + md_table(["measure", "plain (s)", "federated (s)", "ratio"], rows) + "\n\n" + detail +
            f"\n\nTarget steady-state ratio <= 1.10: {'met' if ratio <= 1.10 else 'NOT met'} ({ratio:.3f}).")
    emit(args, "overhead", text)


# ----------------------------------------------------------------------------------------- parallel
def parallel(args) -> None:
    R = args.rounds
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        # (label, ray cpus, ray gpus, extra sets) ; clients_per_round varies inside
        settings = [
            ("pool, 1 CPU each, Ray num_cpus=2", 2, 0, ["resources.actor_mode=pool"], args.clients),
            ("per_client, 1 CPU each, Ray num_cpus=8 (logical; 2 physical cores)", 8, 0,
             ["resources.actor_mode=per_client"], [1, 4]),
            ("pool, 0.25 GPU + 1 CPU each, Ray num_gpus=1, num_cpus=8 (logical)", 8, 1,
             ["resources.actor_mode=pool", "resources.gpus_per_client=0.25"], [1, 4]),
        ]
        for label, cpus, gpus, extra, counts in settings:
            start = start_ray(cpus, gpus)
            base = None
            for m in counts:
                sets = base_overrides(args, extra + [
                    f"federation.rounds={R}", f"federation.local_steps={args.local_steps}", f"federation.eval_every={R}",
                    "federation.num_clients=8", f"federation.clients_per_round={m}", "resources.cpus_per_client=1",
                    "data.max_test_samples=64"])
                metrics, clients, wall = fed_run(sets, Path(tmp) / f"p{m}")
                rs = metrics["round_s"].tolist()
                steady = statistics.median(rs[1:-1]) if R > 2 else rs[-1]
                pids = clients["pid"].nunique()
                gpu_ids = sorted(set(str(g) for g in clients["gpu_ids"].dropna())) if "gpu_ids" in clients else []
                per_client_s = clients[clients["round"].between(2, R - 1)]["seconds"].mean()
                thr = m / steady
                if base is None:
                    base = thr
                rows.append([label, m, pids, f"{steady:.2f}", f"{per_client_s:.2f}", f"{thr:.2f}", f"{thr / base:.2f}",
                             ",".join(gpu_ids) or "-"])
                print(rows[-1], flush=True)
            stop_ray()
    text = (f"Parallelism: R={R} rounds, {args.local_steps} local steps x batch 32, 8 clients, generated data unless "
            f"--data; steady = median round_s over rounds 2..R-1.\n\n" +
            md_table(["setting", "clients/round", "actor pids", "round s (steady)", "mean client train s",
                      "clients/s", "speed-up vs 1", "GPU ids seen"], rows))
    emit(args, "parallel", text)


# ----------------------------------------------------------------------------------------- memory
def proc_memory(pid: int) -> dict[str, int]:
    """rss, pss, uss (private clean + dirty) in bytes, from /proc/PID/smaps_rollup (Linux)."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[-1] == "kB":
            fields[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return {"rss": fields.get("Rss", 0), "pss": fields.get("Pss", 0),
            "uss": fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)}


IMPORT_FLOOR = """
import re, sys
def uss():
    text = open("/proc/self/smaps_rollup").read()
    return sum(int(v) for v in re.findall(r"Private_(?:Clean|Dirty):\\s+(\\d+) kB", text)) * 1024
import ray, torch, transformers, ravan_ray.training
print(uss())
"""


def import_floor() -> int:
    """USS of a bare Python process that has imported what every actor imports (ray, torch, transformers):
    the part of an actor's memory no weight sharing can remove."""
    import subprocess
    out = subprocess.run([sys.executable, "-c", IMPORT_FLOOR], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def memory(args) -> None:
    mb = 1 << 20
    rows, inc = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for share in args.share:
            previous = None
            for n in args.actors:
                start_ray(max(n, 2))
                sample: dict = {}
                run_dir = Path(tmp) / f"{share}{n}"

                def on_round(row, ckpt, run_dir=run_dir):  # the actors are alive while this runs
                    clients = pd.read_csv(run_dir / "clients.csv")
                    pids = sorted(set(int(p) for p in clients["pid"].dropna()))
                    totals = {"rss": 0, "uss": 0, "pss": 0}
                    for pid in pids:
                        for key, value in proc_memory(pid).items():
                            totals[key] += value
                    sample.update(pids=len(pids), **totals)

                sets = base_overrides(args, [
                    "federation.rounds=1", "federation.local_steps=1", "federation.eval_every=1",
                    f"federation.num_clients={max(n, 2)}", f"federation.clients_per_round={n}",
                    "resources.actor_mode=per_client", "resources.cpus_per_client=1", "data.max_test_samples=64",
                    f"resources.share_frozen_weights={share == 'shared'}"])
                fed_run(sets, run_dir, on_round=on_round)
                stop_ray()
                row = [share, n, sample["pids"], *(f"{sample[k] / mb:.0f}" for k in ("rss", "uss", "pss")),
                       f"{sample['uss'] / mb / sample['pids']:.0f}"]
                rows.append(row)
                print(row, flush=True)
                if previous is not None:
                    step = n - previous["n"]
                    inc.append([share, f"{previous['n']} -> {n}",
                                *(f"{(sample[k] - previous[k]) / mb / step:.0f}" for k in ("rss", "uss", "pss"))])
                previous = {"n": n, **sample}
    text = ("Memory of the client actors (per_client mode, one actor per client, minilm, measured while the actors "
            "are alive after one round of 1 local step; RSS counts shared pages in every process, USS is memory "
            "unique to the process, PSS splits shared pages among their users). shared = "
            "resources.share_frozen_weights=true (the default): the pretrained weights are mapped from Ray's "
            "object store, whose single copy (in /dev/shm, held by the raylet) is not in any actor's USS.\n\n" +
            md_table(["weights", "actors", "pids", "RSS total MB", "USS total MB", "PSS total MB", "USS/actor MB"], rows) +
            "\n\nPer extra actor:\n\n" + md_table(["weights", "step", "RSS MB/actor", "USS MB/actor", "PSS MB/actor"], inc) +
            f"\n\nImport floor (USS of a bare process after `import ray, torch, transformers`): {import_floor() / mb:.0f} MB")
    emit(args, "memory", text)


# ----------------------------------------------------------------------------------------- comm + server share
def comm(args) -> None:
    import yaml
    rows, share_rows = [], []
    start = start_ray(args.num_cpus)
    with tempfile.TemporaryDirectory() as tmp:
        plan = [(m, False, 2, 1) for m in args.methods] + [(m, True, 3, args.local_steps) for m in args.share_methods]
        for method, head, R, steps in plan:
                sets = base_overrides(args, [
                    f"method.name={method}", f"model.train_head={str(head).lower()}", f"federation.rounds={R}",
                    "federation.eval_every=100", f"federation.local_steps={steps}",
                    "data.max_test_samples=64"])
                try:
                    metrics, clients, wall = fed_run(sets, Path(tmp) / f"{method}{head}")
                except Exception as error:  # report and continue with the other methods
                    rows.append([method, head, "error", type(error).__name__, str(error)[:80], "", "", ""])
                    print(rows[-1], flush=True)
                    continue
                cfg = yaml.safe_load((Path(tmp) / f"{method}{head}" / "config.yaml").read_text())
                res = cfg.get("resolved", {}).get("method", cfg.get("resolved", {}))
                rank = res.get("rank_per_head") or res.get("rank")
                rank_s = sorted(set(rank.values())) if isinstance(rank, dict) else rank
                m = metrics["clients"].astype(float)
                up = (metrics["uplink_bytes"] / m)
                down = (metrics["downlink_bytes"] / m)
                rows.append([method, head, rank_s, f"{up.iloc[0]:,.0f}", f"{up.iloc[1]:,.0f}", f"{down.iloc[0]:,.0f}",
                             f"{down.iloc[1]:,.0f}", f"{metrics['heads_trained'].mean():.2f}"])
                print(rows[-1], flush=True)
                if head:
                    r2 = metrics.iloc[1]
                    share_rows.append([method, f"{r2['agg_s'] * 1000:.1f}", f"{r2['round_s']:.2f}",
                                       f"{100 * r2['agg_s'] / r2['round_s']:.2f}%",
                                       f"{100 * metrics['agg_s'].iloc[1:].sum() / metrics['round_s'].iloc[1:].sum():.2f}%"])
    stop_ray()
    text = ("Communication per client per round (bytes; uplink = metrics.csv uplink_bytes / clients, downlink = "
            "downlink_bytes / clients), rounds 1 and 2; train_head=false rows: 2-round runs of 1 local step; "
            "train_head=true rows: the server-share runs\n\n" +
            md_table(["method", "train_head", "resolved rank(s)", "uplink r1", "uplink r2", "downlink r1", "downlink r2",
                      "heads trained (mean)"], rows))
    emit(args, "comm", text)
    text = (f"Server aggregation share (agg_s / round_s, round 2 of 3, train_head=true, {args.local_steps} local steps, "
            f"{'data ' + args.data if args.data else 'generated data'})\n\n" +
            md_table(["method", "agg ms", "round s", "share round 2", "share rounds 2-3"], share_rows) +
            "\n\nTarget < 2%: " + ("met for all" if all(float(r[3][:-1]) < 2 for r in share_rows) else
                                  "NOT met for: " + ", ".join(r[0] for r in share_rows if float(r[3][:-1]) >= 2)))
    emit(args, "server", text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["overhead", "parallel", "memory", "comm", "all"])
    p.add_argument("--data", default=None, help="dataset folder/file (data.path); default: generated data")
    p.add_argument("--set", action="append", help="extra config override k=v (repeatable)")
    p.add_argument("--out", default="benchmarks/out/systems")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--local-steps", type=int, default=10)
    p.add_argument("--method", default="ravan")
    p.add_argument("--num-cpus", type=int, default=2)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--actors", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--share", nargs="+", choices=["shared", "private"], default=["shared", "private"],
                   help="memory: with resources.share_frozen_weights on (shared) and/or off (private)")
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--share-methods", nargs="+", default=["ravan", "fedit", "flexlora"])
    args = p.parse_args()
    print(machine(), flush=True)
    for what in (["overhead", "comm", "parallel", "memory"] if args.what == "all" else [args.what]):
        t = time.perf_counter()
        globals()[what](args)
        print(f"[{what}: {time.perf_counter() - t:.0f} s wall]", flush=True)


if __name__ == "__main__":
    main()
