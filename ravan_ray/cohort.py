"""Cohort training: several clients of one round through one forward pass of the shared frozen base.

Every client of a round starts from the same broadcast and shares the frozen base; only its trainable tensors
(adapters, task head) and its per-round choices (Ravan's heads, a LoRA rank mask, FedSA-LoRA's local B) differ.
A cohort of k clients therefore trains in lockstep: each step concatenates the k clients' own mini-batches (the
rows each samples alone), runs the base once over them, and every module that holds per-client tensors applies
each client's own tensors to that client's rows. Those tensors are stacked, one slice per client, and the module's
forward is ``torch.func.vmap`` of its own forward (through ``functional_call``) over the stack, so every method's
layer works unchanged: a frozen weight shared by the cohort stays one GEMM over all rows, a per-client LoRA factor
becomes a batched matmul. The adapter layers also write that batched forward out by hand (``cohort_forward``,
the same maths without vmap's per-operation overhead), and a layer that has one uses it. The loss is the sum of the clients' own mean losses, so each client's gradient is its own
exactly, and Adam on the stacked tensors is Adam on each client's (its update is elementwise).

What stays per client: the batches, scoring and head selection, K_c, ranks and rank masks (each client's
``begin_training`` runs as it would alone, on a copy of the method object, and what it sets is snapshotted), the
penalty a method adds to the local objective (:meth:`FederatedMethod.local_penalty`, evaluated on the client's
own slices) and the upload. Where a client's begin_training leaves the model in a state a stack cannot express
(a frozen weight that trains, a Python setting such as a LoRA scale that differs between the cohort's clients), or
where the task has no per-row loss, the cohort trains one by one instead (:func:`cohort_blocker` says why).

Dropout is the one thing that differs from training the clients one by one: alone, a client's dropout masks come
from its own (seed, round, client) stream; in a cohort they come from one stream for the cohort, seeded from its
first client's (a cohort of one is the one-by-one run exactly). Runs stay a function of (config, seed) for a given
``resources.cohort_size``, since cohorts are fixed chunks of the round's sorted client ids; with dropout off
(``model.dropout: 0``) a cohort run equals the one-by-one run to float rounding.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap

from ravan_ray.methods.base import ClientTask, ClientUpdate, State
from ravan_ray.privacy import StepHook
from ravan_ray.tasks.base import Task
from ravan_ray.training import LocalClient, ModelHost, make_optimizer

Batch = dict[str, np.ndarray]

# Share of the free memory a cohort's activations may take; the rest is headroom for the allocator, the optimizer's
# transient buffers and what the probe does not see (cuBLAS workspaces).
MEMORY_SHARE = 0.7


def cohorts(clients: Sequence[int], size: int) -> list[list[int]]:
    """The round's clients cut into cohorts: sorted ids in fixed chunks of ``size`` (the last may be smaller), so
    which clients train together depends on (config, seed) only, never on which actor runs them."""
    ordered = sorted(int(c) for c in clients)
    size = max(1, int(size))
    return [ordered[i:i + size] for i in range(0, len(ordered), size)]


@dataclass
class ClientSetup(LocalClient):
    """One client of a cohort, prepared as its solo run prepares it (:meth:`ModelHost.prepare_client`), with what
    its begin_training left in the cohort's modules."""

    tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # module -> name -> value
    trainable: dict[str, dict[str, bool]] = field(default_factory=dict)
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)  # module -> plain attributes


def cohort_modules(host: ModelHost) -> dict[str, nn.Module]:
    """The modules whose tensors may differ between clients: the adapted layers and the modules that own the task
    head's parameters (the classifier)."""
    modules = dict(host.adapted)
    for name in host.method.head_parameter_names(host.model):
        owner = name.rpartition(".")[0]
        modules.setdefault(owner, host.model.get_submodule(owner))
    return modules


def _plain_settings(module: nn.Module) -> dict[str, Any]:
    """The module's own non-tensor settings (a LoRA scale, a forward mode): a stack cannot vary them per client."""
    return {k: v for k, v in vars(module).items() if isinstance(v, (bool, int, float, str)) and k != "training"}


def _snapshot(host: ModelHost, modules: dict[str, nn.Module], setup: ClientSetup) -> None:
    mutable = set(host.pristine)
    for module_name, module in modules.items():
        values, trainable = {}, {}
        for name, param in module.named_parameters():
            full = f"{module_name}.{name}"
            # a parameter no method may change is the pretrained value in every client: never copied
            if full in mutable or param.requires_grad:
                values[name] = param.detach().clone()
                trainable[name] = param.requires_grad
        for name, buffer in module.named_buffers():
            values[name] = buffer.detach().clone()
            trainable[name] = False
        setup.tensors[module_name], setup.trainable[module_name] = values, trainable
        setup.settings[module_name] = _plain_settings(module)


def cohort_blocker(host: ModelHost, setups: list[ClientSetup], modules: dict[str, nn.Module]) -> Optional[str]:
    """Why these clients cannot train as one cohort (None when they can)."""
    if host.method.cohort_blocker is not None:
        return host.method.cohort_blocker
    if host.privacy.per_example_gradients:
        return "DP-SGD takes per-example gradients of one client's model"
    if type(host.task).row_losses is Task.row_losses:
        return f"task {host.task.name} has no per-row loss"
    for name, param in host.model.named_parameters():
        if param.requires_grad and not any(name.startswith(m + ".") for m in modules):
            return f"{name} trains outside the adapted layers and the task head"
    first = setups[0]
    for module_name, trainable in first.trainable.items():
        for name in trainable:
            if name.startswith("base.") and any(s.trainable[module_name][name] for s in setups):
                return f"the frozen weight {module_name}.{name} trains"
    for setup in setups[1:]:
        for module_name, settings in setup.settings.items():
            differing = sorted(k for k in settings if settings[k] != first.settings[module_name].get(k))
            if differing:
                return f"{module_name} has per-client settings ({', '.join(differing)})"
    return None


class StackedModule(nn.Module):
    """Stands in for ``inner`` while a cohort trains: applies client c's tensors (``stacked[name][c]``) to client
    c's rows (the c-th block of ``rows_per_client`` rows of its input) through vmap of ``inner``'s own forward."""

    def __init__(self, inner: nn.Module, stacked: dict[str, torch.Tensor], clients: int):
        super().__init__()
        self.inner = inner
        object.__setattr__(self, "stacked", stacked)  # not registered: the cohort's optimizer owns them
        self.clients = clients

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        blocks = x.unflatten(0, (self.clients, -1))
        # A layer that knows how to run C clients at once (the adapters: one base GEMM for all, batched products
        # for what differs) skips vmap's per-op dispatch, measured at 1.4-2x the layer's time on a CPU
        # (benchmarks/RESULTS.md, "Cohort training").
        batched = getattr(self.inner, "cohort_forward", None)
        if batched is not None and not args and not kwargs:
            out = batched(blocks, self.stacked)
            if out is not None:
                return out.flatten(0, 1)

        def one_client(tensors: dict[str, torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
            return functional_call(self.inner, tensors, (rows, *args), kwargs, strict=False)

        return vmap(one_client)(self.stacked, blocks).flatten(0, 1)

    def __getattr__(self, name: str):
        # the model may read attributes of the layer it calls (a weight's dtype): the inner module's
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("_modules", {}).get("inner")
            if inner is None:
                raise
            return getattr(inner, name)


class _Penalty(nn.Module):
    """Evaluates a client's method penalty with the client's own slices swapped into the layers (functional_call
    swaps tensors of a module tree; this holds the cohort modules as its tree)."""

    def __init__(self, modules: dict[str, nn.Module], penalty: Callable[[], Optional[torch.Tensor]]):
        super().__init__()
        self.held = nn.ModuleDict({_safe(name): module for name, module in modules.items()})
        self.penalty = penalty

    def forward(self):
        return self.penalty()


def _safe(name: str) -> str:
    return name.replace(".", "__")


@dataclass
class Stack:
    """The cohort's stacked tensors: per module, name -> (k, *shape); ``trains``: the leaves the optimizer steps;
    ``frozen``: per stacked trainable tensor, the clients (bool (k,)) that must not move it."""

    tensors: dict[str, dict[str, torch.Tensor]]
    trains: list[torch.Tensor]
    frozen: dict[int, torch.Tensor]  # id(leaf) -> bool mask over clients


def build_stack(setups: list[ClientSetup], modules: dict[str, nn.Module]) -> Stack:
    """Stack what differs between the cohort's clients (and everything any of them trains); what is the same in all
    stays the module's own tensor, shared by the cohort."""
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    trains, frozen = [], {}
    for module_name in modules:
        stacked = {}
        for name, first in setups[0].tensors[module_name].items():
            values = [s.tensors[module_name][name] for s in setups]
            flags = torch.tensor([s.trainable[module_name][name] for s in setups])
            if not flags.any() and all(torch.equal(first, v) for v in values[1:]):
                continue
            leaf = torch.stack(values)
            if flags.any():
                leaf.requires_grad_(True)
                trains.append(leaf)
                if not flags.all():
                    frozen[id(leaf)] = ~flags
            stacked[name] = leaf
        tensors[module_name] = stacked
    return Stack(tensors, trains, frozen)


class swapped_in:
    """Replace the cohort modules in the model by StackedModules for the duration of the block."""

    def __init__(self, model: nn.Module, modules: dict[str, nn.Module], stack: Stack, clients: int):
        self.model, self.modules, self.stack, self.clients = model, modules, stack, clients

    def _set(self, name: str, module: nn.Module) -> None:
        parent, _, child = name.rpartition(".")
        setattr(self.model.get_submodule(parent) if parent else self.model, child, module)

    def __enter__(self):
        for name, module in self.modules.items():
            if self.stack.tensors[name]:
                self._set(name, StackedModule(module, self.stack.tensors[name], self.clients))
        return self

    def __exit__(self, *exc):
        for name, module in self.modules.items():
            if self.stack.tensors[name]:
                self._set(name, module)
        return False


def cohort_batch(host: ModelHost, setups: list[ClientSetup],
                 step: int) -> tuple[dict[str, torch.Tensor], Optional[torch.Tensor], int, list[int]]:
    """The step's model inputs for the whole cohort: each client's own rows (as its solo run would take them),
    padded to the cohort's longest row and, for a client with fewer rows than the others, filled up with repeats of
    its own rows (the repeats are left out of its loss). Returns (inputs, each row's width in its own client's
    batch (None for inputs without a token axis), rows per client, real rows per client)."""
    rows = [setup.batches[step] for setup in setups]
    per_client = max(len(r) for r in rows)
    parts = []
    for setup, own in zip(setups, rows):
        filled = own if len(own) == per_client else torch.cat([own, own[torch.arange(per_client - len(own)) % len(own)]])
        parts.append(host.task.batch(setup.data, filled.numpy(), host.device))
    widths = None
    if "input_ids" in parts[0] and parts[0]["input_ids"].dim() == 2:
        widths = torch.tensor([part["input_ids"].shape[1] for part in parts]).repeat_interleave(per_client)
    return host.task.collate(parts), widths, per_client, [len(r) for r in rows]


def activation_bytes(host: ModelHost, setups: list[ClientSetup], modules: dict[str, nn.Module]) -> int:
    """What one client's training step keeps for its backward pass, measured on a probe forward of the first
    client's first batch (the tensors autograd saves), with the RNG left as it was."""
    saved = [0]

    def pack(tensor: torch.Tensor):
        saved[0] += tensor.numel() * tensor.element_size()
        return tensor

    devices = [host.device.index or 0] if host.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        inputs = host.task.batch(setups[0].data, setups[0].batches[0].numpy(), host.device)
        with host.autocast():
            sums, _ = host.task.row_losses(host.model, inputs)
        del sums
    return saved[0]


def free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:  # what the kernel could hand out without swapping (page cache included): Linux's MemAvailable
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def fitting_size(host: ModelHost, setups: list[ClientSetup], modules: dict[str, nn.Module]) -> int:
    """How many of these clients fit in one cohort: the free memory's MEMORY_SHARE over a client's activations
    (probed) plus its stacked trainable tensors with their gradient and Adam's two moments."""
    per_client = activation_bytes(host, setups, modules)
    per_client += 4 * sum(v.numel() * v.element_size() for values in setups[0].tensors.values() for v in values.values())
    return max(1, int(MEMORY_SHARE * free_memory(host.device) // max(1, per_client)))


def prepare_client(host: ModelHost, task: ClientTask, state: State, client_state: Optional[State],
                   data: Batch) -> ClientSetup:
    """A client's load and begin_training exactly as its solo run does them (same streams, same order)."""
    return ClientSetup(**vars(host.prepare_client(task, state, client_state, data)))


def train_cohort(host: ModelHost, tasks: list[ClientTask], state: State, client_states: list[Optional[State]],
                 datas: list[Batch], announce: Callable[[str], None] = lambda line: None) -> list[ClientUpdate]:
    """Train ``tasks`` (clients of one round) as one cohort; returns their updates in the order given, equal to
    their one-by-one updates to float rounding (dropout aside). A cohort that cannot be batched trains one by one
    (``announce`` gets the reason, once per call); one that would not fit in memory is cut into fitting cohorts
    before anything runs."""
    if len(tasks) == 1:
        return [host.train_client(tasks[0], state, client_states[0], datas[0])]
    if any(task.steps is not None for task in tasks):  # a lockstep cohort trains everyone local_steps steps
        announce("clients cut short by system.deadline_s train one by one, not in cohorts")
        return [host.train_client(t, state, cs, d) for t, cs, d in zip(tasks, client_states, datas)]
    modules = cohort_modules(host)
    setups = []
    for task, client_state, data in zip(tasks, client_states, datas):
        setups.append(prepare_client(host, task, state, client_state, data))
        _snapshot(host, modules, setups[-1])
    reason = cohort_blocker(host, setups, modules)
    if reason is not None:
        announce(f"{host.method.name}: a cohort's clients train one by one ({reason})")
        return [host.train_client(t, state, cs, d) for t, cs, d in zip(tasks, client_states, datas)]
    fit = fitting_size(host, setups, modules)
    if fit < len(tasks):
        announce(f"a cohort of {len(tasks)} clients would not fit in memory; training cohorts of {fit}")
        updates = []
        for start in range(0, len(tasks), fit):
            part = slice(start, start + fit)
            updates += train_cohort(host, tasks[part], state, client_states[part], datas[part], announce)
        return updates
    return _train_stacked(host, setups, modules)


class FrozenSlices(StepHook):
    """A cohort step's hook: a client that does not train a stacked tensor (a head it did not select, a rank it does
    not hold) keeps its slice, whatever the optimizer does with a zero gradient (weight decay)."""

    def __init__(self, optimizer: torch.optim.Optimizer, stack: Stack):
        super().__init__(optimizer)
        self.stack = stack
        self.before: dict[int, torch.Tensor] = {}

    def before_step(self, rows: Optional[torch.Tensor]) -> None:
        for leaf in self.stack.trains:
            mask = self.stack.frozen.get(id(leaf))
            if mask is not None and leaf.grad is not None:
                leaf.grad[mask.to(leaf.device)] = 0
        self.before = {id(leaf): leaf.detach()[self.stack.frozen[id(leaf)]].clone() for leaf in self.stack.trains
                       if id(leaf) in self.stack.frozen}

    def after_step(self) -> None:
        with torch.no_grad():
            for leaf in self.stack.trains:
                if id(leaf) in self.before:
                    leaf[self.stack.frozen[id(leaf)]] = self.before[id(leaf)]


def _train_stacked(host: ModelHost, setups: list[ClientSetup], modules: dict[str, nn.Module]) -> list[ClientUpdate]:
    """The cohort's S steps, each the host's step on the sum of the clients' own losses, then each client's upload."""
    k = len(setups)
    stack = build_stack(setups, modules)
    hook = FrozenSlices(make_optimizer(host.config, stack.trains, host.method.lr), stack)
    penalties = [_Penalty(modules, lambda method=setup.method: method.local_penalty(host.model)) for setup in setups]
    torch.manual_seed(int(setups[0].task.generator(stream=2).initial_seed()))  # the cohort's dropout stream
    host.model.train()

    def cohort_loss(step: int) -> torch.Tensor:
        """The sum of the clients' own losses on their own rows of the step (each client's loss kept as its own)."""
        inputs, widths, per_client, real = cohort_batch(host, setups, step)
        total = 0.0
        with host.autocast():
            sums, counts = host.task.row_losses(host.model, inputs, widths)
            for c, setup in enumerate(setups):
                own = slice(c * per_client, c * per_client + real[c])
                loss = sums[own].sum() / counts[own].sum()
                penalty = _client_penalty(penalties[c], stack, c)
                if penalty is not None:
                    loss = loss + penalty
                setup.losses.append(loss.detach())
                total = total + loss
        return total

    with swapped_in(host.model, modules, stack, k):
        for step in range(host.config.federation.local_steps):
            host.step(hook.optimizer, lambda: cohort_loss(step), hook)
    return [_upload(host, setup, stack, modules, c) for c, setup in enumerate(setups)]


def _client_penalty(penalty: _Penalty, stack: Stack, client: int) -> Optional[torch.Tensor]:
    swaps = {f"held.{_safe(m)}.{name}": t[client] for m, values in stack.tensors.items() for name, t in values.items()}
    return functional_call(penalty, swaps, (), strict=False)


def _upload(host: ModelHost, setup: ClientSetup, stack: Stack, modules: dict[str, nn.Module],
            client: int) -> ClientUpdate:
    """Write the client's slices back into the layers, then finish the client as after a solo run."""
    with torch.no_grad():
        for module_name, values in stack.tensors.items():
            module = modules[module_name]
            own = dict(module.named_parameters())
            for name, tensor in values.items():
                (own[name] if name in own else module.get_buffer(name)).copy_(tensor[client])
    return host.finish_client(setup)
