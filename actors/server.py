"""The parameter server: holds the global state, aggregates through the method, evaluates; the driver checkpoints
what it holds.

It hosts one copy of the model (``ModelHost``) for three things the method protocol cannot do on tensors
alone: the agg_error and effective_rank diagnostics (they need the full per-layer ΔW, and for Ravan the
frozen bases, which it regenerates from the seed like every client) and evaluating the global model.

Evaluation runs on a thread of its own (the ``evaluation`` concurrency group), so that with
``federation.overlap_evaluation`` the driver can evaluate round r's model while the clients already train
round r+1: the round's aggregated state is kept (``held``) until the driver has its metrics and checkpoint,
and that overlapped evaluation uses a second copy of the model, so it never sees the diagnostics' loads.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Optional

import numpy as np
import ray
import torch

from actors.memory import return_freed_memory
from ravan_ray.adapters import effective_rank
from ravan_ray.client_eval import evaluate_clients
from ravan_ray.config import RunConfig, from_dict
from ravan_ray.methods import method_columns
from ravan_ray.methods.base import ClientUpdate, State, state_bytes
from ravan_ray.model_files import ModelFiles, with_model_here
from ravan_ray.models import FrozenWeights
from ravan_ray.results import validation_name
from ravan_ray.training import ModelHost


def is_finite_update(update: ClientUpdate) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in update.tensors.values() if t.is_floating_point())


@ray.remote(concurrency_groups={"evaluation": 1})
class ParameterServer:
    def __init__(self, config: dict[str, Any], task_info: dict[str, Any], test_data: dict[str, Any],
                 initial_state: Optional[State] = None, frozen: Optional[FrozenWeights] = None,
                 validation_data: Optional[dict[str, Any]] = None,
                 client_test_data: Optional[list[dict[str, Any]]] = None, model_files: Optional[ModelFiles] = None):
        self.config: RunConfig = with_model_here(from_dict(config), model_files)
        res = self.config.resources
        self.threads = max(1, int(round(max(res.server_cpus, res.cpus_per_client))))
        torch.set_num_threads(self.threads)
        self.host = ModelHost(self.config, task_info, frozen)
        # Evaluation alone (between rounds, or the last round's, with nothing left to overlap): the client
        # actors wait, so it takes their threads too (a function of the config, so the numbers do not depend
        # on the machine, short of one with fewer cores than the config reserves). Overlapped with training:
        # the server's own threads, on a second copy of the model, so that it never sees the diagnostics' loads.
        clients = self.config.federation.clients_per_round if res.actor_mode == "per_client" else self.config.pool_size
        self.alone_threads = max(1, min(int(round(clients * res.cpus_per_client + res.server_cpus)), os.cpu_count() or 1))
        overlap = self.config.federation.overlap_evaluation
        self.eval_host = ModelHost(self.config, task_info, frozen) if overlap else self.host
        self.method = self.host.method
        self.privacy = self.host.privacy  # differential privacy, if any: it acts on the uploads before the method
        self.test_data = test_data
        self.validation_data = validation_data
        self.client_test_data = client_test_data  # federation.client_eval: each client's held-out rows
        self.state: State = initial_state if initial_state is not None else self.host.initial_state()
        # round -> its aggregated state, until the driver has evaluated and checkpointed it (release()).
        # Methods return a new state from aggregate() and never change an old one, so keeping the object is enough.
        self.held: dict[int, State] = {}

    def broadcast(self, clients: list[int]) -> tuple[State, int]:
        """The state to send this round and the downlink bytes it costs for these sampled clients (a method may
        charge a client that missed rounds more than one that took part in the last)."""
        return self.state, self.method.downlink_bytes(self.state, clients)

    def aggregate(self, round_index: int, *updates: ClientUpdate) -> dict[str, Any]:
        """Aggregate this round's uploads; returns the round's server-side metrics. The new state is held as
        round ``round_index``'s until :meth:`release`."""
        started = time.perf_counter()
        accepted = [u for u in updates if is_finite_update(u)]
        rejected = [u.client_id for u in updates if not is_finite_update(u)]
        metrics: dict[str, Any] = {
            "uplink_bytes": sum(state_bytes(u.tensors) for u in updates),
            "rejected_uploads": len(rejected),
            **method_columns(),  # every registered method's own columns, at their values for another method's run
            "agg_error": math.nan,
            "effective_rank": math.nan,
        }
        if accepted:
            metrics.update(self.method.round_metrics(accepted))  # this method's own (Ravan's heads_trained)
            accepted, privacy_metrics = self.privacy.privatize(self.method, self.state, accepted, round_index)
            metrics.update(privacy_metrics)
            old_state = self.state
            self.state = self.method.aggregate(old_state, accepted, round_index)
            self.state.update(self.privacy.state_entries(old_state, privacy_metrics))
            metrics["agg_s"] = time.perf_counter() - started  # the aggregation itself, without diagnostics
            metrics.update(self._diagnostics(old_state, accepted))
        else:
            metrics["agg_s"] = time.perf_counter() - started
        self.held[round_index] = self.state
        return metrics

    def _diagnostics(self, old_state: State, updates: list[ClientUpdate]) -> dict[str, float]:
        """agg_error = sum over adapted layers of ||ΔW(aggregated) - sum_c w_c ΔW_c||_F, with the method's
        own client weights; effective_rank = mean over layers of the aggregated ΔW's effective rank."""
        aggregated = self.host.layer_deltas(self.state)
        weights = self.method.client_weights(updates)
        reference = {name: torch.zeros_like(delta) for name, delta in aggregated.items()}
        for update, weight in zip(updates, weights):
            view, client_state = self.method.client_view(old_state, update)
            if view is None:  # the method keeps part of the client's model private: no full update to compare
                reference = None
                break
            for name, delta in self.host.layer_deltas(view, client_state).items():
                reference[name] += float(weight) * delta
        error = math.nan if reference is None else float(
            sum(torch.linalg.matrix_norm(aggregated[n] - reference[n]) for n in aggregated))
        ranks = [effective_rank(delta) for delta in aggregated.values()]
        return {"agg_error": error, "effective_rank": float(np.mean(ranks)) if ranks else math.nan}

    @ray.method(concurrency_group="evaluation")
    def evaluate(self, round_index: int, alone: bool) -> dict[str, float]:
        """The test metrics of round ``round_index``'s global model (held since its aggregation); ``alone``:
        nothing else runs meanwhile, so every client thread is free for it."""
        started = time.perf_counter()
        state = self.held[round_index]
        # The thread count is per thread (OpenMP): set it on this one, for this evaluation.
        torch.set_num_threads(self.alone_threads if alone else self.threads)
        try:
            batch_size = self.config.federation.eval_batch_size
            metrics = self.eval_host.evaluate(state, self.test_data, batch_size)
            if self.validation_data is not None:  # the same evaluation, on the held-out training rows
                validation = self.eval_host.evaluate(state, self.validation_data, batch_size)
                metrics.update({validation_name(name): value for name, value in validation.items()})
            if self.client_test_data is not None:
                task = self.eval_host.task
                metrics.update(evaluate_clients(self.eval_host, state, self.client_test_data, batch_size,
                                                task.primary_metric, task.metrics[task.primary_metric]))
        finally:
            torch.set_num_threads(self.threads)
        return_freed_memory()
        return {**metrics, "eval_s": time.perf_counter() - started}

    def held_state(self, round_index: int) -> State:
        """Round ``round_index``'s aggregated state, for the driver to checkpoint: the driver writes every file of a
        run, on its own machine, wherever this actor runs."""
        return self.held[round_index]

    def release(self, round_index: int) -> None:
        """The driver is done with this round (and every earlier one): stop holding their states."""
        for done in [r for r in self.held if r <= round_index]:
            del self.held[done]

    def ping(self) -> bool:
        return True
