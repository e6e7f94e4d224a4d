"""Adapter layers shared by the methods: the frozen-bases layer (B_i H_i A_i with frozen B_i, A_i: Ravan's heads,
Fed-SB's B R A) and plain LoRA, plus the model surgery that puts them in place.

:class:`FrozenBasesLinear` replaces a frozen ``nn.Linear`` W by

    y = W x + sum_{i=1..h} s_i B_i H_i A_i x

with frozen bases B_i (d_out x r), A_i (r x d_in), trainable cores H_i (r x r, zero at start) and trainable
scalars s_i. Where the bases are identical on every client (regenerated from the run seed, or sent once), averaging
the uploaded s_i H_i is exactly averaging the clients' weight updates (Raje et al. 2025, arXiv 2506.05568, section 3;
Singhal et al. 2025, arXiv 2502.15436, section 3). Ravan draws its h heads' bases with its own initialisations
(ravan_ray/methods/ravan/layer.py); Fed-SB uses one head and replaces the bases by an SVD (methods/fed_sb.py).
:class:`LoRALinear` is plain LoRA (Hu et al. 2021, arXiv 2106.09685), for the LoRA baselines.

Pure PyTorch on purpose: nothing here knows about Ray, clients or servers.
"""

from __future__ import annotations

import hashlib
import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "SCALINGS",
    "COMPUTES",
    "budget_from_lora_rank",
    "layer_generator",
    "gaussian_bases",
    "effective_rank",
    "AdapterLayer",
    "FrozenBasesLinear",
    "LoRALinear",
    "inject",
    "adapted_layers",
]

SCALINGS = ("trainable", "constant")
COMPUTES = ("auto", "factorised", "dense")


# ----------------------------------------------------------------------------------------------
# budgets


def budget_from_lora_rank(lora_rank: int, d_in: int, d_out: int) -> int:
    """Trainable parameters of a rank-r_L LoRA on a d_out x d_in matrix: N = r_L (d_in + d_out)."""
    if lora_rank < 1 or d_in < 1 or d_out < 1:
        raise ValueError(
            f"lora_rank, d_in and d_out must all be >= 1, got {lora_rank}, {d_in}, {d_out}"
        )
    return lora_rank * (d_in + d_out)


# ----------------------------------------------------------------------------------------------
# frozen bases


def layer_generator(seed: int, layer_name: str) -> torch.Generator:
    """The generator of a layer's frozen draws (bases, LoRA's A): a function of (run seed, layer name) only, so every
    process draws the same tensors."""
    # Python's hash() of a str changes with PYTHONHASHSEED, i.e. between processes; every client
    # must draw the same bases, so the seed comes from a cryptographic hash instead.
    digest = hashlib.sha256(f"ravan-ray|{int(seed)}|{layer_name}".encode()).digest()
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return gen


def gaussian_bases(heads: int, rank: int, d_in: int, d_out: int, generator: torch.Generator,
                   dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Bases B (h, d_out, r) ~ N(0, 1/d_out) and A (h, r, d_in) ~ N(0, 1/d_in), drawn in float64 from ``generator``
    (B first) and cast to ``dtype``: every column of B and every row of A has unit expected norm."""
    f64 = dict(generator=generator, dtype=torch.float64)
    B = (torch.randn(d_out, heads * rank, **f64) / math.sqrt(d_out)).view(d_out, heads, rank).permute(1, 0, 2)
    A = (torch.randn(heads * rank, d_in, **f64) / math.sqrt(d_in)).view(heads, rank, d_in)
    return B.contiguous().to(dtype), A.contiguous().to(dtype)


# ----------------------------------------------------------------------------------------------
# effective rank


@torch.no_grad()
def effective_rank(matrix: Tensor) -> float:
    """Roy & Vetterli (2007) effective rank exp(H(p)), p = sigma / sum(sigma); 0.0 for a zero matrix.

    A continuous count of the directions a matrix uses: k for k equal singular values, close to 1
    when one direction dominates. Computed in float64.
    """
    if matrix.ndim != 2:
        raise ValueError(f"effective_rank expects a 2-D matrix, got shape {tuple(matrix.shape)}")
    sigma = torch.linalg.svdvals(matrix.detach().to("cpu", torch.float64))
    total = sigma.sum()
    if not torch.isfinite(total):
        raise ValueError("effective_rank: matrix has non-finite entries")
    if total <= 0:
        return 0.0
    p = sigma[sigma > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def adapter_dtype(base: nn.Linear) -> torch.dtype:
    # Half-precision bases keep float32 adapters (as PEFT does): cores are tiny and averaged across
    # clients, where bf16 rounding would be visible. A float64 base gets float64 adapters.
    return torch.promote_types(base.weight.dtype, torch.float32)


def check_linear(base: nn.Module, cls: str) -> None:
    if not isinstance(base, nn.Linear):
        raise TypeError(f"{cls} wraps an nn.Linear, got {type(base).__name__}")


# ----------------------------------------------------------------------------------------------
# the layers


class AdapterLayer(nn.Module):
    """What every adapter layer shares (FrozenBasesLinear and its Ravan subclass, LoRALinear): a frozen ``base``
    linear plus ``delta_weight()``, the merge / unmerge / effective-rank operations defined on that pair, the shape
    (``rank``, ``d_in``, ``d_out``), and the copy and load of the ``trainable_names`` tensors a client uploads."""

    base: nn.Linear
    merged: bool
    _rank: int
    _d_in: int
    _d_out: int
    #: The parameters a client trains and uploads: what trainable_state() copies and load_trainable_state() sets.
    trainable_names: tuple[str, ...] = ()

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def d_in(self) -> int:
        return self._d_in

    @property
    def d_out(self) -> int:
        return self._d_out

    def delta_weight(self) -> Tensor:  # pragma: no cover - every subclass defines it
        raise TypeError(f"{type(self).__name__} must define delta_weight()")

    def trainable_state(self) -> dict[str, Tensor]:
        return {name: getattr(self, name).detach().clone() for name in self.trainable_names}

    @torch.no_grad()
    def load_trainable_state(self, state: dict[str, Tensor]) -> None:
        """Load some or all of the trainable tensors (a missing key leaves that tensor as it is)."""
        self._refuse_if_merged("load_trainable_state")
        unknown = sorted(set(state) - set(self.trainable_names))
        if unknown or not state:
            raise ValueError(f"trainable state keys must be among {list(self.trainable_names)}, got {sorted(state)}")
        for name, value in state.items():
            param = getattr(self, name)
            if tuple(value.shape) != tuple(param.shape):
                raise ValueError(
                    f"{name}: expected shape {tuple(param.shape)}, got {tuple(value.shape)} "
                    f"(was it saved with different heads/rank or from another layer?)"
                )
            param.copy_(value)

    def effective_rank(self) -> float:
        return effective_rank(self.delta_weight())

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into base.weight (exact to rounding in base.weight's dtype)."""
        if not self.merged:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False

    def _refuse_if_merged(self, what: str) -> None:
        # The merged weight holds the update as it was at merge(); changing the adapter in between
        # would make unmerge() subtract a different matrix than was added.
        if self.merged:
            raise RuntimeError(f"{what}() while merged would corrupt base.weight; call unmerge() first")


class FrozenBasesLinear(AdapterLayer):
    """y = W x + sum_i s_i B_i H_i A_i x with frozen W, B_i, A_i and trainable H_i (cores), s_i (scales).

    ``bases``: (B (h, d_out, r), A (h, r, d_in)); Ravan draws them from the run seed (RavanLinear), Fed-SB replaces
    placeholders with an SVD (``set_bases``). ``scaling``: "trainable" scales s_i, or "constant" (s_i stay at their
    value; only the cores train).

    ``head_mask`` selects the heads a client trains this round: every head takes part in the forward
    pass, but only selected heads receive gradient, and the forward reads the unselected heads from
    ``held_cores`` / ``held_scales``, their values when the mask was set. An optimiser may still move
    an unselected entry of the parameters (weight decay does, with a zero gradient), but that never
    reaches the output, and only the selected heads are uploaded. The mask is applied inside the
    forward pass rather than with a gradient hook, because tensor hooks are silently dropped when a
    module is deep-copied or pickled (which is how Ray moves objects between processes).

    Two equivalent forwards: ``factorised`` (x -> stacked A -> per-head s_i H_i -> stacked B, cost
    grows with h r) and ``dense`` (one GEMM with W + delta_weight(), cost grows with d^2). With
    ``compute = "auto"`` (default) each call takes the one with fewer multiply-adds;
    benchmarks/adapter_speed.py has the measurements.
    """

    trainable_names = ("cores", "scales")

    def __init__(self, base: nn.Linear, heads: int, rank: int, bases: tuple[Tensor, Tensor],
                 scaling: str = "trainable"):
        super().__init__()
        check_linear(base, type(self).__name__)
        if scaling not in SCALINGS:
            raise ValueError(f"unknown scaling {scaling!r}; allowed: {', '.join(SCALINGS)}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.scaling = scaling
        self._heads, self._rank = heads, rank
        self._d_out, self._d_in = base.weight.shape
        dtype, device = adapter_dtype(base), base.weight.device
        B, A = bases
        self.register_buffer("bases_B", B.to(device=device, dtype=dtype), persistent=False)
        self.register_buffer("bases_A", A.to(device=device, dtype=dtype), persistent=False)
        # The selection is a client's choice for one round, not model state: kept out of state_dict.
        self.register_buffer(
            "head_mask", torch.ones(heads, dtype=torch.bool, device=device), persistent=False
        )
        self.cores = nn.Parameter(torch.zeros(heads, rank, rank, dtype=dtype, device=device))
        self.scales = nn.Parameter(
            torch.ones(heads, dtype=dtype, device=device), requires_grad=scaling == "trainable"
        )
        self.register_buffer("held_cores", torch.zeros_like(self.cores), persistent=False)
        self.register_buffer("held_scales", torch.ones_like(self.scales), persistent=False)
        self.merged = False
        # "auto" picks the cheaper of the two equivalent forwards per call; "factorised" / "dense"
        # force one (tests compare them; benchmarks time them).
        self.compute = "auto"

    @property
    def heads(self) -> int:
        return self._heads

    # -- the update ----------------------------------------------------------------------------

    def _scaled_cores(self) -> Tensor:
        """s_i H_i per head (h, r, r): the selected heads' parameters, the unselected heads' held values."""
        # Always the same ops (no data-dependent branch): no host sync on a GPU, same graph each step.
        keep = self.head_mask
        cores = torch.where(keep[:, None, None], self.cores, self.held_cores)
        scales = torch.where(keep, self.scales, self.held_scales)
        return scales[:, None, None] * cores

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.base(x)
        if self._dense_is_cheaper(x):
            # One GEMM with W + delta: the update's maths unchanged, the gradient reaches the cores
            # through delta_weight(). Cheaper once h r is a sizeable fraction of d.
            weight = self.base.weight + self.delta_weight().to(self.base.weight.dtype)
            return F.linear(x, weight, self.base.bias)
        h, r, dt = self._heads, self._rank, x.dtype
        # All heads at once: one GEMM into the stacked (h r)-dim code, a batched r x r product per
        # head, one GEMM back out (benchmarks/adapter_speed.py compares the alternatives).
        z = F.linear(x, self.bases_A.reshape(h * r, self._d_in).to(dt))
        z = torch.einsum("...hr,hor->...ho", z.unflatten(-1, (h, r)), self._scaled_cores().to(dt))
        B_cat = self.bases_B.permute(1, 0, 2).reshape(self._d_out, h * r).to(dt)
        return self.base(x) + F.linear(z.flatten(-2), B_cat)

    def cohort_forward(self, blocks: Tensor, tensors: dict[str, Tensor]) -> Optional[Tensor]:
        """The forward of C clients at once (ravan_ray/cohort.py): ``blocks`` (C, ..., d_in) holds client c's rows
        at c, ``tensors`` the tensors that differ between clients, stacked (C, ...); the rest are this layer's own.
        The base GEMM runs once on every client's rows; the bases, shared by all clients, too; only the r x r cores
        and scales are per client (a batched product). Dense or factorised by the same rule as ``forward`` (on one
        client's rows); dense builds each client's W + delta and runs one batched GEMM. None when the frozen base
        weight differs between clients (the caller then maps ``forward``)."""
        if self.merged or any(name.startswith("base.") for name in tensors):
            return None
        own = lambda name: tensors.get(name, getattr(self, name))  # noqa: E731
        h, r, dt, clients = self._heads, self._rank, blocks.dtype, blocks.shape[0]
        keep = own("head_mask")
        cores = torch.where(keep[..., None, None], own("cores"), own("held_cores"))
        scaled = (torch.where(keep, own("scales"), own("held_scales"))[..., None, None] * cores).to(dt)
        rows = blocks.reshape(clients, -1, self._d_in)
        A, B = own("bases_A"), own("bases_B")
        A_cat = A.reshape(*A.shape[:-3], h * r, self._d_in)
        B_cat = B.transpose(-3, -2).reshape(*B.shape[:-3], self._d_out, h * r)
        if self._dense_is_cheaper(blocks[0]):
            # each client's B' (d_out, h r) with its s_i H_i folded in, then W + B' A' per client
            BH = torch.einsum("...ohr,...hrs->...ohs", B_cat.unflatten(-1, (h, r)), scaled.to(B.dtype))
            delta = BH.flatten(-2) @ A_cat
            weights = (self.base.weight + delta.to(self.base.weight.dtype)).expand(clients, -1, -1)
            out = _per_client_linear(rows, weights)
            if self.base.bias is not None:
                out = out + self.base.bias
            return out.reshape(*blocks.shape[:-1], self._d_out)
        z = _per_client_linear(rows, A_cat.to(dt))
        z = torch.einsum("cmhr,chor->cmho" if scaled.dim() == 4 else "cmhr,hor->cmho", z.unflatten(-1, (h, r)), scaled)
        update = _per_client_linear(z.flatten(-2), B_cat.to(dt))
        return self.base(blocks) + update.reshape(*blocks.shape[:-1], self._d_out)

    def _dense_is_cheaper(self, x: Tensor) -> bool:
        """Pick the forward with fewer multiply-adds (shapes only, so every client picks the same).

        factorised: per token 2 h r (d_in + d_out) (+ 3 h r^2) on top of the base GEMMs;
        dense:      building delta (d_out d_in h r) and, when training, its gradient (T d_out d_in
                    for dL/dW plus d_out d_in h r back to the cores).
        Only for a plain float32/float64 nn.Linear: in half precision W + delta would round away
        most of a small update, and a quantised or custom linear has no plain weight to add to.
        """
        if self.compute != "auto":
            if self.compute not in COMPUTES:
                raise ValueError(f"unknown compute {self.compute!r}; allowed: {', '.join(COMPUTES)}")
            return self.compute == "dense"
        if type(self.base) is not nn.Linear or self.base.weight.dtype not in (torch.float32, torch.float64):
            return False
        tokens = x.numel() // self._d_in
        hr, dd, d_sum = self._heads * self._rank, self._d_in * self._d_out, self._d_in + self._d_out
        training = torch.is_grad_enabled() and (self.cores.requires_grad or self.scales.requires_grad)
        if training:
            factorised = tokens * (2 * hr * d_sum + 3 * hr * self._rank)
            dense = tokens * dd + 2 * dd * hr
        else:
            factorised = tokens * (hr * d_sum + hr * self._rank)
            dense = dd * hr
        return dense < factorised

    def delta_weight(self) -> Tensor:
        """sum_i s_i B_i H_i A_i, shape (d_out, d_in) like ``base.weight`` (adapter dtype)."""
        B, A, _ = self.lora_factors()
        return B @ A

    def lora_factors(self) -> tuple[Tensor, Tensor, float]:
        """The update as one plain LoRA (B', A', scale) of rank h r, scale * B' A' = delta_weight():
        B' = [s_1 B_1 H_1, ..., s_h B_h H_h] (d_out x h r), A' = [A_1; ...; A_h] (h r x d_in), scale 1."""
        h, r = self._heads, self._rank
        BH = torch.bmm(self.bases_B, self._scaled_cores())  # (h, d_out, r)
        return BH.permute(1, 0, 2).reshape(self._d_out, h * r), self.bases_A.reshape(h * r, -1), 1.0

    # -- round bookkeeping ---------------------------------------------------------------------

    def set_head_mask(self, selected: Sequence[int] | Tensor) -> None:
        """Heads that train this round: indices, or a bool tensor of shape (heads,). The unselected heads are held
        at their present values (call it after loading the round's cores and scales)."""
        self.head_mask.copy_(_index_mask(selected, self._heads, "head"))
        with torch.no_grad():
            self.held_cores.copy_(self.cores)
            self.held_scales.copy_(self.scales)

    @torch.no_grad()
    def reset_scales(self) -> None:
        self._refuse_if_merged("reset_scales")
        self.scales.fill_(1.0)

    @torch.no_grad()
    def set_bases(self, B: Tensor, A: Tensor) -> None:
        """Replace the frozen bases (e.g. with singular vectors); shapes must match the current ones."""
        self._refuse_if_merged("set_bases")
        for name, new, old in (("B", B, self.bases_B), ("A", A, self.bases_A)):
            if tuple(new.shape) != tuple(old.shape):
                raise ValueError(
                    f"set_bases: {name} must have shape {tuple(old.shape)} "
                    f"(heads, {'d_out, rank' if name == 'B' else 'rank, d_in'}), got {tuple(new.shape)}"
                )
        self.bases_B.copy_(B)
        self.bases_A.copy_(A)

    def extra_repr(self) -> str:
        return (
            f"d_in={self._d_in}, d_out={self._d_out}, heads={self._heads}, rank={self._rank}, "
            f"scaling={self.scaling!r}, merged={self.merged}"
        )


# ----------------------------------------------------------------------------------------------
# plain LoRA


class LoRALinear(AdapterLayer):
    """Plain LoRA y = W x + scale * B A x for the baselines (FedIT, FFA-LoRA, HetLoRA, ...).

    A ~ N(0, 1/d_in) is drawn from the same stable (seed, layer_name) hash as Ravan's bases (layer_generator), so every
    client starts from the same A (FFA-LoRA relies on it); B starts at zero. ``scale`` is the
    caller's alpha / r.

    ``rank_mask`` switches ranks off for a client that holds a smaller rank than the global one
    (HetLoRA-style): a masked rank neither contributes to the output nor receives gradient, i.e. the
    client runs the rank-r_c LoRA B[:, :r_c] A[:r_c] inside the r_max-sized tensors.
    """

    trainable_names = ("lora_A", "lora_B")

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        seed: int = 0,
        layer_name: str = "",
        scale: float = 1.0,
        train_A: bool = True,
        train_B: bool = True,
    ):
        super().__init__()
        check_linear(base, "LoRALinear")
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self._rank, self.scale, self.seed, self.layer_name = rank, float(scale), seed, layer_name
        self._d_out, self._d_in = base.weight.shape
        dtype, device = adapter_dtype(base), base.weight.device
        A = torch.randn(rank, self._d_in, generator=layer_generator(seed, layer_name), dtype=torch.float64)
        A = (A / math.sqrt(self._d_in)).to(dtype)
        self.lora_A = nn.Parameter(A.to(device), requires_grad=train_A)
        self.lora_B = nn.Parameter(
            torch.zeros(self._d_out, rank, dtype=dtype, device=device), requires_grad=train_B
        )
        self.register_buffer(
            "rank_mask", torch.ones(rank, dtype=torch.bool, device=device), persistent=False
        )
        self.merged = False

    def set_rank_mask(self, active: int | Sequence[int] | Tensor) -> None:
        """Use only some ranks: the first ``active`` ones for an int (1 <= active <= rank, HetLoRA-style), or the
        given rank indices / a bool mask of shape (rank,) (Fed-PLoRA's selected one-rank modules)."""
        if isinstance(active, int):
            if not 1 <= active <= self._rank:
                raise ValueError(f"active rank must be in [1, {self._rank}], got {active}")
            mask = torch.arange(self._rank) < active
        else:
            mask = _index_mask(active, self._rank, "rank")
        self.rank_mask.copy_(mask.to(self.rank_mask.device))

    def _masked_B(self) -> Tensor:
        # Zeroing B's columns removes the masked ranks from the output and, through the product,
        # cuts the gradient of the matching rows of A as well.
        return self.lora_B * self.rank_mask.to(self.lora_B.dtype)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        if self.merged:
            return y
        dt = x.dtype
        z = F.linear(x, self.lora_A.to(dt))
        return y + F.linear(z, (self.scale * self._masked_B()).to(dt))

    def cohort_forward(self, blocks: Tensor, tensors: dict[str, Tensor]) -> Optional[Tensor]:
        """The forward of C clients at once (see FrozenBasesLinear.cohort_forward): one base GEMM for every client's rows,
        a batched product with each client's own A and B (or the layer's, where they are the same for all, as
        FFA-LoRA's A). None when the frozen base weight differs between clients."""
        if self.merged or any(name.startswith("base.") for name in tensors):
            return None
        own = lambda name: tensors.get(name, getattr(self, name))  # noqa: E731
        dt, clients = blocks.dtype, blocks.shape[0]
        B = own("lora_B") * own("rank_mask").unsqueeze(-2).to(own("lora_B").dtype)
        rows = blocks.reshape(clients, -1, self._d_in)
        z = _per_client_linear(rows, own("lora_A").to(dt))
        update = _per_client_linear(z, (self.scale * B).to(dt))
        return self.base(blocks) + update.reshape(*blocks.shape[:-1], self._d_out)

    def delta_weight(self) -> Tensor:
        """scale * B A (masked ranks excluded), shape (d_out, d_in)."""
        return self.scale * (self._masked_B() @ self.lora_A)

    def lora_factors(self) -> tuple[Tensor, Tensor, float]:
        """(B, A, scale) with scale * B A = delta_weight() (masked ranks as zero columns of B)."""
        return self._masked_B(), self.lora_A, self.scale

    def extra_repr(self) -> str:
        return (
            f"d_in={self._d_in}, d_out={self._d_out}, rank={self._rank}, scale={self.scale}, "
            f"merged={self.merged}"
        )


# ----------------------------------------------------------------------------------------------
# shared helpers


def _per_client_linear(rows: Tensor, weight: Tensor) -> Tensor:
    """rows (C, m, i) times a weight (o, i) shared by the C clients (one GEMM) or (C, o, i), one per client
    (a batched GEMM): (C, m, o)."""
    if weight.dim() == 2:
        return F.linear(rows, weight)
    return torch.bmm(rows, weight.transpose(1, 2))


def _index_mask(selected: Sequence[int] | Tensor, n: int, what: str) -> Tensor:
    if isinstance(selected, Tensor) and selected.dtype == torch.bool:
        if tuple(selected.shape) != (n,):
            raise ValueError(f"a bool {what} mask must have shape ({n},), got {tuple(selected.shape)}")
        return selected
    idx = [int(i) for i in (selected.tolist() if isinstance(selected, Tensor) else selected)]
    bad = [i for i in idx if not 0 <= i < n]
    if bad:
        raise ValueError(f"{what} indices {bad} out of range: there are {n} {what}s (0..{n - 1})")
    mask = torch.zeros(n, dtype=torch.bool)
    mask[idx] = True
    return mask


# ----------------------------------------------------------------------------------------------
# model surgery


def _matches(name: str, targets: Sequence[str]) -> bool:
    last = name.rsplit(".", 1)[-1]
    return any(t == last or name == t or name.endswith("." + t) for t in targets)


def inject(
    model: nn.Module,
    target_modules: Sequence[str],
    make_layer: Callable[[str, nn.Linear], nn.Module],
) -> list[str]:
    """Replace each targeted nn.Linear by ``make_layer(qualified_name, linear)``; freeze the rest.

    A target matches a module whose name ends in it: a last component ("query", "q_proj") or a
    dotted suffix ("attention.self.query"). Every parameter the model had before is frozen; the
    caller unfreezes what it trains (e.g. a classifier head). Returns the sorted adapted names.
    """
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    targets = list(target_modules)
    for p in model.parameters():
        p.requires_grad_(False)
    names = []
    for name, module in model.named_modules():
        if not name or not _matches(name, targets):
            continue
        if isinstance(module, AdapterLayer):
            raise ValueError(f"{name} is already adapted ({type(module).__name__}); inject once per model")
        if not isinstance(module, nn.Linear):
            raise ValueError(
                f"{name} matches target_modules {targets} but is a {type(module).__name__}, "
                f"not an nn.Linear; only nn.Linear layers can be adapted"
            )
        names.append(name)
    if not names:
        endings = sorted(
            {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear) and n}
        )
        raise ValueError(
            f"no module matches target_modules {targets}; linear layers in this model end in: "
            f"{', '.join(endings[:20]) or '(none)'}"
        )
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make_layer(name, getattr(parent, child)))
    return sorted(names)


def adapted_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> adapter layer (:class:`AdapterLayer`) for every adapter in the model."""
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterLayer)}
