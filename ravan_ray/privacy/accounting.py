"""The accountant: epsilon spent, the noise multiplier for a target epsilon, the run's privacy budget.

**Accounting**: Google's ``dp-accounting`` RDP accountant on the Poisson-subsampled Gaussian mechanism, composed
once per round (client level, q = clients_per_round / num_clients) or once per local step (sample level,
q = batch_size / the client's sample count, over the steps of the rounds it took part in; the epsilon reported
is the largest over clients). Two standard approximations, as in TF Privacy, Opacus and Flower: the platform
samples a fixed number of clients (and batches by shuffling), while the accountant assumes Poisson sampling at
the same rate; and who took part, and which Ravan heads each trained, are public (they are drawn from the run
seed, not from data), like the participant count itself.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import Sequence

from ravan_ray.config import RunConfig
from ravan_ray.logs import quiet_logger


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
class PrivacyBudget(ABC):
    """What the accountant needs about a run, fixed before it starts: the noise multiplier (given or calibrated),
    delta, and how the mechanism composes over the rounds (:meth:`usage`, one subclass per mechanism)."""

    noise_multiplier: float
    delta: float

    @abstractmethod
    def usage(self, round_index: int) -> list[tuple[float, int]]:
        """Every (sampling rate, compositions so far) pair after ``round_index`` rounds."""

    def epsilon(self, round_index: int) -> float:
        """The epsilon spent after ``round_index`` rounds (the largest over clients in sample mode)."""
        return max(epsilon_for(q, self.noise_multiplier, steps, self.delta)
                   for q, steps in dominant_usage(self.usage(round_index)))


@dataclass(frozen=True)
class PerRoundBudget(PrivacyBudget):
    """Client level: one subsampled Gaussian release per round, at the rate clients_per_round / num_clients."""

    client_rate: float

    def usage(self, round_index: int) -> list[tuple[float, int]]:
        return [(self.client_rate, round_index)]


@dataclass(frozen=True)
class PerStepBudget(PrivacyBudget):
    """Sample level: one subsampled Gaussian release per local step, per client at its batch fraction, over the
    rounds it takes part in (drawn from the run seed)."""

    sample_rates: tuple[float, ...]
    participation: tuple[tuple[int, ...], ...]
    local_steps: int

    def usage(self, round_index: int) -> list[tuple[float, int]]:
        return [(q, self.local_steps * sum(1 for r in rounds if r <= round_index))
                for q, rounds in zip(self.sample_rates, self.participation)]


def plan_budget(config: RunConfig, budget: PrivacyBudget) -> PrivacyBudget:
    """``budget`` (a mechanism's usage, its noise multiplier not yet set) with the run's noise multiplier:
    ``privacy.noise_multiplier``, or the one computed for the run's rounds when the config gives
    ``target_epsilon``."""
    privacy = config.privacy
    if privacy.target_epsilon is not None:
        z = calibrate_noise(privacy.target_epsilon, privacy.delta, budget.usage(config.federation.rounds))
    else:
        z = float(privacy.noise_multiplier)
    return replace(budget, noise_multiplier=z)
