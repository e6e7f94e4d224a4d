"""One process's model: the pretrained network wrapped by the method, local training and evaluation.

:class:`ModelHost` is what a client actor and the parameter server hold; it knows nothing of Ray and
nothing of any particular method (it only calls the method protocol), so it is tested directly.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from torch import nn

from ravan_ray.config import RunConfig
from ravan_ray.methods import build_method
from ravan_ray.methods.base import EVAL_PREFIX, ClientTask, ClientUpdate, State
from ravan_ray.models import FrozenWeights, load_model, model_from_weights, model_skeleton

Batch = dict[str, np.ndarray]  # input_ids, attention_mask, labels


def pick_device() -> torch.device:
    # Ray sets CUDA_VISIBLE_DEVICES to the actor's GPU share; with none, torch sees no GPU and we use CPU.
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def make_optimizer(config: RunConfig, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    opt = config.optimizer
    if opt.name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=opt.weight_decay)
    if opt.name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=opt.weight_decay)
    return torch.optim.SGD(params, lr=lr, weight_decay=opt.weight_decay)


def effective_weight(module: nn.Module) -> torch.Tensor:
    """The weight the layer applies: base + adapter delta for an adapter, the weight for a plain linear."""
    if hasattr(module, "delta_weight"):
        return module.base.weight + module.delta_weight().to(module.base.weight.dtype)
    return module.weight


def preflight(config: RunConfig, num_labels: int) -> dict:
    """Wrap the model's weightless skeleton with the method, in the driver, before Ray starts: no target
    module, a rank that does not fit, an unknown model are then one clear error, not an actor's traceback.
    Returns the method's resolved settings (ranks) for config.yaml."""
    method = build_method(config)
    method.wrap_model(model_skeleton(config.model.name, num_labels))
    return {**method.resolved(), "lr": method.lr}


class ModelHost:
    """``frozen``: build the model around these shared arrays (read zero-copy from Ray's object store)
    instead of loading a private copy. Only the parameters the method may change get private copies."""

    def __init__(self, config: RunConfig, num_labels: int, frozen: Optional[FrozenWeights] = None):
        self.config = config
        self.method = build_method(config)
        if frozen is None:
            loaded = load_model(config.model.name, num_labels, config.seed)
        else:
            loaded = model_from_weights(config.model.name, num_labels, frozen)
        self.model = loaded.model
        self.model.requires_grad_(False)
        # Plain attributes (not submodules): the method finds its layers and the head through them.
        object.__setattr__(self.model, "ravan_head_parameters", loaded.head_parameters)
        object.__setattr__(self.model, "ravan_adapted", self.method.wrap_model(self.model))
        self.model.requires_grad_(False)
        params = dict(self.model.named_parameters())
        mutable = self.method.mutable_parameters(self.model)
        if frozen is not None:
            # The shared pages are every process's pretrained weights: never write them.
            for name in mutable:
                params[name].data = params[name].data.clone()
        self.device = pick_device()
        self.model.to(self.device)
        params = dict(self.model.named_parameters())
        self.pristine = {n: params[n].detach().clone() for n in mutable}

    @property
    def adapted(self) -> dict[str, nn.Module]:
        return self.model.ravan_adapted

    def initial_state(self) -> State:
        return {k: v.detach().cpu() for k, v in self.method.initial_state(self.model).items()}

    def load(self, state: State, client_state: Optional[State] = None) -> None:
        """Pretrained values for everything a client may have changed, then the given state on top."""
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in self.pristine.items():
                params[name].copy_(value)
        self.model.requires_grad_(False)
        self.method.load_state(self.model, state, client_state)

    # ----------------------------------------------------------------- client work
    def train_client(self, task: ClientTask, state: State, client_state: Optional[State], data: Batch) -> ClientUpdate:
        """Load the global state, let the method choose what trains, run S local steps, build the upload."""
        cfg = self.config
        # eval/ keys are the server's, for evaluating the global model; they are not downlink, so a client
        # never sees them (a method's load_state may rely on that to tell a client from the global model).
        self.load({k: v for k, v in state.items() if not k.startswith(EVAL_PREFIX)}, client_state)
        num_samples = len(data["labels"])
        torch.manual_seed(int(task.generator(stream=2).initial_seed()))  # dropout, identical in any actor
        batches = self._batch_order(num_samples, cfg.federation.local_steps, cfg.federation.batch_size,
                                    task.generator(stream=0))
        scoring_batch = torch.randint(num_samples, (min(cfg.federation.batch_size, num_samples),),
                                      generator=task.generator(stream=3))

        self.model.train()
        meta = self.method.begin_training(self.model, task, lambda: self._loss(data, scoring_batch))
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = make_optimizer(cfg, params, self.method.lr)
        losses = []
        for batch in batches:
            optimizer.zero_grad(set_to_none=True)
            loss = self._loss(data, batch)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        self.model.eval()
        tensors, new_client_state = self.method.upload(self.model, task, meta)
        return ClientUpdate(
            client_id=task.client_id,
            tensors={k: v.detach().cpu() for k, v in tensors.items()},
            num_samples=num_samples,
            train_loss=float(np.mean(losses)) if losses else math.nan,
            heads_trained=int(meta.get("heads_trained", 0)),
            meta=meta,
            client_state=None if new_client_state is None else {k: v.detach().cpu() for k, v in new_client_state.items()},
        )

    @staticmethod
    def _batch_order(num_samples: int, steps: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
        """S mini-batches walking through seeded permutations of the local data (epoch after epoch)."""
        batch_size = min(batch_size, num_samples)
        order = torch.cat([torch.randperm(num_samples, generator=generator)
                           for _ in range(math.ceil(steps * batch_size / num_samples))])
        return [order[i * batch_size:(i + 1) * batch_size] for i in range(steps)]

    def _loss(self, data: Batch, rows: torch.Tensor) -> torch.Tensor:
        return self._forward(data, rows.numpy(), with_labels=True).loss

    def _forward(self, data: Batch, rows: np.ndarray, with_labels: bool):
        mask = torch.from_numpy(np.ascontiguousarray(data["attention_mask"][rows]))
        length = max(1, int(mask.sum(dim=1).max()))  # drop all-padding columns: same result, less work
        inputs = {
            "input_ids": torch.from_numpy(np.ascontiguousarray(data["input_ids"][rows][:, :length])).to(self.device),
            "attention_mask": mask[:, :length].to(self.device),
        }
        if with_labels:
            inputs["labels"] = torch.from_numpy(np.ascontiguousarray(data["labels"][rows])).to(self.device)
        return self.model(**inputs)

    # ----------------------------------------------------------------- global model
    @torch.no_grad()
    def evaluate(self, state: State, data: Batch, batch_size: int) -> dict[str, float]:
        self.load(state)
        self.model.eval()
        correct, loss_sum, total = 0, 0.0, len(data["labels"])
        for start in range(0, total, batch_size):
            rows = np.arange(start, min(total, start + batch_size))
            out = self._forward(data, rows, with_labels=True)
            labels = torch.from_numpy(data["labels"][rows]).to(self.device)
            correct += int((out.logits.argmax(-1) == labels).sum())
            loss_sum += float(out.loss) * len(rows)
        return {"test_accuracy": correct / total, "test_loss": loss_sum / total}

    @torch.no_grad()
    def layer_deltas(self, state: State, client_state: Optional[State] = None) -> dict[str, torch.Tensor]:
        """ΔW = (weight the layer applies) - (pretrained weight), per adapted layer, under ``state``."""
        self.load(state, client_state)
        deltas = {}
        for name, module in self.adapted.items():
            base_name = f"{name}.base.weight" if hasattr(module, "base") else f"{name}.weight"
            pretrained = self.pristine.get(base_name)
            if pretrained is None:
                pretrained = dict(self.model.named_parameters())[base_name]
            deltas[name] = (effective_weight(module) - pretrained).detach().to(torch.float64).cpu()
        return deltas
