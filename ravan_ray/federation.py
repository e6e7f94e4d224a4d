"""The federated loop (the driver): one function, :func:`run_federation`, to read top to bottom.

    driver: sample m clients (seeded by (seed, round))
        -> server.broadcast(): the global state, put once in the object store, its ref sent to each client
    client actors: load state -> select heads / rank -> S local steps -> upload
    server: aggregate (sorted by client id, so arrival order never matters) -> diagnostics
    driver: every eval_every rounds the server evaluates the global model (on its own thread, while the
            clients already train the next round: overlap_evaluation) -> one metrics.csv row per round,
            written in order once the round's evaluation is in
            every checkpoint_every rounds the server writes a checkpoint (safetensors + JSON) of a round,
            holding the metrics.csv rows up to it, so a resumed run never lacks a row

Nothing here knows which method runs. All randomness derives from (seed, round, client id), so a run
resumed from a checkpoint, or run with another actor mode, produces the same numbers.
"""

from __future__ import annotations

import logging
import sys
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pandas as pd
import ray

from actors import ClientFleet, ParameterServer
from ravan_ray.budgets import client_levels
from ravan_ray.client_eval import client_columns, hold_out
from ravan_ray.checkpoints import (CheckpointError, checkpoint_at, discard_checkpoints_after, latest_checkpoint,
                                   list_checkpoints, load_checkpoint, save_checkpoint)
from ravan_ray.cluster import (ClusterError, Deadline, SetupError, Unresponsive, describe, get_within, live_nodes,
                               patient_deadline, ray_runtime, remote_error_line, wait_for)
from ravan_ray.cohort import cohorts
from ravan_ray.config import RunConfig, save_config
from ravan_ray.data import label_histogram, partition
from ravan_ray.data.partition import LABEL_KINDS, LEFT_OUT
from ravan_ray.methods import build_method
from ravan_ray.methods.base import ClientTask
from ravan_ray.model_files import read_model_files
from ravan_ray.models import export_weights
from ravan_ray.privacy import PrivacyBudget, build_mechanism
from ravan_ray.tasks import build_task, task_class
from ravan_ray.tasks.base import EXAMPLE_KEY
from ravan_ray.training import preflight
from ravan_ray.results import RunLog, run_lock, with_validation
from ravan_ray.system import SystemModel
from ravan_ray.trackers import Trackers

log = logging.getLogger(__name__)
RoundCallback = Callable[[dict[str, Any], Optional[str]], None]


@dataclass
class FederatedData:
    train: dict[str, np.ndarray]  # the task's row-aligned training arrays
    test: dict[str, Any]
    validation: Optional[dict[str, Any]]  # held out before partitioning, prepared as test is; None without one
    partitions: list[np.ndarray]  # the training rows of each client
    task_info: dict[str, Any]  # what every process needs to build the task's model
    histogram: pd.DataFrame
    partition_kind: str  # the split used: the configured one, or iid where the task has no labels to split on
    # federation.client_eval: each client's held-out test rows (of ``train``, not in ``partitions``); else None
    client_test: Optional[list[np.ndarray]] = None


def prepare_data(config: RunConfig) -> FederatedData:
    """Load and prepare the task's data once in the driver (tokenise, decode images), and partition it
    over clients: by example, so the rows one example makes (a long QA context's windows) stay together."""
    d = config.data
    task = build_task(config)
    task.check_model()
    data = task.prepare()
    kind, labels = d.partition.kind, data.partition_labels
    if labels is None:
        labels = np.zeros(data.num_examples, dtype=np.int64)
        if kind in LABEL_KINDS:
            print(f"ravan-ray: {config.model.task} has no class labels for the {kind} split; set "
                  f"data.partition.label_field to a column to split on (e.g. a category). Splitting iid.",
                  file=sys.stderr)
            kind = "iid"
    p = d.partition
    parts = partition(labels, config.federation.num_clients, kind, p.alpha, p.min_size, config.seed,
                      classes_per_client=p.classes_per_client, shards_per_client=p.shards_per_client,
                      column=f"column '{p.label_field}'" if p.label_field else "the class label")
    if sum(map(len, parts)) < len(labels):
        print(f"ravan-ray: the {kind} split gives {sum(map(len, parts)):,} of the {len(labels):,} training examples "
              f"to clients ({LEFT_OUT[kind]} are left out)", file=sys.stderr)
    histogram = label_histogram(labels, parts, max(1, len(data.partition_names)))
    if data.partition_labels is None:
        histogram.columns = ["samples"]
    if data.train_examples is not None:  # example ids -> the rows those examples made
        owner = np.full(data.num_examples, -1, dtype=np.int64)  # -1: an example the split gave no client
        for client, examples in enumerate(parts):
            owner[examples] = client
        row_owner = owner[data.train_examples]
        kept = np.flatnonzero(row_owner >= 0)
        by_client = kept[np.argsort(row_owner[kept], kind="stable")]  # stable: each client's rows stay ascending
        parts = np.split(by_client, np.cumsum(np.bincount(row_owner[kept], minlength=len(parts)))[:-1])
        data.train[EXAMPLE_KEY] = data.train_examples  # DP-SGD samples and clips examples, not rows
    client_test = None
    if config.federation.client_eval:
        parts, client_test = hold_out(parts, d.client_test_fraction, config.seed)
    return FederatedData(data.train, data.test, data.validation, parts, data.info, histogram, kind, client_test)


def client_examples(data: FederatedData) -> list[int]:
    """Each client's number of training examples (its rows, where an example makes one): DP-SGD's privacy unit."""
    if EXAMPLE_KEY not in data.train:
        return [len(rows) for rows in data.partitions]
    return [len(np.unique(data.train[EXAMPLE_KEY][rows])) for rows in data.partitions]


def sample_clients(seed: int, round_index: int, num_clients: int, per_round: int, poisson: bool = False) -> list[int]:
    """The clients of a round, drawn from (seed, round): exactly ``per_round`` without replacement, or with
    ``poisson`` each client on its own with probability per_round / num_clients (none, or more than per_round, may
    come)."""
    rng = np.random.default_rng([seed, round_index, 0x5A4D])
    if poisson:
        return [int(c) for c in np.flatnonzero(rng.random(num_clients) < per_round / num_clients)]
    return sorted(int(c) for c in rng.choice(num_clients, size=per_round, replace=False))


def round_clients(config: RunConfig, round_index: int) -> list[int]:
    """The clients of round ``round_index`` by the run's sampler (``privacy.client_sampling``)."""
    fed = config.federation
    return sample_clients(config.seed, round_index, fed.num_clients, fed.clients_per_round,
                          poisson=config.privacy.sampler == "poisson")


def client_rounds(config: RunConfig) -> list[list[int]]:
    """The rounds each client is sampled in (the seeded draw of :func:`round_clients`), for the accountant."""
    rounds: list[list[int]] = [[] for _ in range(config.federation.num_clients)]
    for round_index in range(1, config.federation.rounds + 1):
        for client in round_clients(config, round_index):
            rounds[client].append(round_index)
    return rounds


def with_noise_multiplier(config: RunConfig, budget: Optional[PrivacyBudget]) -> RunConfig:
    """The config the actors run: with ``privacy.target_epsilon`` replaced by the noise multiplier computed for it
    (config.yaml keeps the target; a resumed run computes the same multiplier again)."""
    if budget is None or config.privacy.target_epsilon is None:
        return config
    resolved = config.model_copy(deep=True)
    resolved.privacy = resolved.privacy.model_copy(update={"target_epsilon": None,
                                                            "noise_multiplier": budget.noise_multiplier})
    return resolved


def run_federation(config: RunConfig, run_dir: str | Path, resume: bool = False,
                   on_round: Optional[RoundCallback] = None, from_round: Optional[int] = None,
                   track: bool = True) -> dict[str, Any]:
    """Run the federation described by ``config`` into ``run_dir`` (or continue it with ``resume``: from the
    last checkpoint, or from round ``from_round``'s, whose later checkpoints are then discarded). One run at a
    time writes to a run directory (:func:`ravan_ray.results.run_lock`). ``track``: log to the experiment
    trackers of ``output.trackers`` (a sweep's trials do not: Tune's logger callbacks track them)."""
    run_dir = Path(run_dir)
    trackers = Trackers(config, run_dir, enabled=track)  # a tracker that is not installed is refused here
    with run_lock(run_dir):
        return _run_federation(config, run_dir, resume, on_round, from_round, trackers)


def _run_federation(config: RunConfig, run_dir: Path, resume: bool, on_round: Optional[RoundCallback],
                    from_round: Optional[int], trackers: Trackers) -> dict[str, Any]:
    fed = config.federation
    data = prepare_data(config)
    resolved = preflight(config, data.task_info)
    budget = build_mechanism(config).plan_budget(client_examples(data), client_rounds(config))
    if budget is not None:
        resolved["privacy"] = {"noise_multiplier": budget.noise_multiplier, "delta": budget.delta,
                               "epsilon_after_all_rounds": budget.epsilon(fed.rounds)}
    metric_columns = task_class(config.model.task).metrics
    if data.validation is not None:
        metric_columns = with_validation(metric_columns)
    if fed.client_eval:  # the primary metric's per-client statistics, in its direction
        primary = task_class(config.model.task).primary_metric
        metric_columns = {**metric_columns, **dict.fromkeys(client_columns(primary), metric_columns[primary])}
    system = SystemModel(config, [len(rows) for rows in data.partitions])  # traces are read (and checked) here
    levels = client_levels(fed.num_clients, config.compute.distribution, config.compute.levels, config.seed)
    record_setup(config, run_dir, data, resolved, levels)
    config = with_noise_multiplier(config, budget)  # what the actors run: the noise multiplier, given or calibrated
    first_round, state, client_states, rows = resume_point(run_dir, from_round) if resume else (1, None, {}, None)
    if from_round is not None:
        discard_checkpoints_after(run_dir, from_round)
    run_log = RunLog(config, run_dir, metric_columns, first_round, rows, trackers)
    if first_round > 1:
        run_log.write_files()  # the restored rows, whatever happened to metrics.csv since (a finished run plays none)

    with ray_runtime(config.resources):
        task_info = data.task_info
        actor_prefix = f"ravan-{uuid.uuid4().hex[:8]}"
        in_trial = ray.util.get_current_placement_group() is not None
        frozen_ref = publish_frozen_weights(config, task_info)
        model_files_ref = publish_model_files(config)
        fleet = ClientFleet(config, task_info, ray.put(data.train), data.partitions,
                            nodes=None if in_trial else live_nodes(), name_prefix=actor_prefix, frozen_ref=frozen_ref,
                            model_files_ref=model_files_ref)
        if first_round <= fed.rounds:
            fleet.start(round_clients(config, first_round))
        # A server that cannot start raises here; the fleet's actors (not detached) end with their handles.
        server = RestartableServer(config, data, state, f"{actor_prefix}-server", frozen_ref, model_files_ref)
        client_state_refs = {cid: ray.put(cs) for cid, cs in client_states.items()}
        run_log.start()
        # Played rounds whose rows wait for their evaluation (at most the last one or two with overlap).
        unfinished: deque[PlayedRound] = deque()
        round_index = first_round
        try:
            while round_index <= fed.rounds or unfinished:
                try:
                    if round_index <= fed.rounds:
                        unfinished.append(play_round(config, round_index, server.actor, fleet, levels,
                                                     client_state_refs, system))
                        round_index += 1
                    # Finish rounds in order; wait for one only when no round is left to overlap it with.
                    while unfinished and (unfinished[0].evaluated() or round_index > fed.rounds
                                          or not fed.overlap_evaluation):
                        played = unfinished.popleft()
                        if played.evaluation is not None:
                            played.row.update(get_within(played.evaluation, patient_deadline(fed.round_timeout_s),
                                                         "the parameter server's evaluation"))
                        if budget is not None:
                            played.row["epsilon"] = budget.epsilon(played.row["round"])
                        run_log.record(played.row, played.outcome.log, server.restarts)
                        checkpoint_path = finish_round(config, run_dir, played, server.actor, run_log.rows)
                        run_log.write()
                        if on_round is not None:
                            on_round(played.row, checkpoint_path)
                except SERVER_LOST as error:  # the parameter server died or hangs: restart it from its checkpoint
                    if server.restarts == fed.max_server_restarts:
                        raise
                    log.warning("parameter server lost in round %d (%s); restoring from the last checkpoint",
                                round_index, type(error).__name__)
                    unfinished.clear()
                    fleet.make_room_for_server(patient_deadline(fed.round_timeout_s))
                    round_index, client_state_refs = server.restart(run_dir)
                    run_log.rewind(round_index)
            run_log.finish()
        except ClusterError as error:
            kept = run_log.rows[-1]["round"] if run_log.rows else 0
            raise ClusterError(f"{error}. The run stopped after round {kept}; 'ravan-ray resume {run_dir}' continues "
                               f"it from its last checkpoint (--set resources.KEY=VALUE to run it differently)"
                               ) from None
        finally:
            run_log.close()
            fleet.shutdown()
            server.kill()
    return run_log.summary()


# What ends a parameter server, or the objects of a round it was aggregating: the run restores it from the last
# checkpoint and plays the rounds since again (the same numbers: a round is a function of state, seed and round).
# OutOfMemoryError: Ray's memory monitor killed its process to save the node.
SERVER_LOST = (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError, ray.exceptions.OutOfMemoryError,
               Unresponsive)


def record_setup(config: RunConfig, run_dir: Path, data: FederatedData, resolved: dict[str, Any],
                 levels: np.ndarray) -> None:
    """What the run is, written before it starts: config.yaml (with the derived settings under ``resolved``),
    each client's label histogram and compute budget."""
    fed = config.federation
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "config.yaml", extra={"method": resolved, "task": data.task_info,
                                                         "partition": data.partition_kind})
    data.histogram.to_csv(run_dir / "label_histogram.csv")
    from ravan_ray.report.plots import plot_partition  # here: matplotlib only when a run starts

    plot_partition(class_histogram(data), run_dir / "partition.png",
                   f"{data.partition_kind} split of {sum(map(len, data.partitions)):,} training rows over "
                   f"{fed.num_clients} clients")
    pd.DataFrame({"client": range(fed.num_clients), "level": levels,
                  **build_method(config).budget_columns(levels),  # the method's own (Ravan's heads per client)
                  "samples": [len(p) for p in data.partitions]}).to_csv(run_dir / "client_budgets.csv", index=False)


def class_histogram(data: FederatedData) -> pd.DataFrame:
    """Each client's training rows per class, for partition.png: the task's classes where its training arrays hold
    them (1-D "labels" named by the task's label_names), even when the split was over another column (a natural id);
    else the histogram of what the split was over."""
    labels, names = data.train.get("labels"), data.task_info.get("label_names")
    if labels is None or names is None or np.ndim(labels) != 1:
        return data.histogram
    histogram = label_histogram(labels, data.partitions, len(names))
    histogram.columns = list(names)
    return histogram


@dataclass
class PlayedRound:
    """A round whose clients trained and whose uploads the server aggregated; its row still lacks the
    evaluation (``evaluation``: the pending ref, None in rounds without one) and it has no checkpoint yet."""
    row: dict[str, Any]
    outcome: "RoundOutcome"
    evaluation: Any
    client_state_refs: dict[int, Any]  # every client's state after this round

    def evaluated(self) -> bool:
        return self.evaluation is None or bool(ray.wait([self.evaluation], timeout=0)[0])


def play_round(config: RunConfig, round_index: int, server, fleet: ClientFleet, levels: np.ndarray,
               client_state_refs: dict[int, Any], system: SystemModel) -> PlayedRound:
    """One round: broadcast, local training, aggregation; starts the evaluation (without waiting for it).
    Updates ``client_state_refs``. ``system``: the simulated devices (ravan_ray/system.py), which drop offline
    and late clients and cut short the late ones under system.late=partial; without system settings, none."""
    fed = config.federation
    started = time.perf_counter()
    sampled = round_clients(config, round_index)
    online = system.online(round_index, sampled)
    state_ref, downlink_ref = server.broadcast.options(num_returns=2).remote(online)
    # also: the server is alive before clients depend on it
    downlink_bytes = get_within(downlink_ref, patient_deadline(fed.round_timeout_s), "the parameter server")
    plan = system.plan(sampled, online, downlink_bytes)
    tasks = [ClientTask(cid, round_index, float(levels[cid]), config.seed, steps) for cid, steps in plan.training]
    outcome = run_clients(fleet, tasks, state_ref, client_state_refs, fed)
    plan.annotate(outcome.log, round_index)
    server_metrics = get_within(server.aggregate.remote(round_index, *outcome.update_refs),
                                patient_deadline(fed.round_timeout_s), "the parameter server")
    row = {"round": round_index, "clients": len(outcome.update_refs),
           "train_loss": float(np.mean(outcome.train_losses)) if outcome.train_losses else np.nan,
           "downlink_bytes": downlink_bytes, "failed_clients": outcome.failed,
           "dropped_clients": outcome.dropped + plan.dropped, **plan.columns(), **server_metrics,
           "round_s": time.perf_counter() - started}  # training and aggregation; evaluation is not in it
    evaluation = None
    if round_index % fed.eval_every == 0 or round_index == fed.rounds:
        # The last round's evaluation has no next round to overlap: it runs alone, on every thread.
        evaluation = server.evaluate.remote(round_index, not fed.overlap_evaluation or round_index == fed.rounds)
    client_state_refs.update(outcome.client_state_refs)
    return PlayedRound(row, outcome, evaluation, dict(client_state_refs))


def finish_round(config: RunConfig, run_dir: Path, played: PlayedRound, server,
                 rows: list[dict[str, Any]]) -> Optional[str]:
    """Write the round's checkpoint when one is due, with ``rows`` (metrics.csv's rows up to this round, its
    own row complete) in its meta; returns the checkpoint's path or None. The server then drops the round's
    state."""
    round_index = played.row["round"]
    checkpoint_path = None
    if round_index % config.output.checkpoint_every == 0 or round_index == config.federation.rounds:
        state = get_within(server.held_state.remote(round_index), patient_deadline(config.federation.round_timeout_s),
                           "the parameter server")
        ids = sorted(played.client_state_refs)
        client_states = dict(zip(ids, ray.get([played.client_state_refs[i] for i in ids])))
        checkpoint_path = str(save_checkpoint(run_dir, round_index, state,
                                              {cid: cs for cid, cs in client_states.items() if cs},
                                              {"seed": config.seed, "rows": rows}, keep=config.output.keep_checkpoints))
    server.release.remote(round_index)
    return checkpoint_path


def publish_frozen_weights(config: RunConfig, task_info: dict[str, Any]):
    """The pretrained weights, loaded once by the driver and put in the object store, where every actor on
    a node reads the same pages (``resources.share_frozen_weights``); None when sharing is off."""
    if not config.resources.share_frozen_weights:
        return None
    return ray.put(export_weights(build_task(config, task_info).load_model()))


def publish_model_files(config: RunConfig):
    """A model directory of this machine (``model.name`` a local path), put in the object store for the actors on
    other machines (ravan_ray/model_files.py); None when every actor runs on this machine or the model is no
    directory here."""
    import ray.util.client

    if len(live_nodes()) <= 1 and not ray.util.client.ray.is_connected():
        return None
    files = read_model_files(config.model.name)
    return None if files is None else ray.put(files)


class RestartableServer:
    """The parameter server actor, and what it takes to start it again from the run's last checkpoint."""

    def __init__(self, config: RunConfig, data: FederatedData, state: Optional[dict], name: str, frozen_ref=None,
                 model_files_ref=None):
        self.config, self.task_info, self.name = config, data.task_info, name
        self.frozen_ref, self.model_files_ref = frozen_ref, model_files_ref
        self.test_ref = ray.put(data.test)
        self.validation_ref = None if data.validation is None else ray.put(data.validation)
        # federation.client_eval: each client's held-out rows of the training arrays, which the server evaluates
        self.client_test_ref = None if data.client_test is None else \
            ray.put([{key: values[rows] for key, values in data.train.items()} for rows in data.client_test])
        self.restarts = 0
        self.actor = self._start(state, name)

    def _start(self, state: Optional[dict], name: str):
        """The server, started and answering, within the round timeout; one line when it cannot start (its
        constructor failed, or no node had room for it in time)."""
        res = self.config.resources
        server = ParameterServer.options(num_cpus=res.server_cpus, num_gpus=res.server_gpus, name=name) \
            .remote(self.config.to_dict(), self.task_info, self.test_ref, state, self.frozen_ref, self.validation_ref,
                    self.client_test_ref, self.model_files_ref)
        deadline = patient_deadline(self.config.federation.round_timeout_s)
        ready, _ = wait_for([server.ping.remote()], deadline)
        if not ready:
            ray.kill(server, no_restart=True)
            raise ClusterError(f"the parameter server did not start within {deadline.seconds:g} s (it needs "
                               f"{describe({'CPU': res.server_cpus, 'GPU': res.server_gpus})} on a node)")
        try:
            ray.get(ready[0])
        except ray.exceptions.RayActorError as error:
            if getattr(error, "_actor_init_failed", False):
                raise SetupError(f"the parameter server could not start{remote_error_line(error, where=True)}") \
                    from None
            raise
        return server

    def restart(self, run_dir: Path) -> tuple[int, dict[int, Any]]:
        """A new server from the last checkpoint, after the old one died or stopped answering: returns (the round
        to play next, every client's state then, in the object store). Every round is a function of (state, seed,
        round), so the rounds played again since that checkpoint come out the same."""
        self.kill()
        self.restarts += 1
        next_round, state, client_states, _ = last_checkpoint(run_dir)
        client_state_refs = {cid: ray.put(cs) for cid, cs in client_states.items()}
        self.actor = self._start(state, f"{self.name}-{self.restarts}")
        return next_round, client_state_refs

    def kill(self) -> None:
        ray.kill(self.actor, no_restart=True)


def resume_point(run_dir: Path, at_round: Optional[int] = None
                 ) -> tuple[int, Optional[dict], dict[int, Any], Optional[list[dict[str, Any]]]]:
    """Where ``resume`` continues: :func:`last_checkpoint`, refusing a run that has played rounds but has no
    checkpoint to continue them from (instead of silently starting it over)."""
    point = last_checkpoint(run_dir, at_round)
    metrics = run_dir / "metrics.csv"
    if point[0] == 1 and metrics.is_file() and len(metrics.read_text().strip().splitlines()) > 1:
        raise CheckpointError(f"{run_dir} has rounds in metrics.csv but no checkpoint in {run_dir / 'checkpoints'}, so "
                              f"there is nothing to continue from; start the run again with another --output")
    return point


def last_checkpoint(run_dir: Path, at_round: Optional[int] = None
                    ) -> tuple[int, Optional[dict], dict[int, Any], Optional[list[dict[str, Any]]]]:
    """(next round, state, client states, metrics rows up to it) from the run's last checkpoint, or from
    round ``at_round``'s; round 1 and an empty state when there is none yet. The rows are None in a
    checkpoint written before checkpoints kept them. A damaged last checkpoint is refused with the
    command that continues from the one before it."""
    checkpoint = latest_checkpoint(run_dir) if at_round is None else checkpoint_at(run_dir, at_round)
    if checkpoint is None:
        return 1, None, {}, None
    try:
        state, client_states, meta = load_checkpoint(checkpoint)
    except CheckpointError as error:
        earlier = [p for p in list_checkpoints(run_dir) if p < checkpoint]
        if not earlier:
            raise
        previous = int(earlier[-1].name.removeprefix("round_"))
        raise CheckpointError(f"{error}; 'ravan-ray resume {run_dir} --from-round {previous}' continues from "
                              f"the checkpoint before it (round {previous})") from None
    return int(meta["round"]) + 1, state, client_states, meta.get("rows")


@dataclass
class RoundOutcome:
    update_refs: list  # ObjectRefs of ClientUpdate, in client-id order
    client_state_refs: dict[int, Any]
    train_losses: list[float]
    failed: int
    dropped: int
    log: list[dict[str, Any]]  # one entry per client attempt: for clients.csv


def run_clients(fleet: ClientFleet, tasks: list[ClientTask], state_ref, client_state_refs: dict[int, Any],
                fed) -> RoundOutcome:
    """Dispatch the round's client tasks, in cohorts of ``resources.cohort_size`` (fixed chunks of the sorted
    client ids, so which clients train together never depends on the actors); drop stragglers past the round
    timeout; skip or retry clients whose actor died (a cohort fails, is dropped and is retried as a whole, on
    another actor of the pool where its own is gone for good).

    Every wait has a deadline: starting the actors (a replacement included; ``federation.round_timeout_s`` but at
    least cluster.MIN_PATIENCE_S), then the clients' training (``round_timeout_s``), once more for a retry. The
    updates themselves stay in the object store and go straight to the server; the driver only fetches each
    client's small status (its loss) to learn whether it finished."""
    by_id = {t.client_id: t for t in tasks}
    pending = {position: [by_id[c] for c in members]
               for position, members in enumerate(cohorts([t.client_id for t in tasks], fleet.cohort_size()))}
    done: dict[int, tuple[Any, Any, dict]] = {}
    failed = dropped = 0
    log: list[dict[str, Any]] = []
    round_index = tasks[0].round if tasks else 0
    attempts = 2 if fed.on_client_failure == "retry" else 1
    for _ in range(attempts):
        if not pending:
            break
        for position in sorted(fleet.ready(pending, patient_deadline(fed.round_timeout_s))):  # no actor for these
            for task in pending.pop(position):
                failed += 1
                log.append({"round": round_index, "client": task.client_id, "status": "unplaced"})
        refs, position_of = {}, {}
        for position, cohort in pending.items():
            triples = fleet.submit(cohort, position, state_ref, [client_state_refs.get(t.client_id) for t in cohort])
            for task, triple in zip(cohort, triples):
                refs[task.client_id], position_of[task.client_id] = triple, position
        status_refs = {refs[cid][2]: cid for cid in refs}
        ready, late = wait_for(list(status_refs), Deadline(fed.round_timeout_s))
        replaced: set[int] = set()  # a cohort's actor is restarted once, however many of its clients failed
        for ref in late:  # stragglers: drop this round, restart their actor so it does not lag next round
            cid = status_refs[ref]
            dropped += 1
            log.append({"round": round_index, "client": cid, "status": "dropped"})
            position = position_of[cid]
            if position not in replaced:
                fleet.replace(pending[position][0].client_id, position)
                replaced.add(position)
        late_positions = {position_of[status_refs[ref]] for ref in late}
        still_pending: dict[int, list[ClientTask]] = {}
        for ref in ready:
            cid = status_refs[ref]
            position = position_of[cid]
            try:
                status = ray.get(ref)
            except CLIENT_LOST:
                failed += 1  # counted even when the retry succeeds: the failure happened
                log.append({"round": round_index, "client": cid, "status": "failed"})
                if position not in replaced:
                    fleet.replace(pending[position][0].client_id, position)
                    replaced.add(position)
                if position not in late_positions:
                    still_pending.setdefault(position, []).append(by_id[cid])
                continue
            fleet.show_notes(status.get("notes", ()))
            done[cid] = (refs[cid][0], refs[cid][1], status)
            log.append({"round": round_index, "client": cid, "status": "ok", "train_loss": status["train_loss"],
                        "seconds": status["finished"] - status["started"], "started": status["started"],
                        "finished": status["finished"], "pid": status["pid"],
                        "gpu_ids": ";".join(map(str, status["gpu_ids"]))})
        pending = {position: sorted(cohort, key=lambda t: t.client_id) for position, cohort in still_pending.items()}
    ids = sorted(done)
    return RoundOutcome(
        update_refs=[done[c][0] for c in ids],
        client_state_refs={c: held_by_driver(done[c][1]) for c in ids if done[c][2]["has_client_state"]},
        train_losses=[done[c][2]["train_loss"] for c in ids],
        failed=failed,
        dropped=dropped,
        log=log,
    )


# A client task whose actor died (its node lost, killed, out of memory), or whose result went with its node.
CLIENT_LOST = (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError, ray.exceptions.OutOfMemoryError)


def held_by_driver(ref):
    """A client's own state (the part of its model it keeps between rounds), copied from the node it was made on
    into the driver's: that node may be lost before the client's next round or the next checkpoint."""
    return ray.put(ray.get(ref))
