"""Differential privacy: the accountant, client-level clipping and noise (DP-FedAvg), sample-level DP-SGD.

Free of Ray: the parameter server and :class:`ravan_ray.training.ModelHost` call into it.

**Client level** (``privacy.mode: client``; McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private
Recurrent Language Models", ICLR 2018). The method expresses each upload as the client's update: the per-client
terms whose sum its server rule is a function of, usually its communicated tensors minus the broadcast, and for
rules that need more (products of factors, norm-weighted factors) those terms too
(``FederatedMethod.privacy_delta``; every method has one); the server clips each
update's joint L2 norm over all its tensors to C and adds N(0, (z C)^2) to every coordinate of the sum before
the method's own averaging (``FederatedMethod.noise_shares`` says how the noise enters the uploads so that the
method's aggregate sees ``sum + noise``). The noise is drawn from (run seed, round), so a resumed run draws
the same noise. With adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy, "Differentially Private Learning
with Adaptive Clipping", NeurIPS 2021) C moves every round by C <- C exp(-eta (b - gamma)), b the noised
fraction of unclipped clients; the count gets noise sigma_b and the update noise z_delta =
(z^-2 - (2 sigma_b)^-2)^(-1/2), so the pair is as private as one Gaussian release at z (the paper's Theorem 1):
the accountant accounts z.

**Sample level** (``privacy.mode: sample``): DP-SGD (Abadi et al. 2016) in local training through Opacus'
``GradSampleModule`` (per-example gradients; the adapter layers, which Opacus has no rule for and whose constant
buffers its functorch fallback refuses, get a registered rule that is that fallback with the buffers passed in:
:func:`adapter_grad_sample`) and ``DPOptimizer`` (per-example clipping to C, noise z C on the sum).

**Accounting**: Google's ``dp-accounting`` RDP accountant on the Poisson-subsampled Gaussian mechanism, composed
once per round (client level, q = clients_per_round / num_clients) or once per local step (sample level,
q = batch_size / the client's sample count, over the steps of the rounds it took part in; the epsilon reported
is the largest over clients). Two standard approximations, as in TF Privacy, Opacus and Flower: the platform
samples a fixed number of clients (and batches by shuffling), while the accountant assumes Poisson sampling at
the same rate; and who took part, and which Ravan heads each trained, are public (they are drawn from the run
seed, not from data), like the participant count itself.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ravan_ray.config import ConfigError, RunConfig
from ravan_ray.methods.base import NOISE_STD
from ravan_ray.models import quiet_logger

#: the server's current clip norm under adaptive clipping: kept in the global state (checkpointed, never broadcast)
CLIP_NORM_KEY = "eval/privacy_clip_norm"
NOISE_STREAM = 0xD1FF  # the (seed, round, NOISE_STREAM) generator of the server's noise


# ------------------------------------------------------------------------------------------------ accountant
def epsilon_for(q: float, noise_multiplier: float, steps: int, delta: float) -> float:
    """epsilon after ``steps`` compositions of the Poisson-subsampled Gaussian mechanism (rate q, noise z)."""
    if steps <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    with quiet_logger("absl"):  # dp-accounting warns of every RDP order it drops (rightly); noise in a run
        return _epsilon(q, noise_multiplier, steps, delta)


def _epsilon(q: float, noise_multiplier: float, steps: int, delta: float) -> float:
    import dp_accounting

    accountant = dp_accounting.rdp.RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(noise_multiplier))
    accountant.compose(event, int(steps))
    return float(accountant.get_epsilon(delta))


def calibrate_noise(target_epsilon: float, delta: float, usage: Sequence[tuple[float, int]]) -> float:
    """The smallest noise multiplier z at which every (q, steps) in ``usage`` spends at most ``target_epsilon``:
    dp-accounting's calibrate_dp_mechanism (a bisection on the accountant) for each client's usage, the largest z
    of them (epsilon falls as z grows, so that z holds for every client)."""
    import dp_accounting

    def accountant():
        return dp_accounting.rdp.RdpAccountant()

    def calibrated(q: float, steps: int) -> float:
        def event(z: float):
            return dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps)
        return float(dp_accounting.calibrate_dp_mechanism(
            accountant, event, target_epsilon, delta, dp_accounting.LowerEndpointAndGuess(1e-3, 1.0), tol=1e-5))

    with quiet_logger("absl"):
        return max(calibrated(q, steps) for q, steps in dominant_usage(usage) if steps > 0)


def dominant_usage(usage: Sequence[tuple[float, int]]) -> list[tuple[float, int]]:
    """The (q, steps) pairs not dominated by another (a larger q and at least as many steps spends more)."""
    pairs = sorted(set((float(q), int(s)) for q, s in usage if s > 0), reverse=True)
    kept: list[tuple[float, int]] = []
    for q, s in pairs:
        if all(s > ks for _, ks in kept):
            kept.append((q, s))
    return kept or [(0.0, 0)]


@dataclass(frozen=True)
class PrivacyBudget:
    """What the accountant needs about a run, fixed before it starts: the noise multiplier (given or calibrated)
    and, per round, every client's (sampling rate, steps so far) in sample mode."""

    mode: str
    noise_multiplier: float
    delta: float
    client_rate: float  # clients_per_round / num_clients
    # sample mode: per client, its batch fraction and the rounds it takes part in (drawn from the run seed)
    sample_rates: tuple[float, ...] = ()
    participation: tuple[tuple[int, ...], ...] = ()
    local_steps: int = 0

    def usage(self, round_index: int) -> list[tuple[float, int]]:
        if self.mode == "client":
            return [(self.client_rate, round_index)]
        return [(q, self.local_steps * sum(1 for r in rounds if r <= round_index))
                for q, rounds in zip(self.sample_rates, self.participation)]

    def epsilon(self, round_index: int) -> float:
        """The epsilon spent after ``round_index`` rounds (the largest over clients in sample mode)."""
        return max(epsilon_for(q, self.noise_multiplier, steps, self.delta)
                   for q, steps in dominant_usage(self.usage(round_index)))


def plan_budget(config: RunConfig, client_sizes: Sequence[int], sampled_rounds: Sequence[Sequence[int]]) -> Optional[PrivacyBudget]:
    """The run's privacy budget, checked against its data (one line for a delta too large for the data), with the
    noise multiplier computed for the run's rounds when the config gives ``target_epsilon``. None without privacy.
    ``sampled_rounds[c]``: the rounds client c is sampled in (the driver's seeded draw)."""
    privacy = config.privacy
    if privacy.mode == "none":
        return None
    fed = config.federation
    if privacy.mode == "sample":
        smallest = int(min(client_sizes))
        if privacy.delta >= 1.0 / smallest:
            raise ConfigError(f"privacy.delta ({privacy.delta:g}) must be < 1 / the smallest client's sample count "
                              f"({smallest}, so < {1.0 / smallest:g}): sample-level DP protects examples")
        rates = tuple(min(1.0, fed.batch_size / max(1, int(n))) for n in client_sizes)
        budget = PrivacyBudget("sample", 0.0, privacy.delta, fed.clients_per_round / fed.num_clients, rates,
                               tuple(tuple(int(r) for r in rounds) for rounds in sampled_rounds), fed.local_steps)
    else:
        budget = PrivacyBudget("client", 0.0, privacy.delta, fed.clients_per_round / fed.num_clients)
    if privacy.target_epsilon is not None:
        z = calibrate_noise(privacy.target_epsilon, privacy.delta, budget.usage(fed.rounds))
    else:
        z = float(privacy.noise_multiplier)
    budget = replace(budget, noise_multiplier=z)
    if privacy.adaptive_clip and z > 0:
        sigma_b = clipped_count_stddev(config)
        if z >= 2 * sigma_b:
            raise ConfigError(f"privacy.adaptive_clip: the noise multiplier ({z:.4g}) must be < 2 x "
                              f"privacy.clipped_count_stddev ({sigma_b:g}); raise clipped_count_stddev")
    return budget


# ------------------------------------------------------------------------------------------------ client level
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


def privatize_updates(method, config: RunConfig, state: dict[str, torch.Tensor], updates: list,
                      round_index: int, noise_multiplier: float, clip_norm: float) -> tuple[list, dict[str, Any]]:
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


# ------------------------------------------------------------------------------------------------ sample level
def adapter_grad_sample(layer: torch.nn.Module, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict:
    """Per-example gradients of an adapter layer's own trainable parameters (Ravan's cores and scales, LoRA's factors)
    for Opacus: ``vmap(grad(...))`` over the batch of the layer's functional forward, which is what Opacus' functorch
    fallback does, except that the layer's buffers go in as constants. Opacus refuses any layer with buffers there,
    because BatchNorm's running statistics are data; ours (the seeded frozen bases, the head and rank masks) are
    not, so this rule, registered for the two adapter classes, is the fallback without that refusal."""
    from torch.func import functional_call, grad, vmap

    trainable = {name: p for name, p in layer.named_parameters(recurse=False) if p.requires_grad}
    constants = {**{n: p.detach() for n, p in layer.named_parameters() if n not in trainable},
                 **dict(layer.named_buffers())}
    unhooked = without_hooks(layer)

    def example_loss(params, x, g):
        out = functional_call(unhooked, {**params, **constants}, (x.unsqueeze(0),))
        return (out * g.unsqueeze(0)).sum()

    x = activations[0]
    if x.dtype != backprops.dtype and x.is_floating_point():
        x = x.to(backprops.dtype)
    per_example = vmap(grad(example_loss), in_dims=(None, 0, 0))({n: p.detach() for n, p in trainable.items()}, x,
                                                                  backprops)
    return {trainable[name]: per_example[name] for name in trainable}


def without_hooks(layer: torch.nn.Module) -> torch.nn.Module:
    """A shallow copy of ``layer`` (same tensors, same settings) without Opacus' hooks, to run its forward inside
    the per-example gradient: the hooks would capture that inner call as if it were a training step. (Opacus' own
    fallback deep-copies the layer once; a copy made per call also sees settings that change between clients,
    such as a LoRA layer's scale.)"""
    from collections import OrderedDict

    clone = copy.copy(layer)
    clone._parameters, clone._buffers, clone._modules = (dict(layer._parameters), dict(layer._buffers),
                                                         dict(layer._modules))
    for hooks in ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
                  "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks"):
        setattr(clone, hooks, OrderedDict())
    return clone


_REGISTERED = False


def register_adapter_samplers() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    from opacus.grad_sample import register_grad_sampler

    from ravan_ray.adapters import LoRALinear, RavanLinear

    register_grad_sampler([RavanLinear, LoRALinear])(adapter_grad_sample)
    _REGISTERED = True


class DPSGD:
    """DP-SGD for one client task: Opacus' per-example gradients on ``model`` and its DPOptimizer around
    ``optimizer`` (per-example clipping to C, N(0, (z C)^2) on the sum, divided by the batch size). The noise comes
    from ``generator`` (the client task's own stream), so a resumed run is bit-identical. ``close()`` removes the
    hooks: the process's model serves the next client task."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, noise_multiplier: float,
                 clip_norm: float, batch_size: int, generator: torch.Generator, after_noise=None):
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        register_adapter_samplers()
        self.clip_norm = clip_norm
        # strict=False: the adapter layers' buffers are constants (see adapter_grad_sample), not data.
        self.module = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=False)
        self.optimizer = DPOptimizer(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=clip_norm,
                                     expected_batch_size=batch_size, loss_reduction="mean", generator=generator)
        if after_noise is not None:
            self.optimizer.attach_step_hook(lambda _optimizer: after_noise())
        self.examples = 0
        self.clipped = 0

    def step(self) -> None:
        """Count the examples whose gradient norm exceeds C (for clip_fraction), then clip, noise and step."""
        norms = [p.grad_sample.flatten(1).double().norm(dim=1) for p in self.optimizer.params
                 if getattr(p, "grad_sample", None) is not None]
        if norms:
            per_example = torch.stack(norms, dim=1).norm(dim=1)
            self.examples += int(per_example.numel())
            self.clipped += int((per_example > self.clip_norm).sum())
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def clip_fraction(self) -> float:
        return self.clipped / self.examples if self.examples else math.nan

    def close(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.module._close()
