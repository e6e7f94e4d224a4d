"""The privacy mechanism protocol: everything the rest of the platform asks of differential privacy.

A mechanism wraps a run as Flower's DP wrappers (``DifferentialPrivacyServerSideFixedClipping``, ...) wrap a
strategy: the method aggregates as it always does, and the mechanism acts around it. It is built from the config
(:func:`ravan_ray.privacy.build_mechanism`, one class per ``privacy.mode``) and called at five places:

- before the run (:meth:`PrivacyMechanism.check_config` from the CLI, :meth:`PrivacyMechanism.check` in the
  driver's preflight): a setting the method cannot run privately is one ConfigError;
- in the driver (:meth:`PrivacyMechanism.plan_budget`): the accountant's budget, with the noise multiplier given or
  calibrated, whose ``epsilon(round)`` fills metrics.csv's ``epsilon`` column;
- in each client's local training (:meth:`PrivacyMechanism.step_hook`, from ``ModelHost.train_client``): how a
  local step changes between its backward pass and the optimizer's step (:class:`StepHook`);
- on the parameter server (:meth:`PrivacyMechanism.privatize` before the method's aggregate,
  :meth:`PrivacyMechanism.state_entries` after it): the uploads the method aggregates and the round's metrics;
- in summary.json (:meth:`PrivacyMechanism.summary`, read back by :func:`summary_line`).

Three implementations: :class:`NoPrivacy` (here), client level (DP-FedAvg, ``client_level.ClientLevel``) and
sample level (DP-SGD, ``dp_sgd.SampleLevel``). What a method says under privacy is its own protocol,
:class:`ravan_ray.methods.private_terms.PrivateTerms`.
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ravan_ray.config import ConfigError, RunConfig
from ravan_ray.methods import build_method
from ravan_ray.methods.base import ClientTask, ClientUpdate, FederatedMethod, State
from ravan_ray.methods.private_terms import PrivateTerms
from ravan_ray.privacy.accounting import POISSON, PrivacyBudget, Sampling


class StepHook:
    """How a local step is changed between its backward pass and the optimizer's step (``ModelHost.step``), and what
    the client's upload carries from its steps. This base changes nothing: the plain step, with loss scaling under
    float16. A context manager around the client's steps: leaving it removes what it put on the model (DP-SGD's
    hooks)."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        #: the optimizer the loop zeroes and steps (DP-SGD's wraps the client's own)
        self.optimizer = optimizer

    def before_step(self, rows: Optional[torch.Tensor]) -> None:
        """The step's gradients are in, the optimizer has not stepped. ``rows``: the step's rows of the client's data
        (None for a cohort's step)."""

    def after_step(self) -> None:
        """The optimizer has stepped."""

    def meta(self) -> dict[str, Any]:
        """What the client's upload carries from its steps (DP-SGD: the share of clipped examples)."""
        return {}

    def __enter__(self) -> "StepHook":
        return self

    def __exit__(self, *exc) -> bool:
        return False


class PrivacyMechanism:
    """The protocol, with the behaviour of a run without privacy as its defaults: plain local steps, the uploads
    aggregated as they are, no budget, nothing in the summary."""

    #: the ``privacy.mode`` this mechanism implements (summary.json's ``privacy_mode``)
    name: ClassVar[str] = ""
    #: True when local training clips and noises per-example gradients (DP-SGD): a loss term that is a function of
    #: the weights alone (HetLoRA's pruning penalty) has no per-example gradient and drops out
    per_example_gradients: ClassVar[bool] = False

    def __init__(self, config: RunConfig):
        self.config = config

    # ----------------------------------------------------------------- before the run
    def check_config(self) -> None:
        """The checks that need no model and no data (the CLI's ``run``, ``--dry-run`` included)."""

    def check(self, method: FederatedMethod) -> None:
        """Raise ConfigError when ``method`` cannot run under this mechanism (the driver's preflight)."""

    def plan_budget(self, client_sizes: Sequence[int],
                    sampled_rounds: Sequence[Sequence[int]]) -> Optional[PrivacyBudget]:
        """The run's privacy budget, checked against its data, with the noise multiplier computed for the run's
        rounds when the config gives ``target_epsilon``; None without privacy. ``client_sizes[c]``: client c's
        number of examples (its rows, where an example makes one); ``sampled_rounds[c]``: the rounds client c is
        sampled in (the driver's seeded draw)."""
        return None

    # ----------------------------------------------------------------- a client's local training
    def step_hook(self, model: nn.Module, method: PrivateTerms, optimizer: torch.optim.Optimizer, task: ClientTask,
                  batches: list[torch.Tensor], examples: Optional[np.ndarray] = None) -> StepHook:
        """What this mechanism does to one client's local steps (``ModelHost.train_client`` runs them): the
        optimizer the loop steps and what happens to each step's gradients. ``batches``: the steps' rows of the
        client's data; ``examples``: each row's example where an example makes several rows (DP-SGD clips per
        example), else None. Default: plain steps."""
        return StepHook(optimizer)

    # ----------------------------------------------------------------- the server's round
    def privatize(self, method: PrivateTerms, state: State, updates: list[ClientUpdate],
                  round_index: int) -> tuple[list[ClientUpdate], dict[str, Any]]:
        """The uploads the method aggregates this round, and the round's privacy metrics (metrics.csv's
        ``clip_fraction``, ``clip_norm``, ``update_norm``). Default: the uploads as they are, no metrics."""
        return updates, {}

    def state_entries(self, old_state: State, metrics: dict[str, Any]) -> State:
        """Entries the mechanism keeps in the server's new state after the aggregation (``eval/`` keys: checkpointed,
        never broadcast), from the state before it and :meth:`privatize`'s metrics. Default: none."""
        return {}

    # ----------------------------------------------------------------- results
    def summary(self, epsilon: Optional[float]) -> dict[str, Any]:
        """summary.json's privacy entries, ``epsilon``: the last round's spent epsilon (None if none was recorded)."""
        return {}


class NoPrivacy(PrivacyMechanism):
    """``privacy.mode: none``."""

    name = "none"


class DifferentialPrivacy(PrivacyMechanism):
    """What both DP mechanisms share: the method must implement the private terms and may refuse the setting, and
    the summary reports epsilon at delta."""

    def check_config(self) -> None:
        self.check(build_method(self.config))

    def check(self, method: FederatedMethod) -> None:
        if not isinstance(method, PrivateTerms):
            raise ConfigError(f"privacy.mode={self.name}: method {self.config.method.name} does not implement "
                              f"differential privacy (ravan_ray.methods.private_terms.PrivateTerms)")
        method.check_privacy(self)

    def sampling(self) -> Sampling:
        """The sampling the accountant analyses, with its neighbour relation. Default: Poisson, add/remove-one."""
        return POISSON

    def summary(self, epsilon: Optional[float]) -> dict[str, Any]:
        """Also what the epsilon is for: the sampler the accountant analysed and its neighbour relation."""
        privacy = self.config.privacy
        sampling = self.sampling()
        return {"privacy_mode": self.name, "epsilon": epsilon, "delta": privacy.delta,
                "noise_multiplier": privacy.noise_multiplier, "sampler": sampling.kind,
                "neighbour_relation": sampling.neighbour_relation}


def summary_line(summary: dict[str, Any]) -> Optional[str]:
    """The privacy line of the end-of-run summary from summary.json's entries (:meth:`PrivacyMechanism.summary`);
    None for a run without privacy."""
    if not summary.get("privacy_mode"):
        return None
    epsilon = summary.get("epsilon")
    sampling = (f"; {summary['sampler']} sampling, {summary['neighbour_relation'].replace('_', ' ')} neighbours"
                if summary.get("sampler") else "")  # summaries written before the sampler was recorded lack it
    return (f"{summary['privacy_mode']} level, epsilon {'-' if epsilon is None else f'{epsilon:.3g}'} at delta "
            f"{summary['delta']:g} (noise multiplier {summary['noise_multiplier']:.3g}{sampling})")
