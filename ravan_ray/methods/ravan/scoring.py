"""Head scores (Raje et al. 2025, arXiv 2506.05568, Algorithm 1, step 3): which K_c heads a client trains this
round.

- ``random``:   score ~ U(0, 1), drawn from the client's private task RNG.
- ``weight``:   ||s_i H_i||_F of the broadcast cores (s_i is 1 at the start of a round). Ties, e.g. all
                heads at zero in round one, go to the lower head index, so every client then picks the
                same heads: the weakness of this score the paper reports.
- ``gradient``: ||dL/dH_i||_F on one local mini-batch, one backward pass for all layers at once, with the
                model in eval mode (dropout off) for that pass, so the score is a deterministic function of the
                cores and the batch rather than of one dropout draw (which would add noise to the ranking).

The same number of heads K_c is chosen in every adapted layer; each layer picks its own top-K_c.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional

import torch
from torch import nn

from ravan_ray.methods.ravan.layer import RavanLinear

SCORES = ("random", "weight", "gradient")


def head_scores(
    kind: str,
    layers: Mapping[str, RavanLinear],
    generator: torch.Generator,
    batch_loss: Callable[[], torch.Tensor],
    model: Optional[nn.Module] = None,
) -> dict[str, torch.Tensor]:
    """One score per head for every adapted layer: {layer name: tensor of shape (heads,)}. ``model`` (the module
    ``batch_loss`` runs) is put in eval mode for the gradient pass and restored afterwards."""
    if kind == "random":
        return {name: torch.rand(layer.heads, generator=generator) for name, layer in layers.items()}
    if kind == "weight":
        return {
            name: (layer.cores.detach() * layer.scales.detach()[:, None, None]).flatten(1).norm(dim=1)
            for name, layer in layers.items()
        }
    if kind == "gradient":
        return _gradient_scores(layers, batch_loss, model)
    raise ValueError(f"unknown scoring '{kind}' (allowed: {', '.join(SCORES)})")


def _gradient_scores(layers: Mapping[str, RavanLinear], batch_loss: Callable[[], torch.Tensor],
                     model: Optional[nn.Module]) -> dict[str, torch.Tensor]:
    cores = [layer.cores for layer in layers.values()]
    previous = [c.requires_grad for c in cores]
    masks = [layer.head_mask.clone() for layer in layers.values()]
    for layer, core in zip(layers.values(), cores):
        layer.set_head_mask(torch.ones(layer.heads, dtype=torch.bool))  # score every head, not last round's
        core.requires_grad_(True)
    training = model.training if model is not None else False
    if model is not None:
        model.eval()
    try:
        grads = torch.autograd.grad(batch_loss(), cores, allow_unused=True)
    finally:
        if model is not None:
            model.train(training)
    for layer, core, was, mask in zip(layers.values(), cores, previous, masks):
        core.requires_grad_(was)
        layer.set_head_mask(mask)
    return {
        name: (torch.zeros(layer.heads) if grad is None else grad.detach().flatten(1).norm(dim=1).float())
        for (name, layer), grad in zip(layers.items(), grads)
    }


def top_k(scores: Mapping[str, torch.Tensor], k: int) -> dict[str, list[int]]:
    """The indices of the k highest scores per layer (ties to the lower index), sorted ascending."""
    selected = {}
    for name, layer_scores in scores.items():
        if not 1 <= k <= layer_scores.numel():
            raise ValueError(f"cannot select {k} of {layer_scores.numel()} heads")
        # A stable descending sort keeps the lower index first among equal scores.
        order = torch.sort(layer_scores, descending=True, stable=True).indices[:k]
        selected[name] = sorted(order.tolist())
    return selected
