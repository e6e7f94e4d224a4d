"""The method protocol: the one seam between a federated method and the rest of the platform.

A method is a small class, one file per method, in the spirit of a Flower strategy or a PEFT tuner. It
says how the model is wrapped, what a client trains and uploads, and how the server aggregates. The
driver, the actors and :class:`ravan_ray.training.ModelHost` only ever call these hooks, so adding a
method is adding one file and one line in ``methods/__init__.py``.

States are flat ``{name: tensor}`` dicts (safetensors-compatible):
- the *global state* is what the server holds and broadcasts every round (its bytes are the downlink);
  keys starting with ``eval/`` are kept by the server for evaluating the global model only and are
  never sent to clients (not counted as downlink);
- an *upload* is what one client sends back (its bytes are the uplink);
- a *client state* stays on the client between the rounds it takes part in (FedSA-LoRA's local B).

The task head (the new classifier of a sequence-classification model) is trained by every method when
``model.train_head`` is on, uploaded under ``head/...`` and averaged with FedAvg: it is not part of the
adapted layers and does not enter ``agg_error`` or ``effective_rank``.

What a method says under differential privacy (its clipped update, how noise enters its uploads, what it refuses)
is a second, small protocol in ``methods/private_terms.py`` (:class:`~ravan_ray.methods.private_terms.PrivateTerms`),
which the method classes mix in; :mod:`ravan_ray.privacy` calls it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ravan_ray.budgets import mix_proportions
from ravan_ray.config import Options, RunConfig
from ravan_ray.methods.budget import RankRule

State = dict[str, torch.Tensor]
HEAD_PREFIX = "head/"
EVAL_PREFIX = "eval/"
#: server bookkeeping for methods whose downlink depends on what a client already holds: per client, the last round
#: whose aggregated state it received (0: only the initial state, which every process builds from the seed).
SYNCED_KEY = EVAL_PREFIX + "synced_round"


@dataclass(frozen=True)
class ClientTask:
    """One client's work in one round. Everything a client does is a function of this and the state."""

    client_id: int
    round: int
    level: float  # compute budget as a fraction of N_max
    seed: int  # the run seed; per-task randomness derives from (seed, round, client_id)
    # The local steps this client trains: None, federation.local_steps; fewer where a simulated deadline cuts it
    # short (system.late=partial, ravan_ray/system.py). Its batches are then the first of the full run's.
    steps: Optional[int] = None

    def local_steps(self, configured: int) -> int:
        return configured if self.steps is None else self.steps

    def generator(self, stream: int = 0, device: torch.device | str = "cpu") -> torch.Generator:
        """A torch RNG private to this (run, round, client, stream): results do not depend on which
        actor runs the client or in which order, which is what makes pool and per-client modes agree.
        ``device``: where it draws (a CUDA tensor's random numbers need a generator on its device)."""
        entropy = np.random.SeedSequence([self.seed, self.round, self.client_id, stream]).generate_state(2)
        return torch.Generator(device=device).manual_seed(int(entropy[0]) << 32 | int(entropy[1]))


@dataclass
class ClientUpdate:
    """What a client returns after local training."""

    client_id: int
    tensors: State  # communicated: uplink bytes are exactly sum(t.nbytes)
    num_samples: int
    train_loss: float
    meta: dict[str, Any] = field(default_factory=dict)  # small selection metadata (head indices, rank)
    client_state: Optional[State] = None  # stays with the client across rounds


def state_bytes(state: State) -> int:
    return int(sum(t.numel() * t.element_size() for t in state.values()))


def weighted_mean(tensors: list[torch.Tensor], weights: np.ndarray) -> torch.Tensor:
    """sum_c w_c t_c with weights that sum to 1; accumulated in float64 so the result does not depend on
    floating-point summation order beyond the last bit of the stored dtype."""
    total = torch.zeros_like(tensors[0], dtype=torch.float64)
    for tensor, weight in zip(tensors, weights):
        total += float(weight) * tensor.to(torch.float64)
    return total.to(tensors[0].dtype)


class FederatedMethod(ABC):
    """Base class of every method. Subclasses override the hooks marked "override"."""

    name: ClassVar[str] = ""
    #: True when the server rule reproduces the mean of the clients' full weight updates exactly.
    exact: ClassVar[bool] = False
    #: The learning rate used when the config leaves optimizer.lr unset: 1e-2 for an adapter method, the rate the
    #: paper's protocol validated at the default run's setting for FedIT (2 of 3 seeds of Banking77, all 3 of 20
    #: Newsgroups), FFA-LoRA (2 of 3 on each), Fed-SB (all 3 of 20 Newsgroups; on Banking77 1 of 3, level on
    #: validation with 0.02) and FedEx-LoRA (all 3 of Banking77, 2 of 3 of 20 Newsgroups) (benchmarks/RESULTS.md,
    #: "The paper's protocol", which also says where a method's choice differed; 2e-3 before, below every adapter
    #: method's validated rate). A method whose validated rate is another sets its own (Ravan, FedSVD, full FT).
    default_lr: ClassVar[float] = 1e-2
    #: True when the method writes into the wrapped layers' own weights W (merging an update into W, as
    #: FedEx-LoRA, FLoRA, FlexLoRA and Fed-SB's warm-up do). Those weights are then private, float32 copies
    #: in every process; otherwise they stay shared and in the base's dtype (a bfloat16 base stays bfloat16).
    changes_base_weights: ClassVar[bool] = False
    #: Why this method's clients cannot share one forward pass in a cohort (``resources.cohort_size`` > 1), or None
    #: when they can (ravan_ray/cohort.py): full fine-tuning trains a full copy of every weight per client.
    cohort_blocker: ClassVar[Optional[str]] = None

    #: Why this method's global model is not the pretrained model plus one LoRA per adapted layer (it changes the
    #: layers' own weights W, or every weight), or None when it is one; ``ravan-ray export --format peft`` then
    #: refuses it with this reason, and ``--format merged`` exports it (ravan_ray/export.py).
    merged_export_only: ClassVar[Optional[str]] = None

    #: How the method's reference code weights clients when ``method.aggregation_weights`` is unset: "uniform" or
    #: "num_samples" (data size); each method file says where its reference does so.
    reference_weights: ClassVar[str] = "uniform"
    #: True when the method reads a client's compute level (``ClientTask.level``: rank, heads); a method that does not
    #: trains every client alike whatever ``compute.distribution`` says, and a run says so (``budget_aware`` in
    #: summary.json, one line at its start, a marker in the report).
    budget_aware: ClassVar[bool] = False

    #: This method's own ablations, for ``ravan-ray report``: config key -> what a table over it compares
    #: ("Final score per <that>"), beside the tables every method gets (per task, method, budget mix, partition).
    report_tables: ClassVar[dict[str, str]] = {}

    #: The method's own keys under ``method:`` (HetLoRA's pruning knobs, ...), read through ``self.options``.
    options_model: ClassVar[type[Options]] = Options

    #: How the shared per-matrix budget N becomes this method's rank (``methods/budget.py``: LORA_RANK, B_ONLY,
    #: CORE); a method whose rule needs more (its options) overrides :meth:`rank` instead.
    rank_rule: ClassVar[Optional[RankRule]] = None

    #: This method's own columns of metrics.csv (filled by :meth:`round_metrics`: Ravan's ``heads_trained``), each
    #: with the value the runs of every other method write there: metrics.csv has every registered method's
    #: columns, as config.yaml has every registered option, so the runs of a sweep over methods share their columns.
    metrics_columns: ClassVar[dict[str, float]] = {}

    def __init__(self, config: RunConfig):
        self.config = config
        self.options = config.method.options(self.options_model)
        self.seed = config.seed
        self.lr = config.optimizer.lr if config.optimizer.lr is not None else self.default_lr

    # ----------------------------------------------------------------- model structure (every process)
    @abstractmethod
    def wrap_model(self, model: nn.Module) -> dict[str, nn.Module]:
        """Replace the target linear layers of ``model`` with this method's modules (sized for the
        largest budget) and return {adapted module name: module}."""

    def resolved(self) -> dict[str, Any]:
        """Derived settings worth recording in the run's config.yaml (ranks per method, ...)."""
        return {}

    @classmethod
    def rank(cls, method_config, d_in: int, d_out: int) -> int:
        """override: the rank this method uses on a d_out x d_in matrix under the shared budget (``method_config``:
        the ``method:`` section). Default: by the method's :attr:`rank_rule`."""
        if cls.rank_rule is None:
            raise TypeError(f"method {cls.name} declares no rank_rule and does not override rank()")
        return cls.rank_rule.rank_for(method_config, d_in, d_out)

    def budget_columns(self, levels: Sequence[float]) -> dict[str, list]:
        """override: this method's own columns of client_budgets.csv, one value per client from its compute level
        ``levels[c]`` (Ravan: the heads it trains). Default: none."""
        return {}

    # ----------------------------------------------------------------- server side
    def round_metrics(self, updates: list[ClientUpdate]) -> dict[str, float]:
        """override: this round's values of :attr:`metrics_columns`, from the uploads the server accepted (at least
        one). Default: none."""
        return {}

    def initial_state(self, model: nn.Module) -> State:
        """override: the first global state, read off the freshly wrapped model."""
        return self.head_state(model)

    @abstractmethod
    def aggregate(self, state: State, updates: list[ClientUpdate], round_index: int) -> State:
        """The new global state from the old one and this round's client updates."""

    def client_view(self, state: State, update: ClientUpdate) -> tuple[State, Optional[State]]:
        """The (global state, client state) pair that reproduces the client's model after its local
        training; used for the agg_error diagnostic. Default: the upload overrides the broadcast (without the
        server's ``eval/`` keys, which no client ever holds)."""
        sent = {k: v for k, v in state.items() if not k.startswith(EVAL_PREFIX)}
        return {**sent, **update.tensors}, update.client_state

    def downlink_bytes(self, state: State, clients: Sequence[int]) -> int:
        """Bytes the server sends this round to the sampled ``clients``: by default the broadcast state to each.
        Methods whose clients keep what they received (FLoRA's merged stacks, Fed-SB's bases) override this and
        charge each client what it lacks, using :func:`synced_round`."""
        sent = {k: v for k, v in state.items() if not k.startswith(EVAL_PREFIX)}
        return state_bytes(sent) * len(clients)

    # ----------------------------------------------------------------- client side
    def load_state(self, model: nn.Module, state: State, client_state: Optional[State]) -> None:
        """override: write the global state (and the client's own state, when it has one) into the model."""
        self.load_head(model, state)

    def begin_training(self, model: nn.Module, task: ClientTask, batch_loss: Callable[[], torch.Tensor]) -> dict:
        """override: choose what this client trains (heads, rank) and set requires_grad accordingly.
        ``batch_loss()`` computes the loss on one local mini-batch (for gradient-based scores).
        Returns metadata kept in the update (e.g. the selected heads)."""
        self.train_head(model)
        return {}

    def local_penalty(self, model: nn.Module) -> Optional[torch.Tensor]:
        """override: a term added to the client's loss at every local step (and reported in train_loss), a function of
        the client's trainable tensors rather than of its data (HetLoRA's rank-pruning penalty). It reads the layers
        through the model, so a cohort evaluates it on each client's own tensors. Default: None (no term)."""
        return None

    def upload(self, model: nn.Module, task: ClientTask, meta: dict) -> tuple[State, Optional[State]]:
        """override: (communicated tensors, client-local state) after local training."""
        return self.head_state(model), None

    def export_lora(self, layer: nn.Module) -> Optional[tuple[torch.Tensor, torch.Tensor, float]]:
        """override: the global model's update of one adapted layer (loaded with the global state) as a plain LoRA
        (B, A, scale) on the layer's pretrained weight, scale * B @ A, for ``ravan-ray export --format peft``; None
        when the method's global model is no such LoRA (``merged_export_only`` says why). Default: the adapter's own
        factorisation (every LoRA-family layer here is a LoRA: Ravan's heads stack into one of rank h r)."""
        if self.merged_export_only is not None:
            return None
        return layer.lora_factors()

    def mutable_parameters(self, model: nn.Module) -> list[str]:
        """Names of the parameters a client may change. The host restores them to their pretrained
        values before every client task, so nothing leaks from one client to the next in pool mode."""
        adapter_params = [f"{layer}.{param}" for layer, module in self.adapted_modules(model).items()
                          for param, _ in module.named_parameters()
                          if self.changes_base_weights or not param.startswith("base.")]
        return adapter_params + self.head_parameter_names(model)

    # ----------------------------------------------------------------- helpers shared by methods
    @classmethod
    def aggregation_weighting(cls, config: RunConfig) -> str:
        """The weighting a run of this method uses: ``method.aggregation_weights`` when given, else the reference's
        (``reference_weights``) where the privacy setting allows it (:meth:`RunConfig.aggregation_weights`)."""
        return config.aggregation_weights(cls.reference_weights)

    @classmethod
    def ignores_compute_mix(cls, config: RunConfig) -> bool:
        """True when the run gives some client a compute level below the full budget (``compute.distribution`` other
        than homogeneous at level 1) and this method does not read levels: all its clients then train alike."""
        if cls.budget_aware:
            return False
        compute = config.compute
        proportions = mix_proportions(compute.distribution, compute.levels)
        return any(share > 0 and level < 1 for share, level in zip(proportions, compute.levels))

    def client_weights(self, updates: list[ClientUpdate]) -> np.ndarray:
        """Aggregation weights: uniform or proportional to the clients' sample counts
        (:meth:`aggregation_weighting`)."""
        if self.aggregation_weighting(self.config) == "num_samples":
            counts = np.array([u.num_samples for u in updates], dtype=float)
            return counts / counts.sum()
        return np.full(len(updates), 1.0 / len(updates))

    @staticmethod
    def adapted_modules(model: nn.Module) -> dict[str, nn.Module]:
        return dict(getattr(model, "ravan_adapted", {}))

    def head_parameter_names(self, model: nn.Module) -> list[str]:
        if not self.config.model.train_head:
            return []
        return list(getattr(model, "ravan_head_parameters", []))

    def head_state(self, model: nn.Module) -> State:
        params = dict(model.named_parameters())
        return {HEAD_PREFIX + name: params[name].detach().clone() for name in self.head_parameter_names(model)}

    def load_head(self, model: nn.Module, state: State) -> None:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name in self.head_parameter_names(model):
                params[name].copy_(state[HEAD_PREFIX + name])

    def train_head(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        for name in self.head_parameter_names(model):
            params[name].requires_grad_(True)

    def aggregate_head(self, updates: list[ClientUpdate], weights: np.ndarray) -> State:
        keys = [k for k in updates[0].tensors if k.startswith(HEAD_PREFIX)]
        return {k: weighted_mean([u.tensors[k] for u in updates], weights) for k in keys}


# ----------------------------------------------------------------------------------------------------------- sync
def initial_sync(num_clients: int) -> torch.Tensor:
    """Every client holds round 0's state (the pretrained model and the seeded adapter initialisation)."""
    return torch.zeros(num_clients, dtype=torch.int64)


def synced_round(state: State, client: int) -> int:
    """The last round whose aggregated state ``client`` received (0: the initial state only)."""
    synced = state.get(SYNCED_KEY)
    return 0 if synced is None else int(synced[client])


def mark_synced(state: State, updates: list[ClientUpdate], round_index: int) -> torch.Tensor:
    """The sync vector after ``round_index``: its clients received the state of round ``round_index - 1``. A client
    that dropped out of the round is not marked, so it is charged again when next sampled."""
    synced = state[SYNCED_KEY].clone()
    for update in updates:
        synced[update.client_id] = max(int(synced[update.client_id]), round_index - 1)
    return synced
