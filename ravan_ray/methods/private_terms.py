"""The method's side of differential privacy: the second protocol a method implements, beside
:class:`ravan_ray.methods.base.FederatedMethod`.

The privacy mechanisms (:mod:`ravan_ray.privacy`) know nothing of any method's tensors; they call these hooks:
- client level (DP-FedAvg, :mod:`ravan_ray.privacy.client_level`): :meth:`PrivateTerms.privacy_delta` says what
  a client's update is (the per-client terms the method's server rule sums), the server clips it and adds noise
  to the sum, :meth:`PrivateTerms.noise_shares` says how that noise enters the uploads so that the method's
  aggregate sees ``sum + noise``, and :meth:`PrivateTerms.with_privacy_delta` turns the clipped, noised update
  back into an upload;
- sample level (DP-SGD, :mod:`ravan_ray.privacy.dp_sgd`): :meth:`PrivateTerms.before_private_steps` and
  :meth:`PrivateTerms.after_private_noise` around the clipped, noised local steps;
- both: :meth:`PrivateTerms.check_privacy`, a method's refusal of a setting it cannot run privately.

The defaults suit a method whose server rule averages every uploaded tensor over all clients; a method whose rule
needs more says so in its own file (Ravan's per-head noise shares, HetLoRA's norm-weighted factors). The helpers
below serve the methods whose uploads are slices of a tensor (Ravan's heads, Fed-PLoRA's modules) or whose rule
needs terms beyond the uploads (products of factors, weighted factors).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Sequence

import torch
from torch import nn

from ravan_ray.methods.base import HEAD_PREFIX, ClientUpdate, State

#: in a private upload's meta under client-level DP: the std of the noise on each coordinate of the uploads' sum
NOISE_STD = "privacy_noise_std"


class PrivateTerms:
    """Mixin of a :class:`~ravan_ray.methods.base.FederatedMethod` that can run under differential privacy (every
    method here does). Subclasses override the hooks marked "override"."""

    def check_privacy(self, mechanism: Any) -> None:
        """override: raise ConfigError when this method cannot run under the privacy ``mechanism`` (a
        :class:`ravan_ray.privacy.PrivacyMechanism`: its ``name``, ``per_example_gradients``; the methods never
        import the privacy package, which imports them). Called before the run starts, and only under differential
        privacy: Ravan refuses gradient scoring, HetLoRA its pruning penalty under DP-SGD."""

    # ----------------------------------------------------------------- client level
    def privacy_delta(self, state: State, update: ClientUpdate) -> State:
        """override: the client's update as client-level DP clips it, float64: the per-client terms whose sum (plus
        noise) the method's server rule is a function of. Usually its communicated tensors minus the broadcast; where
        the rule needs more than the sum of the uploads, those terms too (FedEx-LoRA, FLoRA and FlexLoRA the change
        of the client's effective weight, HetLoRA its norm-weighted factors). Every client's delta must have the same
        keys and shapes (the noise on their sum is drawn once). Default: upload minus broadcast for every uploaded
        tensor; one with no broadcast counterpart (Fed-SB's gradient sums) is its own update."""
        return {k: v.double() - state[k].double() if k in state else v.double() for k, v in update.tensors.items()}

    def with_privacy_delta(self, state: State, update: ClientUpdate, delta: State) -> ClientUpdate:
        """override: the upload that the clipped, noised ``delta`` stands for (inverse of :meth:`privacy_delta`)."""
        tensors = {k: ((state[k].double() + d) if k in state else d).to(update.tensors[k].dtype)
                   for k, d in delta.items()}
        return replace(update, tensors=tensors)

    def noise_shares(self, updates: list[ClientUpdate], noise: State) -> list[State]:
        """override: how the noise on the sum of the deltas enters each client's delta, so that the method's own
        aggregate sees sum + noise. Default, for a server rule that averages (or sums) every key over all m
        clients: each client carries noise / m (their sum is the noise; the mean becomes (sum + noise) / m)."""
        share = {k: v / len(updates) for k, v in noise.items()}
        return [share for _ in updates]

    @staticmethod
    def task_head_only(update: ClientUpdate) -> ClientUpdate:
        """The update with its task-head tensors only (for methods whose adapter tensors need their own privacy
        delta, such as slices or products)."""
        return replace(update, tensors={k: v for k, v in update.tensors.items() if k.startswith(HEAD_PREFIX)})

    # ----------------------------------------------------------------- sample level
    def before_private_steps(self, model: nn.Module) -> None:
        """override: called once before a client's DP-SGD steps, after ``begin_training`` chose what trains and
        before Opacus wraps the model. Fed-SB's estimation round drops its raw-gradient hooks here (it sums the
        private gradients instead) and routes W's forward through its own nn.Linear. Default: nothing."""

    def after_private_noise(self, model: nn.Module) -> None:
        """override: called in every DP-SGD step once the gradients are clipped and noised, before the optimizer
        step. Ravan zeroes the noise on heads the client does not train (their gradient is structurally zero, so
        this is post-processing; they take part in the forward pass and must not move); Fed-SB adds up the private
        gradients of its estimation round. Default: nothing."""


def with_private_terms(update: ClientUpdate, private: ClientUpdate, delta: State) -> ClientUpdate:
    """A private upload for a method whose server rule needs per-client terms beyond its uploads (products of factors,
    weighted factors): ``private``'s tensors, the terms of the clipped, noised ``delta`` that it lacks, and the
    client's own uploads where neither has them (kept for the server's diagnostics only: the aggregate reads the
    noised terms)."""
    terms = {k: v for k, v in delta.items() if k not in private.tensors and k not in update.tensors}
    return replace(private, tensors={**update.tensors, **private.tensors, **terms})


# ---------------------------------------------------------------------------------------- privacy on slices
# Ravan's heads and Fed-PLoRA's one-rank modules are slices of a tensor that each client trains a subset of; the
# server averages slice j over the k_j clients that trained it. Client-level DP clips the full-size update (zero on
# the slices a client did not train) and spreads the noise of slice j over its k_j trainers.
def scatter_slices(values: torch.Tensor, slices: Sequence[int], like: torch.Tensor, axis: int) -> torch.Tensor:
    """A float64 tensor shaped as ``like``, ``values`` at positions ``slices`` along ``axis``, zero elsewhere."""
    full = torch.zeros(like.shape, dtype=torch.float64)
    return full.index_copy_(axis, torch.as_tensor(list(slices), dtype=torch.long), values.double())


def gather_slices(tensor: torch.Tensor, slices: Sequence[int], axis: int) -> torch.Tensor:
    return tensor.index_select(axis, torch.as_tensor(list(slices), dtype=torch.long))


def noise_per_trainer(noise: torch.Tensor, trained: Sequence[Sequence[int]], axis: int) -> list[torch.Tensor]:
    """Each client's share of ``noise`` (drawn on the sum): slice j divided by the number k_j of clients that trained
    it (``trained[c]``: the slices client c trained), to each of them, zero to the others. The shares of slice j add
    up to its noise, so a per-slice mean over its trainers sees (sum + noise) / k_j; a slice nobody trained gets
    none (it keeps its value)."""
    slices = noise.shape[axis]
    counts = torch.zeros(slices, dtype=torch.float64)
    masks = []
    for indices in trained:
        mask = torch.zeros(slices, dtype=torch.bool)
        mask[list(indices)] = True
        counts += mask
        masks.append(mask)
    view = [1] * noise.dim()
    view[axis] = slices
    per_trainer = noise / counts.clamp(min=1).view(view)
    return [torch.where(mask.view(view), per_trainer, torch.zeros_like(per_trainer)) for mask in masks]
