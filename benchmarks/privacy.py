"""Accuracy against epsilon under client-level DP (DP-FedAvg): Ravan, FedIT, FFA-LoRA and Fed-SB by default, any
method with --methods.

For every method: first the run without privacy (privacy.mode=client, noise 0, clip norm infinite: bit-identical
to privacy.mode=none, and it records the median norm of the clients' updates), then one run per target epsilon at
delta 1e-5 with the clip norm set to that median (the quantile adaptive clipping aims for; adaptive clipping itself
needs a clipped-count noise sigma_b > z / 2, which 3 clients per round cannot afford at these epsilons). The noise
multiplier for each epsilon is computed by the platform from target_epsilon for the run's rounds. One Ray session;
runs that already finished are skipped; a table (markdown and CSV) is written to OUT.

    python benchmarks/privacy.py --out benchmarks/out/privacy --epsilons 8 3 1 --rounds 12
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ravan_ray.config import load_config  # noqa: E402

METHODS = ["ravan", "fedit", "ffa_lora", "fed_sb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/out/privacy")
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--epsilons", nargs="+", type=float, default=[8.0, 3.0, 1.0])
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--num-clients", type=int, default=20)
    parser.add_argument("--clients-per-round", type=int, default=3)
    parser.add_argument("--max-test", type=int, default=1000)
    parser.add_argument("--set", action="append", default=[], help="extra config override for every run")
    parser.add_argument("--client-sampling", choices=["poisson", "fixed"], default="poisson",
                        help="privacy.client_sampling of the noise table (the runs take it from --set)")
    parser.add_argument("--noise-only", action="store_true",
                        help="train nothing: print the noise multiplier each epsilon needs at this scale (seconds)")
    args = parser.parse_args()
    if args.noise_only:
        print_noise_table(args)
        return

    import ray

    from ravan_ray.federation import run_federation

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = [f"federation.rounds={args.rounds}", f"federation.num_clients={args.num_clients}",
              f"federation.clients_per_round={args.clients_per_round}", f"data.max_test_samples={args.max_test}",
              f"federation.eval_every={args.rounds}", "resources.num_cpus=2", "output.keep_checkpoints=1",
              f"privacy.delta={args.delta}", "privacy.mode=client", *args.set]
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    rows = []
    for method in args.methods:
        runs = [("inf", ["privacy.noise_multiplier=0", "privacy.clip_norm=.inf"])]
        for epsilon in args.epsilons:
            runs.append((f"{epsilon:g}", [f"privacy.target_epsilon={epsilon}"]))
        clip_norm = None
        for label, overrides in runs:
            run_dir = out / f"{method}_eps{label}"
            if label != "inf":
                overrides = overrides + [f"privacy.clip_norm={clip_norm}"]
            config = load_config(None, [*common, f"method.name={method}", *overrides])
            if not (run_dir / "summary.json").exists() or \
                    json.loads((run_dir / "summary.json").read_text())["rounds"] < args.rounds:
                started = time.perf_counter()
                run_federation(config, run_dir, resume=(run_dir / "metrics.csv").exists())
                print(f"{run_dir.name}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
            summary = json.loads((run_dir / "summary.json").read_text())
            import pandas as pd

            metrics = pd.read_csv(run_dir / "metrics.csv")
            if label == "inf":
                clip_norm = float(f"{metrics['update_norm'].median():.4g}")
            rows.append({"method": method, "target_epsilon": label, "epsilon": summary.get("epsilon"),
                         "noise_multiplier": summary.get("noise_multiplier"), "clip_norm": metrics["clip_norm"].iloc[-1],
                         "clip_fraction": metrics["clip_fraction"].mean(), "update_norm": metrics["update_norm"].median(),
                         "final_test_accuracy": summary["final_test_accuracy"], "wall_s": summary["wall_s"]})
    ray.shutdown()
    import pandas as pd

    table = pd.DataFrame(rows)
    table.to_csv(out / "privacy_table.csv", index=False)
    pivot = table.pivot(index="method", columns="target_epsilon", values="final_test_accuracy")
    pivot = pivot[["inf"] + [f"{e:g}" for e in args.epsilons]].loc[args.methods]
    lines = ["| method | " + " | ".join(f"eps {c}" for c in pivot.columns) + " |",
             "|---|" + "---|" * len(pivot.columns)]
    lines += [f"| {m} | " + " | ".join(f"{100 * v:.1f}" for v in pivot.loc[m]) + " |" for m in pivot.index]
    (out / "privacy_table.md").write_text("\n".join(lines) + "\n")
    print(pivot.to_string())


def print_noise_table(args) -> None:
    """The accountant alone: for each target epsilon the noise multiplier z the platform computes for this many
    rounds at q = clients_per_round / num_clients by ``--client-sampling`` (Poisson: add/remove-one neighbours;
    fixed: without replacement, replace-one), and the noise per coordinate of the averaged update (z / (q N), in
    clip norms), a markdown table."""
    from ravan_ray.privacy import calibrate_noise
    from ravan_ray.privacy.accounting import Sampling

    q = args.clients_per_round / args.num_clients
    sampling = Sampling(args.client_sampling, args.num_clients)
    print("| clients | per round | rounds | sampler (neighbours) | target epsilon | noise multiplier z | "
          "noise per coordinate of the mean (clip norms) |")
    print("|---|---|---|---|---|---|---|")
    for epsilon in args.epsilons:
        z = calibrate_noise(epsilon, args.delta, [(q, args.rounds)], sampling)
        print(f"| {args.num_clients} | {args.clients_per_round} | {args.rounds} | {sampling.kind} "
              f"({sampling.neighbour_relation}) | {epsilon:g} | {z:.3f} | {z / args.clients_per_round:.4f} |")


if __name__ == "__main__":
    main()
