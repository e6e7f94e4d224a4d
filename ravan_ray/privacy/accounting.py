"""The accountant: epsilon spent, the noise multiplier for a target epsilon, the run's privacy budget.

**Accounting**: Google's ``dp-accounting`` RDP accountant on the subsampled Gaussian mechanism, composed once per
round (client level) or once per local step (sample level, q = batch_size / the client's sample count, over the
steps of the rounds it took part in; the epsilon reported is the largest over clients).

Client level accounts the sampler the run uses (``privacy.client_sampling``), each with the neighbour relation its
analysis holds for (:data:`ADD_OR_REMOVE_ONE`, :data:`REPLACE_ONE`; summary.json records both):

- ``poisson`` (the default under client DP): every client takes part in a round independently with probability
  q = clients_per_round / num_clients and the server divides the noised sum by the fixed q N (McMahan et al. 2018),
  so one client's update moves the released mean by at most C / (q N): ``PoissonSampledDpEvent`` under add/remove-one
  neighbours;
- ``fixed``: exactly clients_per_round clients without replacement, the mean over those that trained:
  ``SampledWithoutReplacementDpEvent`` (Wang, Balle, Kasiviswanathan 2019), which dp-accounting analyses under
  replace-one neighbours only; replacing a client moves the clipped sum by up to 2 C, so the Gaussian event's noise
  multiplier is z / 2 (at 20 clients, 3 a round, z = 1, 50 rounds, delta 1e-3: epsilon 67.5, against 6.1 for
  Poisson sampling).

Sample level keeps the standard approximation of TF Privacy, Opacus and Flower: batches are drawn by shuffling,
while the accountant assumes Poisson sampling of examples at the batch fraction (add/remove-one). Who took part,
and which Ravan heads each trained, are public (they are drawn from the run seed, not from data).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import Any, Sequence

from ravan_ray.config import RunConfig
from ravan_ray.logs import quiet_logger


#: the neighbour relations an epsilon is for (summary.json's ``neighbour_relation``)
ADD_OR_REMOVE_ONE = "add_or_remove_one"
REPLACE_ONE = "replace_one"


@dataclass(frozen=True)
class Sampling:
    """How one release samples its participants: ``poisson`` at rate ``q``, or ``fixed``: exactly ``q *
    population`` of ``population`` without replacement. Says which dp-accounting event and neighbour relation
    account it."""

    kind: str = "poisson"
    population: int = 0  # the fixed sampler's source size (unused by Poisson sampling)

    @property
    def neighbour_relation(self) -> str:
        return REPLACE_ONE if self.kind == "fixed" else ADD_OR_REMOVE_ONE

    def accountant(self):
        import dp_accounting

        relation = (dp_accounting.NeighboringRelation.REPLACE_ONE if self.kind == "fixed"
                    else dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
        return dp_accounting.rdp.RdpAccountant(neighboring_relation=relation)

    def event(self, q: float, noise_multiplier: float, steps: int) -> Any:
        import dp_accounting

        if self.kind == "fixed":
            # replace-one moves a sum of updates clipped to C by up to 2 C: the Gaussian's noise is z C = (z / 2) 2 C
            sample = dp_accounting.SampledWithoutReplacementDpEvent(
                self.population, int(round(q * self.population)), dp_accounting.GaussianDpEvent(noise_multiplier / 2))
        else:
            sample = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(noise_multiplier))
        return dp_accounting.SelfComposedDpEvent(sample, int(steps))


POISSON = Sampling()


def epsilon_for(q: float, noise_multiplier: float, steps: int, delta: float, sampling: Sampling = POISSON) -> float:
    """epsilon after ``steps`` compositions of the subsampled Gaussian mechanism (rate q, noise z), by ``sampling``
    (default: Poisson, add/remove-one)."""
    if steps <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    with quiet_logger("absl"):  # dp-accounting warns of every RDP order it drops (rightly); noise in a run
        accountant = sampling.accountant()
        accountant.compose(sampling.event(q, noise_multiplier, steps))
        return float(accountant.get_epsilon(delta))


def calibrate_noise(target_epsilon: float, delta: float, usage: Sequence[tuple[float, int]],
                    sampling: Sampling = POISSON) -> float:
    """The smallest noise multiplier z at which every (q, steps) in ``usage`` spends at most ``target_epsilon``:
    dp-accounting's calibrate_dp_mechanism (a bisection on the accountant) for each client's usage, the largest z
    of them (epsilon falls as z grows, so that z holds for every client)."""
    import dp_accounting

    def calibrated(q: float, steps: int) -> float:
        return float(dp_accounting.calibrate_dp_mechanism(
            sampling.accountant, lambda z: sampling.event(q, z, steps), target_epsilon, delta,
            dp_accounting.LowerEndpointAndGuess(1e-3, 1.0), tol=1e-5))

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

    @property
    def sampling(self) -> Sampling:
        """How each release samples (its dp-accounting event and neighbour relation)."""
        return POISSON

    @abstractmethod
    def usage(self, round_index: int) -> list[tuple[float, int]]:
        """Every (sampling rate, compositions so far) pair after ``round_index`` rounds."""

    def epsilon(self, round_index: int) -> float:
        """The epsilon spent after ``round_index`` rounds (the largest over clients in sample mode)."""
        return max(epsilon_for(q, self.noise_multiplier, steps, self.delta, self.sampling)
                   for q, steps in dominant_usage(self.usage(round_index)))


@dataclass(frozen=True)
class PerRoundBudget(PrivacyBudget):
    """Client level: one subsampled Gaussian release per round, at the rate clients_per_round / num_clients, by the
    run's client sampler (``privacy.client_sampling``)."""

    client_rate: float
    sampler: str = "poisson"
    num_clients: int = 0

    @property
    def sampling(self) -> Sampling:
        return Sampling(self.sampler, self.num_clients)

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
        z = calibrate_noise(privacy.target_epsilon, privacy.delta, budget.usage(config.federation.rounds),
                            budget.sampling)
    else:
        z = float(privacy.noise_multiplier)
    return replace(budget, noise_multiplier=z)
