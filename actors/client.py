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
from ravan_ray.cluster import (ActorPlan, ClusterError, Deadline, Resources, SetupError, copies_that_fit, live_nodes,
                               place_first, plan_actors, remote_error_line, wait_for)
from ravan_ray.cohort import cohorts, train_cohort
from ravan_ray.config import RunConfig, from_dict
from ravan_ray.methods.base import ClientTask, ClientUpdate, State
from ravan_ray.model_files import ModelFiles, with_model_here
from ravan_ray.models import FrozenWeights
from ravan_ray.training import ModelHost


@ray.remote
class ClientActor:
    def __init__(self, config: dict[str, Any], task_info: dict[str, Any], train_data: dict[str, np.ndarray],
                 partitions: list[np.ndarray], frozen: Optional[FrozenWeights] = None,
                 model_files: Optional[ModelFiles] = None):
        self.config: RunConfig = with_model_here(from_dict(config), model_files)
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


# How often a wait for actors to start checks that the live nodes still hold them (a node's loss shows there).
PLACEMENT_CHECK_S = 5.0


class ClientFleet:
    """Hands client tasks to actors, as many as the cluster's nodes hold, and replaces the actors that die where
    they still fit.

    Pool mode: interchangeable actors in ``slots``; the round's k-th cohort runs on ``slots[k % len(slots)]``. An
    actor that cannot be placed in time, or is lost with its node and cannot be replaced on the nodes left, leaves
    the pool, and the run goes on with the others (one line says so). Per-client mode: client c's own actor (slot
    c); all of them must fit at once, so a cluster that can no longer hold them ends the run (it can resume in pool
    mode). Which clients train together (the cohort size) is fixed when the run starts, so the numbers never depend
    on how many actors serve them."""

    def __init__(self, config: RunConfig, task_info: dict[str, Any], train_ref, partitions: list[np.ndarray],
                 nodes: Optional[list[Resources]] = None, name_prefix: Optional[str] = None, frozen_ref=None,
                 model_files_ref=None):
        self.config = config
        # The pretrained weights in the object store (FrozenWeights), or None: each actor loads the checkpoint.
        self.frozen_ref = frozen_ref
        self.model_files_ref = model_files_ref  # a local model directory's files (ModelFiles) for other nodes, or None
        self.name_prefix = name_prefix  # actors are named PREFIX-client-SLOT-GENERATION, so operators can find them
        self.task_info = task_info
        self.train_ref = train_ref
        self.partitions_ref = ray.put(partitions)
        self.per_client = config.resources.actor_mode == "per_client"
        res = config.resources
        self.server_bundle = {"CPU": res.server_cpus, "GPU": res.server_gpus}
        # ``nodes`` None: a Tune trial, whose placement group was sized for exactly config.pool_size actors.
        self.sized_by_trial = nodes is None
        self.notes_shown: set[str] = set()
        self.plan = self._plan(nodes)
        self.slots = [] if self.per_client else list(range(self.plan.size))
        self.actors: dict[int, Any] = {}
        self.generation = 0  # part of the actor name, so a replacement never collides with a dying actor
        # resources.cohort_size with ``auto`` resolved for the actors that serve a round
        self.cohort = config.cohort_size(None if self.per_client else self.plan.size)

    @property
    def size(self) -> int:
        """The actors the fleet runs at most: one per client, or the pool's."""
        return self.config.federation.num_clients if self.per_client else len(self.slots)

    def _plan(self, nodes: Optional[list[Resources]]) -> ActorPlan:
        res, fed = self.config.resources, self.config.federation
        wanted = fed.num_clients if self.per_client else self.config.pool_size
        if nodes is None:
            return ActorPlan(wanted, res.cpus_per_client, res.gpus_per_client)
        can_share_cores = (not self.per_client and res.pool_size is None and res.gpus_per_client == 0
                           and int(round(res.cpus_per_client)) <= 1)
        plan = plan_actors(nodes, res.cpus_per_client, res.gpus_per_client, wanted, can_share_cores,
                           self.server_bundle)
        if plan.size < wanted:
            bundle = f"{res.cpus_per_client:g} CPU" + (f", {res.gpus_per_client:g} GPU" if res.gpus_per_client else "")
            if self.per_client:
                raise ClusterError(f"per_client mode needs {wanted} client actors of {bundle} at once but the "
                                   f"cluster's nodes hold {plan.size}; use resources.actor_mode=pool or lower "
                                   f"resources.cpus_per_client / gpus_per_client")
            if res.pool_size is not None:
                self.note(f"the cluster's nodes hold {plan.size} client actors of {bundle}, not resources.pool_size="
                          f"{res.pool_size}: {plan.size} serve the round's {fed.clients_per_round} clients")
        return plan

    def cohort_size(self) -> int:
        return self.cohort

    def slot(self, client_id: int, position: int) -> int:
        return client_id if self.per_client else self.slots[position % len(self.slots)]

    def actor(self, slot: int):
        if slot not in self.actors:
            self.generation += 1
            name = f"{self.name_prefix}-client-{slot}-{self.generation}" if self.name_prefix else None
            self.actors[slot] = ClientActor.options(
                num_cpus=self.plan.cpus, num_gpus=self.plan.gpus, name=name
            ).remote(self.config.to_dict(), self.task_info, self.train_ref, self.partitions_ref, self.frozen_ref,
                     self.model_files_ref)
        return self.actors[slot]

    def start(self, clients: list[int]) -> None:
        """Create the actors the first round's ``clients`` (in their round order) will run on, without waiting for
        them, so that they load their models while the parameter server loads its own: on a fresh run that
        overlaps the two start-ups, the larger part of a short run's time. In a pool these are its first
        min(m, pool) slots; per client, those clients' own actors (the others start when first sampled)."""
        for position, cohort in enumerate(cohorts(clients, self.cohort)):
            self.actor(self.slot(cohort[0], position))

    def ready(self, cohorts_at: dict[int, list[ClientTask]], deadline: Deadline) -> set[int]:
        """Start (where missing) the actors that will run these cohorts (position -> its tasks) and wait for them
        until ``deadline``. Returns the positions left without an actor: per client, those whose own actor could
        not be placed (they sit the round out); in a pool none, as actors that cannot be placed leave the pool and
        their cohorts move to the others. Raises ClusterError when no actor is left, and SetupError when an actor's
        constructor failed (a model that does not load on that node, ...)."""
        unplaced: set[int] = set()
        while True:
            waiting = {position: self.slot(cohort[0].client_id, position)
                       for position, cohort in cohorts_at.items() if position not in unplaced}
            slots = set(waiting.values())
            cannot = self._create_where_room(slots)
            if cannot and not self.per_client:
                self._leave_pool(cannot, f"{len(cannot)} client actor(s) lost with their node cannot be replaced on "
                                         f"the nodes left")
                continue
            unplaced |= {position for position, slot in waiting.items() if slot in cannot}
            pings = {self.actors[slot].ping.remote(): slot for slot in slots - cannot}
            done, late, stranded = self._wait_while_placeable(pings, deadline)
            if stranded:
                why = f"{len(stranded)} client actor(s) lost with their node cannot be replaced on the nodes left"
                if self.per_client:
                    for slot in stranded:
                        self.forget(slot)
                    unplaced |= {position for position, slot in waiting.items() if slot in stranded}
                    self.note(f"{why}; their clients sit the round out")
                else:
                    self._leave_pool(stranded, why)
            lost = {pings[ref] for ref in done if not _started(ref)}
            late_slots = {pings[ref] for ref in late}
            for slot in lost | late_slots:
                self.forget(slot)
            if late_slots:
                why = f"{len(late_slots)} client actor(s) did not start within {deadline.seconds:g} s"
                if self.per_client:
                    unplaced |= {position for position, slot in waiting.items() if slot in late_slots}
                    self.note(f"{why}; their clients sit the round out")
                else:
                    self._leave_pool(late_slots, why)
            if not lost and (self.per_client or not late_slots):
                return unplaced

    def _wait_while_placeable(self, pings: dict, deadline: Deadline) -> tuple[list, list, set[int]]:
        """Wait for the actors behind ``pings`` (ping ref -> slot) until ``deadline``, every few seconds checking
        that the live nodes still hold the fleet. A node that went down is still counted alive for some seconds
        (until Ray's health checks give up on it), so a replacement created then waits for a node that will never
        come back: when the nodes hold fewer actors than the fleet has, the actors not started yet are given up.
        Returns (pings answered, pings late, slots given up)."""
        done, pending, stranded = [], list(pings), set()
        while pending:
            left = deadline.left()
            now, pending = wait_for(pending, Deadline(PLACEMENT_CHECK_S if left is None else
                                                      min(PLACEMENT_CHECK_S, left)))
            done += now
            if not pending or deadline.passed():
                break
            if self.sized_by_trial:  # a Tune trial's placement group holds its actors' share
                continue
            excess = len(self.actors) - len(stranded) - (self._room_on_live_nodes() or 0)
            if excess > 0:
                stranded |= {pings[ref] for ref in pending[-excess:]}
                pending = [ref for ref in pending if pings[ref] not in stranded]
        return done, pending, stranded

    def _room_on_live_nodes(self) -> Optional[int]:
        """How many of the fleet's actors the live nodes hold beside the parameter server (placed first), or None
        when no live node holds the server."""
        nodes = place_first(live_nodes(), self.server_bundle)
        if nodes is None:
            return None
        return sum(copies_that_fit(node, {"CPU": self.plan.cpus, "GPU": self.plan.gpus}) for node in nodes)

    def _create_where_room(self, slots: set[int]) -> set[int]:
        """Create the missing actors among ``slots`` while the live nodes have room for them (counted against the
        nodes' totals, the fleet's own live actors included); returns the slots left without one."""
        missing = sorted(slot for slot in slots if slot not in self.actors)
        if not missing:
            return set()
        room = len(missing)
        if not self.sized_by_trial:
            room = (self._room_on_live_nodes() or 0) - len(self.actors)
        for slot in missing[:max(0, room)]:
            self.actor(slot)
        return set(missing[max(0, room):])

    def make_room_for_server(self, deadline: Deadline) -> None:
        """Before a lost parameter server starts again: forget the actors that died with it, and keep no more than
        the live nodes hold beside the server, so that it fits (the pool gives up actors for it; per client, the
        run cannot go on)."""
        if self.sized_by_trial or not self.actors:
            return
        pings = {self.actors[slot].ping.remote(): slot for slot in self.actors}
        done, _ = wait_for(list(pings), deadline)
        for ref in done:
            if not _started(ref):
                self.forget(pings[ref])
        room = self._room_on_live_nodes()
        if room is None or len(self.actors) <= room:
            return  # the server fits, or fits nowhere whatever the fleet gives up (its start says so)
        if self.per_client:
            raise ClusterError(f"the nodes left cannot hold the parameter server beside an actor per client; use "
                               f"resources.actor_mode=pool")
        excess = len(self.actors) - room
        self._leave_pool(set(sorted(self.actors)[-excess:]),
                         f"{excess} client actor(s) gave way to the parameter server on the nodes left")

    def _leave_pool(self, slots: set[int], why: str) -> None:
        self.slots = [slot for slot in self.slots if slot not in slots]
        for slot in slots:
            self.forget(slot)
        if not self.slots:
            raise ClusterError(f"no client actor is left: {why}")
        self.note(f"{why}; the run goes on with {len(self.slots)}")

    def submit(self, cohort: list[ClientTask], position: int, state_ref, client_state_refs: list) -> list[tuple]:
        """(update, client state, status) refs of each client of a cohort (one client: its own local training),
        run by the actor of the cohort's first client (per client) or of its position (pool)."""
        actor = self.actor(self.slot(cohort[0].client_id, position))
        if len(cohort) == 1:
            return [tuple(actor.train.options(num_returns=3).remote(cohort[0], state_ref, client_state_refs[0]))]
        refs = actor.train_cohort.options(num_returns=3 * len(cohort)).remote(cohort, state_ref, *client_state_refs)
        return [tuple(refs[i:i + 3]) for i in range(0, len(refs), 3)]

    def note(self, line: str) -> None:
        """Print a line about the fleet (or one an actor reported about its cohorts) once per run."""
        if line not in self.notes_shown:
            self.notes_shown.add(line)
            print(f"ravan-ray: {line}", file=sys.stderr, flush=True)

    def show_notes(self, notes) -> None:
        for line in notes:
            self.note(line)

    def replace(self, client_id: int, position: int) -> None:
        """Forget (and kill) the actor behind a failed or straggling task; it is recreated on next use."""
        self.forget(self.slot(client_id, position))

    def forget(self, slot: int) -> None:
        actor = self.actors.pop(slot, None)
        if actor is not None:
            ray.kill(actor, no_restart=True)

    def shutdown(self) -> None:
        for actor in self.actors.values():
            ray.kill(actor, no_restart=True)
        self.actors.clear()


def _started(ping_ref) -> bool:
    """Whether an actor answered its ping. An actor whose constructor raised is a setup error for the user; one
    that died otherwise (its node lost while it started) is False, to be replaced."""
    try:
        ray.get(ping_ref)
        return True
    except ray.exceptions.RayActorError as error:
        if getattr(error, "_actor_init_failed", False):
            raise SetupError(f"a client actor could not start{remote_error_line(error, where=True)}") from None
        return False
