"""Client actors: each hosts the model once per process and trains whichever client it is handed.

``per_client`` mode gives every client its own long-lived actor holding its CPU / GPU share (the product
card's picture of a federation); ``pool`` mode has a fixed number of actors serve whichever clients are
sampled, so a federation of 1,000 clients does not need 1,000 processes. A client's behaviour depends
only on (global state, its own state, seed, round, client id), never on which actor runs it, so both
modes produce the same numbers.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Optional

import numpy as np
import ray
import torch

from actors.memory import return_freed_memory
from ravan_ray.cohort import cohorts, train_cohort
from ravan_ray.config import RunConfig, from_dict
from ravan_ray.methods.base import ClientTask, ClientUpdate, State
from ravan_ray.models import FrozenWeights
from ravan_ray.training import ModelHost


@ray.remote
class ClientActor:
    def __init__(self, config: dict[str, Any], task_info: dict[str, Any], train_data: dict[str, np.ndarray],
                 partitions: list[np.ndarray], frozen: Optional[FrozenWeights] = None):
        self.config: RunConfig = from_dict(config)
        torch.set_num_threads(max(1, int(round(self.config.resources.cpus_per_client))))
        self.host = ModelHost(self.config, task_info, frozen)
        # train_data arrives zero-copy from the object store, shared by every actor on the node.
        self.train_data = train_data
        self.partitions = partitions

    def train(self, task: ClientTask, state: State, client_state: Optional[State]):
        """Returns three objects: the update (for the server), the client's own state (kept by the
        driver for the client's next round) and a small status the driver reads."""
        started = time.time()
        rows = self.partitions[task.client_id]
        local = {key: values[rows] for key, values in self.train_data.items()}
        update = self.host.train_client(task, state, client_state, local)
        del local
        return_freed_memory()
        self._inject_faults(task, update)
        # The simulated server also sees the client state, for the agg_error diagnostic and evaluation
        # only; it is not uplink and no aggregation rule reads it.
        return update, update.client_state, self._status(update, started)

    def train_cohort(self, tasks: list[ClientTask], state: State, *client_states: Optional[State]) -> list:
        """Train several clients of one round as one cohort (ravan_ray/cohort.py). Returns three objects per
        client, in the order of ``tasks``: as :meth:`train` does for one."""
        started = time.time()
        notes: list[str] = []
        datas = [{key: values[self.partitions[task.client_id]] for key, values in self.train_data.items()}
                 for task in tasks]
        updates = train_cohort(self.host, tasks, state, list(client_states), datas, notes.append)
        del datas
        return_freed_memory()
        returned = []
        for task, update in zip(tasks, updates):
            self._inject_faults(task, update)
            returned += [update, update.client_state, self._status(update, started, cohort=len(tasks), notes=notes)]
        return returned

    @staticmethod
    def _status(update: ClientUpdate, started: float, **extra) -> dict:
        """The small status the driver reads of one client's task (its loss, where and when it ran)."""
        return {"train_loss": update.train_loss, "has_client_state": update.client_state is not None,
                "pid": os.getpid(), "gpu_ids": ray.get_runtime_context().get_accelerator_ids().get("GPU", []),
                "started": started, "finished": time.time(), **extra}

    def _inject_faults(self, task: ClientTask, update: ClientUpdate) -> None:
        faults = self.config.faults
        if task.client_id in faults.nan_upload_clients:
            for tensor in update.tensors.values():
                if tensor.is_floating_point():
                    tensor.fill_(float("nan"))
        time.sleep(faults.slow_clients.get(task.client_id, 0.0))

    def ping(self) -> bool:
        return True


class ClientFleet:
    """Hands client tasks to actors and recreates the actors that die."""

    def __init__(self, config: RunConfig, task_info: dict[str, Any], train_ref, partitions: list[np.ndarray],
                 cluster_cpus: Optional[float] = None, name_prefix: Optional[str] = None, frozen_ref=None):
        self.config = config
        # The pretrained weights in the object store (FrozenWeights), or None: each actor loads the checkpoint.
        self.frozen_ref = frozen_ref
        self.name_prefix = name_prefix  # actors are named PREFIX-client-SLOT, so operators can find them
        self.task_info = task_info
        self.train_ref = train_ref
        self.partitions_ref = ray.put(partitions)
        self.per_client = config.resources.actor_mode == "per_client"
        self.actors: dict[int, Any] = {}
        self.generation = 0  # part of the actor name, so a replacement never collides with a dying actor
        self.notes_shown: set[str] = set()
        self.size = config.federation.num_clients if self.per_client else self._pool_size(cluster_cpus)
        self.actor_cpus = self._actor_cpus(cluster_cpus)

    def _pool_size(self, cluster_cpus: Optional[float]) -> int:
        """resources.pool_size, or enough actors that no core idles while the round's clients train.

        With ``fit`` actors on the cores, m clients run in waves of ``fit`` and a last wave of ``m % fit``
        leaves cores idle (3 clients on 2 cores: the third trains alone). Single-threaded CPU actors can
        share the cores instead (the OS time-slices whole processes, and each keeps its one torch thread,
        so the numbers do not change), so the pool grows to the smallest size whose last wave still fills
        the cores: 3 actors for 3 clients on 2 cores. Multi-threaded or GPU actors keep one per share."""
        res = self.config.resources
        if res.pool_size is not None or cluster_cpus is None:
            return self.config.pool_size
        per_round = self.config.cohorts_per_round
        fit = self._fitting_actors(cluster_cpus)
        if fit >= per_round or not self._can_share_cores():
            return min(per_round, fit)
        return next(size for size in range(fit, per_round + 1) if per_round % size == 0 or per_round % size >= fit)

    def _can_share_cores(self) -> bool:
        res = self.config.resources
        return res.gpus_per_client == 0 and int(round(res.cpus_per_client)) <= 1

    def _actor_cpus(self, cluster_cpus: Optional[float]) -> float:
        """The CPUs each actor reserves: its share, or, in a pool grown to share the cores, the cores divided."""
        res = self.config.resources
        if self.per_client or res.pool_size is not None or cluster_cpus is None:
            return res.cpus_per_client
        return min(res.cpus_per_client, self._fitting_actors(cluster_cpus) * res.cpus_per_client / self.size)

    def _fitting_actors(self, cluster_cpus: float) -> int:
        """How many actors of ``cpus_per_client`` fit beside the server on the cluster's CPUs (at least one)."""
        res = self.config.resources
        return max(1, int((cluster_cpus - res.server_cpus) // res.cpus_per_client + 1e-9))

    def resources_needed(self) -> dict[str, float]:
        res = self.config.resources
        return {"CPU": self.size * self.actor_cpus, "GPU": self.size * res.gpus_per_client}

    def slot(self, client_id: int, position: int) -> int:
        return client_id if self.per_client else position % self.size

    def actor(self, slot: int):
        if slot not in self.actors:
            res = self.config.resources
            self.generation += 1
            name = f"{self.name_prefix}-client-{slot}-{self.generation}" if self.name_prefix else None
            self.actors[slot] = ClientActor.options(
                num_cpus=self.actor_cpus, num_gpus=res.gpus_per_client, name=name
            ).remote(self.config.to_dict(), self.task_info, self.train_ref, self.partitions_ref, self.frozen_ref)
        return self.actors[slot]

    def start(self, clients: list[int]) -> None:
        """Create the actors the first round's ``clients`` (in their round order) will run on, without waiting for
        them, so that they load their models while the parameter server loads its own: on a fresh run that
        overlaps the two start-ups, the larger part of a short run's time. In a pool these are its first
        min(m, pool) slots; per client, those clients' own actors (the others start when first sampled)."""
        for position, cohort in enumerate(cohorts(clients, self.cohort_size())):
            self.actor(self.slot(cohort[0], position))

    def wait_ready(self, placements: list[tuple[ClientTask, int]]) -> None:
        """Block until the actors for these (task, position) pairs have started (loaded their model).
        Errors are left for the tasks themselves to report."""
        slots = {self.slot(task.client_id, position) for task, position in placements}
        pings = [self.actor(slot).ping.remote() for slot in slots]
        ray.wait(pings, num_returns=len(pings))

    def submit(self, cohort: list[ClientTask], position: int, state_ref, client_state_refs: list) -> list[tuple]:
        """(update, client state, status) refs of each client of a cohort (one client: its own local training),
        run by the actor of the cohort's first client (per client) or of its position (pool)."""
        actor = self.actor(self.slot(cohort[0].client_id, position))
        if len(cohort) == 1:
            return [tuple(actor.train.options(num_returns=3).remote(cohort[0], state_ref, client_state_refs[0]))]
        refs = actor.train_cohort.options(num_returns=3 * len(cohort)).remote(cohort, state_ref, *client_state_refs)
        return [tuple(refs[i:i + 3]) for i in range(0, len(refs), 3)]

    def show_notes(self, notes) -> None:
        """Print each line an actor reported about its cohorts (trained one by one, cut to fit) once per run."""
        for line in notes:
            if line not in self.notes_shown:
                self.notes_shown.add(line)
                print(f"ravan-ray: {line}", file=sys.stderr, flush=True)

    def cohort_size(self) -> int:
        """resources.cohort_size, with ``auto`` resolved for the actors that serve a round (RunConfig.cohort_size)."""
        return self.config.cohort_size(None if self.per_client else self.size)

    def replace(self, client_id: int, position: int) -> None:
        """Forget (and kill) the actor behind a failed or straggling task; it is recreated on next use."""
        slot = self.slot(client_id, position)
        actor = self.actors.pop(slot, None)
        if actor is not None:
            ray.kill(actor, no_restart=True)

    def shutdown(self) -> None:
        for actor in self.actors.values():
            ray.kill(actor, no_restart=True)
        self.actors.clear()
