"""Differential privacy: the accountant, client-level clipping and noise (DP-FedAvg), sample-level DP-SGD.

Free of Ray: the driver, the parameter server and :class:`ravan_ray.training.ModelHost` call into it, always
through the mechanism :func:`build_mechanism` returns for the config (``mechanism.py``: the protocol), never by
reading ``privacy.mode`` themselves. One module per concern:

- ``mechanism.py``: :class:`PrivacyMechanism`, :class:`StepHook` (how a mechanism changes a local step of
  ``ModelHost``'s loop), and :class:`NoPrivacy` (``privacy.mode: none``);
- ``client_level.py``: DP-FedAvg (McMahan et al. 2018) with adaptive clipping (Andrew et al. 2021),
  :class:`ClientLevel` (``privacy.mode: client``);
- ``dp_sgd.py``: DP-SGD (Abadi et al. 2016, arXiv 1607.00133, Algorithm 1) through Opacus with the adapters'
  per-example gradient rule, :class:`SampleLevel` (``privacy.mode: sample``), whose step hook clips and noises;
- ``accounting.py``: the RDP accountant, noise calibration for a target epsilon, the run's :class:`PrivacyBudget`.

What each method says under privacy (its clipped update, how noise enters its uploads, what it refuses) is the
methods' own protocol: :class:`ravan_ray.methods.private_terms.PrivateTerms`, which this package imports and the
methods never import back. The default client weighting under client-level DP (uniform) is the config's rule
(:meth:`ravan_ray.config.RunConfig.aggregation_weights`), beside its check that refuses sample-count weights.
"""

from __future__ import annotations

from ravan_ray.config import RunConfig
from ravan_ray.privacy.accounting import PrivacyBudget, calibrate_noise, epsilon_for
from ravan_ray.privacy.client_level import ClientLevel
from ravan_ray.privacy.dp_sgd import SampleLevel
from ravan_ray.privacy.mechanism import NoPrivacy, PrivacyMechanism, StepHook, summary_line

#: ``privacy.mode`` -> its mechanism
MECHANISMS: dict[str, type[PrivacyMechanism]] = {cls.name: cls for cls in (NoPrivacy, ClientLevel, SampleLevel)}


def build_mechanism(config: RunConfig) -> PrivacyMechanism:
    """The privacy mechanism of ``config`` (the one place outside the config schema that reads ``privacy.mode``)."""
    return MECHANISMS[config.privacy.mode](config)


__all__ = ["MECHANISMS", "build_mechanism", "ClientLevel", "NoPrivacy", "PrivacyBudget", "PrivacyMechanism",
           "SampleLevel", "StepHook", "calibrate_noise", "epsilon_for", "summary_line"]
