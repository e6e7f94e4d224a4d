"""Claims about names and options: method and task names are the registries' keys, each method and task
validates its own keys, and the keys of the others never break a config that runs another method."""

from __future__ import annotations

import pickle

import pytest
import yaml
from pydantic import Field

from ravan_ray.cli import main
from ravan_ray.config import (ConfigError, DataConfig, MethodConfig, Options, load_config, registered_options,
                              save_config)
from ravan_ray.methods import REGISTRY as METHOD_REGISTRY, build_method
from ravan_ray.methods.fedit import FedIT
from ravan_ray.sweep import trial_config
from ravan_ray.tasks import build_task


class DampedOptions(Options):
    damped_factor: float = Field(0.5, gt=0, le=1)


class Damped(FedIT):
    """A throwaway method registered by the tests below: FedIT with one option of its own."""

    name = "damped"
    options_model = DampedOptions


@pytest.fixture
def damped(monkeypatch):
    monkeypatch.setitem(METHOD_REGISTRY, "damped", f"{__name__}:Damped")


def refusal(*overrides: str) -> str:
    with pytest.raises(ConfigError) as refused:
        load_config(None, list(overrides))
    message = str(refused.value)
    assert len(message.splitlines()) == 1, message
    return message


# ------------------------------------------------------------------------------------------------ names
def test_a_registered_method_is_a_valid_name_without_editing_the_config_module(damped):
    method = build_method(load_config(None, ["method.name=damped"]))
    assert isinstance(method, Damped) and method.options == DampedOptions()


def test_an_unregistered_name_is_one_line_listing_the_registered_ones(damped):
    assert refusal("method.name=dampened") == ("method.name: must be a registered method: "
                                               f"{', '.join(METHOD_REGISTRY)} (got 'dampened')")
    assert "damped" in refusal("method.name=dampened")
    assert refusal("model.task=translation").startswith("model.task: must be a registered task: text_classification, ")


# ------------------------------------------------------------------------------------------------ options
def test_a_methods_options_are_read_through_its_own_model_chosen_by_name(damped):
    method = build_method(load_config(None, ["method.name=damped", "method.damped_factor=0.25"]))
    assert method.options == DampedOptions(damped_factor=0.25)
    hetlora = build_method(load_config(None, ["method.name=hetlora", "method.hetlora_gamma=0.75"]))
    assert (hetlora.options.hetlora_gamma, hetlora.options.hetlora_norm) == (0.75, "layer")


def test_a_bad_value_of_an_option_is_one_line_naming_the_key(damped):
    assert refusal("method.name=damped", "method.damped_factor=2") == (
        "method.damped_factor: Input should be less than or equal to 1 (got 2)")
    assert refusal("model.task=causal_lm", "data.long_prompts=drop").startswith("data.long_prompts: Input should be")


def test_an_unknown_key_is_one_line_naming_it_and_the_keys_the_chosen_method_takes(damped):
    assert refusal("method.name=damped", "method.damped_facter=0.2") == (
        "unknown config key 'method.damped_facter' (method damped takes: name, budget, lora_rank, "
        "aggregation_weights, lora_alpha, damped_factor)")
    assert refusal("method.name=hetlora", "method.hetlora_gama=0.5").endswith(
        "lora_alpha, hetlora_gamma, hetlora_lambda, hetlora_norm)")
    assert refusal("model.task=causal_lm", "data.prompt_fields=q") == (
        "unknown config key 'data.prompt_fields' (task causal_lm takes: name, path, subset, train_split, test_split, "
        "max_length, test_fraction, max_train_samples, max_test_samples, validation_fraction, validation_split, "
        "as_instructions, instruction, partition, client_test_fraction, max_new_tokens, prompt_field, input_field, "
        "response_field, long_prompts)")


def test_another_methods_key_is_checked_by_its_owner_and_changes_nothing_for_the_chosen_method(damped):
    """Sweeps over methods share one base config: a key of one method must not break the others' trials."""
    config = load_config(None, ["method.name=ravan", "method.damped_factor=0.25", "method.hetlora_gamma=0.5"])
    ravan = build_method(config)
    assert ravan.options == build_method(load_config()).options
    assert config.to_dict()["method"]["damped_factor"] == 0.25  # recorded as given
    assert refusal("method.name=ravan", "method.damped_factor=2").startswith("method.damped_factor:")
    base = {"method": {"lora_rank": 4, "hetlora_gamma": 0.5, "scoring": "weight"},
            "data": {"text_pair_field": "hypothesis", "prompt_field": "question"}}
    options = {name: build_method(trial_config(base, {"method.name": name})).options
               for name in ("ravan", "hetlora", "fedit", "damped")}
    assert options["ravan"].scoring == "weight" and options["hetlora"].hetlora_gamma == 0.5
    assert options["fedit"] == Options() and options["damped"] == DampedOptions()
    assert build_task(trial_config(base, {})).options.text_pair_field == "hypothesis"


def test_the_cli_dry_run_takes_another_methods_key_and_refuses_an_unknown_one(capsys):
    assert main(["run", "--dry-run", "--set", "method.name=fedit", "--set", "method.scoring=weight"]) == 0
    assert main(["run", "--dry-run", "--set", "method.name=fedit", "--set", "method.scorin=weight"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown config key 'method.scorin' (method fedit takes: name," in err


def test_config_yaml_lists_every_registered_option_and_reads_back_the_same(tmp_path):
    config = load_config(None, ["method.name=fedsa_lora", "method.fedsa_local_head=false", "data.text_field=body"])
    dumped = config.to_dict()
    for kind, section in (("method", "method"), ("task", "data")):
        for model in registered_options(kind).values():
            assert set(model.model_fields) <= set(dumped[section])
    save_config(config, tmp_path / "config.yaml", extra={"method": {"rank": 8}})
    again = load_config(tmp_path / "config.yaml")
    assert again.to_dict() == dumped
    assert build_method(again).options.fedsa_local_head is False
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["data"]["text_field"] == "body"


def test_an_options_model_tells_a_given_key_from_its_default_in_every_process():
    """causal_lm reads an explicitly set input_field differently from the default one."""
    given = load_config(None, ["model.task=causal_lm", "data.input_field=input"])
    default = load_config(None, ["model.task=causal_lm"])
    for config in (given, pickle.loads(pickle.dumps(given)), given.model_copy(deep=True)):
        assert build_task(config).options.model_fields_set == {"input_field"}
    assert build_task(default).options.model_fields_set == set()
    assert default.data.input_field == "input"  # the section still reads like one flat section


@pytest.mark.parametrize("kind, section", [("method", MethodConfig), ("task", DataConfig)])
def test_options_have_defaults_shadow_no_shared_key_and_agree_where_they_share_one(kind, section):
    shared = section.model_fields.keys()
    declared = {}
    for name, model in registered_options(kind).items():
        model()  # every option has a default
        assert not shared & model.model_fields.keys(), name
        for key, field in model.model_fields.items():
            first = declared.setdefault(key, (field.annotation, field.default, field.metadata))
            assert first == (field.annotation, field.default, field.metadata), f"{name}.{key}"


# ------------------------------------------------------------------------------------------------ unions
@pytest.mark.parametrize("override,says", [
    ("resources.cohort_size=abc", "resources.cohort_size: must be an integer >= 1 or 'auto' (got 'abc')"),
    ("resources.cohort_size=2.5", "resources.cohort_size: must be an integer >= 1 or 'auto' (got 2.5)"),
    ("resources.cohort_size=true", "resources.cohort_size: must be an integer >= 1 or 'auto' (got True)"),
    ("compute.distribution=lopsided", "compute.distribution: must be one of homogeneous, uniform, bell"),
    ("compute.distribution=[0.5,x,0.25,0.25]", "compute.distribution: must be one of"),
    ("seed=-1", "seed: Input should be greater than or equal to 0 (got -1)"),
])
def test_a_bad_value_of_a_key_taking_either_of_two_kinds_is_one_line_naming_the_key_alone(override, says):
    message = refusal(override)
    assert message.startswith(says), message
    assert ".int" not in message and "literal[" not in message  # no union member's tag in the key


def test_keys_taking_either_of_two_kinds_take_both_including_numpys_numbers():
    import numpy as np

    from ravan_ray.config import from_dict

    assert load_config(None, ["resources.cohort_size=auto"]).resources.cohort_size == "auto"
    drawn = from_dict({"resources": {"cohort_size": np.int64(3)},  # what a Tune search space draws
                       "compute": {"distribution": [np.float64(0.5), 0.5], "levels": [0.5, 1.0]}})
    assert drawn.resources.cohort_size == 3 and type(drawn.resources.cohort_size) is int
    assert drawn.compute.distribution == [0.5, 0.5]
    assert load_config(None, ["compute.distribution=bell"]).compute.distribution == "bell"
