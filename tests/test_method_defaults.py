"""What a method does with the run's settings it may not read: its default client weighting is its reference
code's (``method.aggregation_weights`` overrides it; client-level DP needs uniform), and a compute mix that a
method ignores is said at the start, in summary.json (``budget_aware``) and in the report (a marked row)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import TINY_INFO, TINY_OVERRIDES
from ravan_ray.config import ConfigError, load_config
from ravan_ray.methods import REGISTRY, build_method, method_class
from ravan_ray.methods.base import ClientUpdate
from ravan_ray.results import summarize
from ravan_ray.training import preflight

DATA_SIZE_REFERENCES = {"fedit", "flexlora", "flora", "fedsvd"}  # their code weights clients by data size
LEVEL_READERS = {"ravan", "hetlora", "flexlora", "fed_plora"}  # heads or rank from ClientTask.level
CLIENT_DP = ["privacy.mode=client", "privacy.noise_multiplier=1.0", "privacy.clip_norm=1.0"]


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_unset_weights_are_the_reference_codes_and_a_given_weighting_wins(name):
    expected = "num_samples" if name in DATA_SIZE_REFERENCES else "uniform"
    method = method_class(name)
    assert method.aggregation_weighting(load_config(None, [f"method.name={name}"])) == expected
    for given in ("uniform", "num_samples"):
        config = load_config(None, [f"method.name={name}", f"method.aggregation_weights={given}"])
        assert method.aggregation_weighting(config) == given


@pytest.mark.parametrize("name", sorted(DATA_SIZE_REFERENCES))
def test_under_client_dp_the_default_is_uniform_and_asking_for_sample_counts_is_one_line(name):
    config = load_config(None, [f"method.name={name}", "federation.num_clients=20", *CLIENT_DP])
    assert method_class(name).aggregation_weighting(config) == "uniform"
    with pytest.raises(ConfigError, match="privacy.mode=client needs method.aggregation_weights=uniform"):
        load_config(None, [f"method.name={name}", "federation.num_clients=20", *CLIENT_DP,
                           "method.aggregation_weights=num_samples"])


def test_flexlora_weighs_its_clients_by_their_data_size_by_default():
    updates = [ClientUpdate(c, {}, n, 0.0) for c, n in enumerate((10, 30, 60))]
    by_default = build_method(load_config(None, ["method.name=flexlora"])).client_weights(updates)
    assert np.allclose(by_default, [0.1, 0.3, 0.6])
    pinned = build_method(load_config(None, ["method.name=flexlora", "method.aggregation_weights=uniform"]))
    assert np.allclose(pinned.client_weights(updates), [1 / 3] * 3)


def test_exactly_the_methods_that_read_compute_levels_are_budget_aware():
    assert {name for name in REGISTRY if method_class(name).budget_aware} == LEVEL_READERS


@pytest.mark.parametrize("mix, ignored", [("homogeneous", False), ("uniform", True), ("[0, 0, 0, 1]", False),
                                          ("[0, 0.5, 0, 0.5]", True)])
def test_a_mix_is_ignored_when_it_gives_some_client_less_than_the_full_budget(mix, ignored):
    assert method_class("fedit").ignores_compute_mix(load_config(None, [f"compute.distribution={mix}"])) is ignored
    assert not method_class("ravan").ignores_compute_mix(load_config(None, [f"compute.distribution={mix}"]))


def test_a_method_that_ignores_the_mix_says_so_in_one_line_at_the_start(capsys):
    resolved = preflight(load_config(None, [*TINY_OVERRIDES, "method.name=fedit", "compute.distribution=bell"]),
                         TINY_INFO)
    lines = [line for line in capsys.readouterr().err.splitlines() if "compute levels" in line]
    assert lines == ["ravan-ray: fedit does not read compute levels: every client trains its full budget whatever "
                     "compute.distribution=bell gives it (summary.json: budget_aware false)"]
    assert resolved["budget_aware"] is False and resolved["aggregation_weights"] == "num_samples"
    for quiet in (["method.name=fedit"], ["method.name=hetlora", "compute.distribution=bell"]):
        preflight(load_config(None, [*TINY_OVERRIDES, *quiet]), TINY_INFO)
        assert "compute levels" not in capsys.readouterr().err


def test_summary_json_has_the_budget_aware_flag_and_the_weighting_used():
    rows = [{"round": 1, "wall_s": 1.0, "test_accuracy": 0.5, "test_loss": 1.0}]
    fedsvd = summarize(load_config(None, ["method.name=fedsvd", "compute.distribution=uniform"]), rows, 1.0)
    assert fedsvd["budget_aware"] is False and fedsvd["aggregation_weights"] == "num_samples"
    ravan = summarize(load_config(None, ["method.name=ravan", "compute.distribution=uniform"]), rows, 1.0)
    assert ravan["budget_aware"] is True and ravan["aggregation_weights"] == "uniform"
