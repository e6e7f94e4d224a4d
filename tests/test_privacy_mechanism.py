"""The privacy seam: one mechanism per ``privacy.mode``, the identity without privacy, and the methods' side of it
(PrivateTerms) checked by the DP mechanisms. The numbers themselves are test_privacy.py's and
test_behaviour_identity.py's."""

from __future__ import annotations

import typing

import pytest

from conftest import TINY_OVERRIDES
from ravan_ray.config import ConfigError, PrivacyConfig, load_config
from ravan_ray.methods import REGISTRY, build_method, method_class
from ravan_ray.methods.base import ClientUpdate, FederatedMethod
from ravan_ray.methods.private_terms import PrivateTerms
from ravan_ray.privacy import MECHANISMS, ClientLevel, NoPrivacy, SampleLevel, build_mechanism, summary_line

DP = {"client": ("privacy.mode=client", "privacy.noise_multiplier=1", "privacy.clip_norm=1", "privacy.delta=1e-3"),
      "sample": ("privacy.mode=sample", "privacy.noise_multiplier=1", "privacy.clip_norm=1")}


def _config(*overrides: str):
    return load_config(None, [*TINY_OVERRIDES, *overrides])


def test_every_privacy_mode_of_the_schema_has_its_mechanism():
    modes = typing.get_args(PrivacyConfig.model_fields["mode"].annotation)
    assert set(MECHANISMS) == set(modes)
    assert isinstance(build_mechanism(_config()), NoPrivacy)
    assert isinstance(build_mechanism(_config(*DP["client"])), ClientLevel)
    assert isinstance(build_mechanism(_config(*DP["sample"])), SampleLevel)


def test_every_method_implements_the_private_terms():
    assert all(issubclass(method_class(name), PrivateTerms) for name in REGISTRY)


def test_without_privacy_the_uploads_pass_unchanged_and_the_summary_says_nothing():
    mechanism = build_mechanism(_config())
    updates = [ClientUpdate(0, {}, 1, 0.0)]
    private, metrics = mechanism.privatize(None, {}, updates, 1)
    assert private is updates and metrics == {}
    assert mechanism.state_entries({}, metrics) == {}
    assert mechanism.plan_budget([10, 10], [[1], [2]]) is None
    assert mechanism.summary(None) == {} and summary_line({"method": "ravan"}) is None


class BareMethod(FederatedMethod):
    """A method that implements the method protocol only, not the private terms."""

    name = "bare"

    def wrap_model(self, model):
        return {}

    def aggregate(self, state, updates, round_index):
        return state


@pytest.mark.parametrize("mode", sorted(DP))
def test_a_method_without_private_terms_is_refused_under_dp_and_runs_without(mode):
    config = _config(*DP[mode])
    with pytest.raises(ConfigError, match="does not implement differential privacy"):
        build_mechanism(config).check(BareMethod(config))
    build_mechanism(_config()).check(BareMethod(_config()))


def test_method_refusals_are_called_by_the_mechanism_that_they_concern():
    hetlora = _config("method.name=hetlora", *DP["client"])
    build_mechanism(hetlora).check(build_method(hetlora))  # the pruning penalty is fine under client-level DP
    sample = _config("method.name=hetlora", *DP["sample"])
    with pytest.raises(ConfigError, match="hetlora_lambda=0"):
        build_mechanism(sample).check(build_method(sample))
    for mode in DP:
        ravan = _config("method.name=ravan", "method.scoring=gradient", *DP[mode])
        with pytest.raises(ConfigError, match="scoring=gradient"):
            build_mechanism(ravan).check(build_method(ravan))
    ravan = _config("method.name=ravan", "method.scoring=gradient")
    build_mechanism(ravan).check(build_method(ravan))  # no privacy: nothing to refuse
