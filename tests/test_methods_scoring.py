"""Ravan's gradient head scores are taken with dropout off: a deterministic function of the cores and the batch."""

from __future__ import annotations

import torch

from conftest import TINY_INFO, TINY_OVERRIDES
from ravan_ray.config import load_config
from ravan_ray.methods.ravan import head_scores
from ravan_ray.training import ModelHost
from toys import local_data, rand


def test_gradient_head_scores_run_with_dropout_off_and_are_deterministic():
    host = ModelHost(load_config(None, [*TINY_OVERRIDES, "method.name=ravan", "method.scoring=gradient"]), TINY_INFO)
    state = host.initial_state()
    state.update({k: rand(*v.shape, seed=i).float() * 0.1
                  for i, (k, v) in enumerate(state.items()) if k.endswith("/cores")})
    host.load(state)
    host.model.train()
    data, rows = local_data(1), torch.arange(8)
    for layer in host.adapted.values():
        layer.cores.requires_grad_(True)

    def batch_loss():
        return host._loss(data, rows)

    scores = []
    for seed in (1, 2):  # different dropout RNG states: the same scores
        torch.manual_seed(seed)
        scores.append(head_scores("gradient", host.adapted, torch.Generator(), batch_loss, host.model))
        assert host.model.training  # the model is back in training mode for the local steps
    for name in host.adapted:
        assert torch.equal(scores[0][name], scores[1][name])
    host.model.eval()  # ... and they are the eval-mode gradient norms
    grads = torch.autograd.grad(host._loss(data, rows), [layer.cores for layer in host.adapted.values()])
    for (name, layer), grad in zip(host.adapted.items(), grads):
        assert torch.allclose(scores[0][name], grad.flatten(1).norm(dim=1))
