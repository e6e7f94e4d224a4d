"""Ravan's layer: the frozen-bases layer of ravan_ray/adapters.py with h heads whose bases B_i, A_i are drawn from
(run seed, layer name) by one of Ravan's initialisations (Raje et al. 2025, arXiv 2506.05568, Table 4: normal,
Gram-Schmidt, constant, shared subspace), identical on every client, so they are never sent."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ravan_ray.adapters import FrozenBasesLinear, adapter_dtype, check_linear, gaussian_bases, layer_generator

INITS = ("normal", "gram_schmidt", "constant", "shared_subspace")


def _orthonormal_columns(x: Tensor) -> Tensor:
    # The sign fix makes the factorisation unique (positive diagonal of R), so the result does not
    # depend on which LAPACK produced it.
    q, r = torch.linalg.qr(x, mode="reduced")
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    return q * signs


def make_bases(
    heads: int,
    rank: int,
    d_in: int,
    d_out: int,
    init: str,
    seed: int,
    layer_name: str,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """Frozen bases B (h, d_out, r) and A (h, r, d_in): a pure function of its arguments.

    Scale: every column of B and every row of A has (expected) unit norm, i.e. B ~ N(0, 1/d_out)
    and A ~ N(0, 1/d_in) for ``normal``. ``gram_schmidt`` bases are then the exactly orthonormal
    version of the same draw, so the Table-4 ablation compares orthogonality rather than scale, and
    ||B H A||_F ~= ||H||_F: the norm of a core is the norm of the weight update it makes (what the
    ``weight`` head score measures), and an Adam step on the h cores moves W by about lr * sqrt(N),
    the same order as an Adam step on a LoRA of equal budget N.

    - normal:          B_i, A_i i.i.d. Gaussian with the scale above (:func:`ravan_ray.adapters.gaussian_bases`).
    - gram_schmidt:    [B_1..B_h] has orthonormal columns, [A_1; ..; A_h] orthonormal rows (QR of a
                       Gaussian draw). Needs h r <= min(d_in, d_out).
    - constant:        one ``normal`` draw shared by all heads.
    - shared_subspace: B_i = M R_i, A_i = R_i N with M, N drawn like ``normal`` and R_i a random
                       orthogonal r x r matrix per head (invertible and scale preserving), so all
                       heads live in the same r-dimensional column/row space.

    Draws are made in float64 on the CPU and cast to ``dtype``, so the bases do not depend on the
    dtype or device a client happens to use.
    """
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; allowed: {', '.join(INITS)}")
    if heads < 1 or rank < 1 or d_in < 1 or d_out < 1:
        raise ValueError(
            f"heads, rank, d_in, d_out must all be >= 1, got {heads}, {rank}, {d_in}, {d_out}"
        )
    if init == "gram_schmidt" and heads * rank > min(d_in, d_out):
        raise ValueError(
            f"gram_schmidt needs heads * rank <= min(d_in, d_out) to make the heads' subspaces "
            f"orthogonal, got {heads} * {rank} = {heads * rank} > min({d_in}, {d_out}); use fewer "
            f"heads, a smaller budget, or init 'normal'"
        )
    gen = layer_generator(seed, layer_name)
    if init == "normal":
        return gaussian_bases(heads, rank, d_in, d_out, gen, dtype)
    f64 = dict(generator=gen, dtype=torch.float64)

    def normal_b(n: int) -> Tensor:  # (d_out, n)
        return torch.randn(d_out, n, **f64) / math.sqrt(d_out)

    def normal_a(n: int) -> Tensor:  # (n, d_in)
        return torch.randn(n, d_in, **f64) / math.sqrt(d_in)

    if init == "gram_schmidt":
        B = _orthonormal_columns(torch.randn(d_out, heads * rank, **f64))
        B = B.view(d_out, heads, rank).permute(1, 0, 2)
        A = _orthonormal_columns(torch.randn(d_in, heads * rank, **f64)).T
        A = A.reshape(heads, rank, d_in)
    elif init == "constant":
        B = normal_b(rank).expand(heads, d_out, rank)
        A = normal_a(rank).expand(heads, rank, d_in)
    else:  # shared_subspace
        M, N = normal_b(rank), normal_a(rank)
        R = torch.stack([_orthonormal_columns(torch.randn(rank, rank, **f64)) for _ in range(heads)])
        B = M @ R  # (h, d_out, r)
        A = R @ N  # (h, r, d_in)
    return B.contiguous().to(dtype), A.contiguous().to(dtype)


class RavanLinear(FrozenBasesLinear):
    """y = W x + sum_i s_i B_i H_i A_i x (:class:`~ravan_ray.adapters.FrozenBasesLinear`) with h heads whose bases
    are drawn by ``init`` (:func:`make_bases`) from (``seed``, ``layer_name``): the same on every client. A client
    trains the heads it selects (``set_head_mask``); ``scaling: constant`` keeps every s_i at 1 (Table 5)."""

    def __init__(
        self,
        base: nn.Linear,
        heads: int,
        rank: int,
        init: str = "normal",
        scaling: str = "trainable",
        seed: int = 0,
        layer_name: str = "",
    ):
        check_linear(base, "RavanLinear")
        d_out, d_in = base.weight.shape
        bases = make_bases(heads, rank, d_in, d_out, init, seed, layer_name, adapter_dtype(base))
        super().__init__(base, heads, rank, bases, scaling)
        self.init, self.seed, self.layer_name = init, seed, layer_name

    def extra_repr(self) -> str:
        return (
            f"d_in={self.d_in}, d_out={self.d_out}, heads={self.heads}, rank={self.rank}, "
            f"init={self.init!r}, scaling={self.scaling!r}, merged={self.merged}"
        )
