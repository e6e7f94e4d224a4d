"""Client-level differential privacy: DP-FedAvg on the parameter server, with adaptive clipping.

**Client level** (``privacy.mode: client``; McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private
Recurrent Language Models", ICLR 2018, arXiv 1710.06963, Algorithm 1). The method expresses each upload as the client's update: the per-client
terms whose sum its server rule is a function of, usually its communicated tensors minus the broadcast, and for
rules that need more (products of factors, norm-weighted factors) those terms too
(``PrivateTerms.privacy_delta``; every method has one); the server clips each
update's joint L2 norm over all its tensors to C and adds N(0, (z C)^2) to every coordinate of the sum before
the method's own averaging (``PrivateTerms.noise_shares`` says how the noise enters the uploads so that the
method's aggregate sees ``sum + noise``). The noise is drawn from (run seed, round), so a resumed run draws
the same noise. With adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy, "Differentially Private Learning
with Adaptive Clipping", NeurIPS 2021, arXiv 1905.03871, Algorithm 1) C moves every round by C <- C exp(-eta (b - gamma)), b the noised
fraction of unclipped clients; the count gets noise sigma_b and the update noise z_delta =
(z^-2 - (2 sigma_b)^-2)^(-1/2), so the pair is as private as one Gaussian release at z (the paper's Theorem 1):
the accountant accounts z.

**Client sampling** (``privacy.client_sampling``; accounting.py says what epsilon each is for). Under ``poisson``,
the default, a round's clients are an independent draw at rate q = clients_per_round / num_clients, and the mean the
method aggregates is taken over the fixed q N = clients_per_round, not over the m that trained (McMahan et al.
2018's fixed-denominator estimator): every privatized term is scaled by m / (q N) before the method's mean over its
m uploads. For a method whose server rule is one mean over all uploads this is exactly (sum + noise) / (q N); a rule
that averages a slice over the k_j clients that trained it (Ravan's heads, HetLoRA's ranks) sees its per-slice mean
scaled alike. A round that draws no client releases nothing and leaves the model as it was (the driver skips the
aggregation, as for a round whose clients all failed); the accountant still composes it as a release. Under
``fixed`` the mean stays over the clients that trained, accounted under replace-one neighbours.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ravan_ray.config import ConfigError, RunConfig
from ravan_ray.methods.base import ClientUpdate, State
from ravan_ray.methods.private_terms import NOISE_STD, PrivateTerms
from ravan_ray.privacy.accounting import PerRoundBudget, PrivacyBudget, Sampling, plan_budget
from ravan_ray.privacy.mechanism import DifferentialPrivacy

#: the server's current clip norm under adaptive clipping: kept in the global state (checkpointed, never broadcast)
CLIP_NORM_KEY = "eval/privacy_clip_norm"
NOISE_STREAM = 0xD1FF  # the (seed, round, NOISE_STREAM) generator of the server's noise


class ClientLevel(DifferentialPrivacy):
    """``privacy.mode: client``: the server clips every client's update and noises their sum before the method
    aggregates (:func:`privatize_updates`); local training is plain."""

    name = "client"

    def plan_budget(self, client_sizes: Sequence[int],
                    sampled_rounds: Sequence[Sequence[int]]) -> Optional[PrivacyBudget]:
        privacy, fed = self.config.privacy, self.config.federation
        sampling = self.sampling()
        budget = plan_budget(self.config, PerRoundBudget(0.0, privacy.delta, fed.clients_per_round / fed.num_clients,
                                                         sampling.kind, sampling.population))
        z = budget.noise_multiplier
        if privacy.adaptive_clip and z > 0:
            sigma_b = clipped_count_stddev(self.config)
            if z >= 2 * sigma_b:
                raise ConfigError(f"privacy.adaptive_clip: the noise multiplier ({z:.4g}) must be < 2 x "
                                  f"privacy.clipped_count_stddev ({sigma_b:g}); raise clipped_count_stddev")
        return budget

    def sampling(self) -> Sampling:
        """The run's client sampler (``privacy.client_sampling``), over num_clients."""
        return Sampling(self.config.privacy.sampler, self.config.federation.num_clients)

    def privatize(self, method: PrivateTerms, state: State, updates: list[ClientUpdate],
                  round_index: int) -> tuple[list[ClientUpdate], dict[str, Any]]:
        """DP-FedAvg: the clipped uploads with the noise on their sum. With adaptive clipping the current bound lives
        in the state under ``eval/`` (:data:`CLIP_NORM_KEY`)."""
        privacy = self.config.privacy
        clip_norm = float(state[CLIP_NORM_KEY][0]) if CLIP_NORM_KEY in state else float(privacy.clip_norm)
        return privatize_updates(method, self.config, state, updates, round_index, float(privacy.noise_multiplier),
                                 clip_norm)

    def state_entries(self, old_state: State, metrics: dict[str, Any]) -> State:
        """The next round's clip norm, under adaptive clipping."""
        if CLIP_NORM_KEY in old_state or self.config.privacy.adaptive_clip:
            return {CLIP_NORM_KEY: torch.tensor([metrics["next_clip_norm"]], dtype=torch.float64)}
        return {}


def clipped_count_stddev(config: RunConfig) -> float:
    p = config.privacy
    return p.clipped_count_stddev if p.clipped_count_stddev is not None else config.federation.clients_per_round / 20


def update_noise_multiplier(config: RunConfig, noise_multiplier: float) -> float:
    """The noise multiplier of the update itself: z, or with adaptive clipping z_delta = (z^-2 - (2 sigma_b)^-2)^-1/2,
    so that update and clipped count together are as private as one release at z (Andrew et al. 2021, Thm 1)."""
    if not config.privacy.adaptive_clip or noise_multiplier == 0:
        return noise_multiplier
    return (noise_multiplier ** -2 - (2 * clipped_count_stddev(config)) ** -2) ** -0.5


def noise_generator(seed: int, round_index: int) -> torch.Generator:
    entropy = np.random.SeedSequence([seed, round_index, NOISE_STREAM]).generate_state(2)
    return torch.Generator().manual_seed(int(entropy[0]) << 32 | int(entropy[1]))


def global_norm(delta: dict[str, torch.Tensor]) -> float:
    """The L2 norm of an update over all its tensors together."""
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in delta.values()))


def clip(delta: dict[str, torch.Tensor], clip_norm: float) -> tuple[dict[str, torch.Tensor], bool]:
    """(the update scaled to L2 norm at most ``clip_norm``, whether it was scaled). An update within the bound is
    returned unchanged (not multiplied by 1.0), so C = inf is the identity."""
    norm = global_norm(delta)
    if norm <= clip_norm:
        return delta, False
    factor = clip_norm / norm
    return {k: t * factor for k, t in delta.items()}, True


def gaussian_noise(like: dict[str, torch.Tensor], std: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """N(0, std^2) for every coordinate of ``like``'s tensors, in float64, drawn in sorted key order."""
    return {k: torch.randn(like[k].shape, generator=generator, dtype=torch.float64) * std for k in sorted(like)}


def privatize_updates(method: PrivateTerms, config: RunConfig, state: State, updates: list[ClientUpdate],
                      round_index: int, noise_multiplier: float,
                      clip_norm: float) -> tuple[list[ClientUpdate], dict[str, Any]]:
    """Client-level DP for one round: clip every client's update to ``clip_norm``, spread N(0, (z C)^2) on the sum
    over the uploads (the method's ``noise_shares``), and, with adaptive clipping, the next round's clip norm.
    Returns (the uploads the method aggregates, {clip_fraction, clip_norm, next_clip_norm})."""
    privacy = config.privacy
    generator = noise_generator(config.seed, round_index)
    deltas, clipped, norms = [], [], []
    for update in updates:
        delta = method.privacy_delta(state, update)
        norms.append(global_norm(delta))
        delta, was_clipped = clip(delta, clip_norm)
        deltas.append(delta)
        clipped.append(was_clipped)
    z = update_noise_multiplier(config, noise_multiplier)
    std = z * clip_norm if z > 0 else 0.0  # no noise, also with C = inf
    if std > 0:
        noise = gaussian_noise(deltas[0], std, generator)
        shares = method.noise_shares(updates, noise)
        deltas = [{k: d[k] + share[k] if k in share else d[k] for k in d} for d, share in zip(deltas, shares)]
    if privacy.sampler == "poisson":  # the method's mean over the m uploads becomes the mean over the fixed q N
        scale = len(updates) / config.federation.clients_per_round
        deltas = [{k: t * scale for k, t in d.items()} for d in deltas]
    # the noise's standard deviation on every coordinate of the sum travels with the uploads (public: z and C), for
    # a server rule whose post-processing depends on it (HetLoRA's noised denominator)
    private = [replace(method.with_privacy_delta(state, u, d), meta={**u.meta, NOISE_STD: std})
               for u, d in zip(updates, deltas)]
    next_clip = clip_norm
    if privacy.adaptive_clip:
        unclipped = sum(not c for c in clipped)
        if noise_multiplier > 0:
            unclipped += float(torch.randn((), generator=generator, dtype=torch.float64)) * clipped_count_stddev(config)
        fraction = unclipped / len(updates)
        next_clip = clip_norm * math.exp(-privacy.clip_learning_rate * (fraction - privacy.target_unclipped_quantile))
    # update_norm: the median norm before clipping, a simulation diagnostic for choosing clip_norm (a deployment
    # would not publish it: it is not noised)
    return private, {"clip_fraction": float(np.mean(clipped)), "clip_norm": clip_norm, "next_clip_norm": next_clip,
                     "update_norm": float(np.median(norms))}
