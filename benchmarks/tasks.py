"""Every task at CPU scale: one federated run per task on ``ravan-ray tiny``'s models and data (and the
offline MiniLM where a pretrained encoder fits), through the CLI as a user runs it; a table of each
task's metrics and seconds per round.

    python benchmarks/tasks.py --out benchmarks/out/tasks --rounds 8
    python benchmarks/tasks.py --out benchmarks/out/tasks_lr0.01 --rounds 8 --set optimizer.lr=0.01

Writes OUT/<task>/ (the runs), OUT/results.csv and OUT/results.md. Every run: 20 clients, 3 per round,
10 local steps of batch 32, Ravan with 4 heads at the LoRA-rank-8 budget, the platform's default
learning rate, evaluation every 2 rounds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ravan_ray.cli import main as ravan_ray  # noqa: E402
from ravan_ray.tiny import write_tiny_assets  # noqa: E402


def runs(assets: Path) -> dict[str, tuple[str, list[str]]]:
    """task -> (what it runs, overrides): the README's example commands."""
    m, d = assets / "models", assets / "data"
    return {
        "text_classification": ("MiniLM (pretrained), sentence pairs: same topic?", [
            "model.task=text_classification", "model.name=minilm", f"data.path={d / 'pairs'}",
            "data.text_field=sentence1", "data.text_pair_field=sentence2", "data.max_length=64"]),
        "image_classification": ("tiny ViT from a config, 16x16 pictures, 4 colours", [
            "model.task=image_classification", f"model.name={m / 'vit'}", f"data.path={d / 'images'}"]),
        "causal_lm": ("tiny LLaMA from a config, one-word instructions, Dirichlet over 3 categories", [
            "model.task=causal_lm", f"model.name={m / 'llama'}", f"data.path={d / 'instructions'}",
            "data.max_length=128", "data.partition.label_field=category",
            # 480 instructions over 20 clients: Dirichlet(0.3) over 3 categories leaves some client ~5
            "data.partition.min_size=4"]),
        "question_answering": ("MiniLM (pretrained), SQuAD-format biographies, windows of 48", [
            "model.task=question_answering", "model.name=minilm", f"data.path={d / 'squad'}", "data.max_length=48"]),
        "seq2seq": ("tiny T5 from a config, 12-class topic/sentiment names", [
            "model.task=seq2seq", f"model.name={m / 't5'}", f"data.path={d / 'topics'}", "data.max_length=48"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/out/tasks")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--only", nargs="*", help="tasks to run (default: all)")
    parser.add_argument("--set", action="append", default=[], help="a config override for every run (k=v)")
    args = parser.parse_args()
    out = Path(args.out)
    assets = write_tiny_assets(out / "assets")
    rows = []
    for task, (what, overrides) in runs(assets).items():
        if args.only and task not in args.only:
            continue
        run_dir = out / task
        if not (run_dir / "summary.json").is_file():
            sets = [*overrides, f"federation.rounds={args.rounds}", *args.set]
            code = ravan_ray(["run", *[a for s in sets for a in ("--set", s)], "--output", str(run_dir)])
            if code != 0:
                raise SystemExit(f"{task}: ravan-ray run exited {code}")
        summary = json.loads((run_dir / "summary.json").read_text())
        metrics = pd.read_csv(run_dir / "metrics.csv")
        evaluated = metrics.dropna(subset=[summary["metric"]])
        first, last = evaluated.iloc[0], evaluated.iloc[-1]
        task_metrics = [c for c in metrics.columns[4:] if c.startswith("test_")]
        rows.append({
            "task": task, "what": what, "rounds": summary["rounds"],
            # rounds 2.. (round 1 also starts the actors), those without an evaluation
            "s_per_round": metrics.loc[1:, "round_s"][metrics.loc[1:, summary["metric"]].isna()].median(),
            "s_per_round_with_eval": metrics.loc[1:, "round_s"][metrics.loc[1:, summary["metric"]].notna()].median(),
            **{f"{c} r{int(first['round'])}": first[c] for c in task_metrics},
            **{f"{c} r{int(last['round'])}": last[c] for c in task_metrics},
        })
    table = pd.DataFrame(rows)
    table.to_csv(out / "results.csv", index=False)
    lines = ["| task | run | first evaluated round | last round | s/round (with eval) |", "|---|---|---|---|---|"]
    for _, r in table.iterrows():
        def scores(which: str) -> str:
            return ", ".join(f"{k.split(' ')[0].removeprefix('test_')} {r[k]:.3f}" for k in r.index
                             if k.endswith(which) and k.startswith("test_") and pd.notna(r[k]))
        first_round = min(int(k.rsplit("r", 1)[1]) for k in r.index if k.startswith("test_") and pd.notna(r[k]))
        last_round = int(r["rounds"])
        lines.append(f"| {r['task']} | {r['what']} | r{first_round}: {scores(' r%d' % first_round)} | "
                     f"r{last_round}: {scores(' r%d' % last_round)} | {r['s_per_round']:.1f} "
                     f"({r['s_per_round_with_eval']:.1f}) |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
