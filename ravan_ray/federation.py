"""The federated loop (the driver): one function, :func:`run_federation`, to read top to bottom.

    driver: sample m clients (seeded by (seed, round))
        -> server.broadcast(): the global state, put once in the object store, its ref sent to each client
    client actors: load state -> select heads / rank -> S local steps -> upload
    server: aggregate (sorted by client id, so arrival order never matters) -> diagnostics
    driver: every eval_every rounds the server evaluates the global model (on its own thread, while the
            clients already train the next round: overlap_evaluation) -> one metrics.csv row per round,
            written in order once the round's evaluation is in
            every checkpoint_every rounds the server writes a checkpoint (safetensors + JSON) of a round
            whose row is written, so a resumed run never lacks a row

Nothing here knows which method runs. All randomness derives from (seed, round, client id), so a run
resumed from a checkpoint, or run with another actor mode, produces the same numbers.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
import uuid
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import pandas as pd
import ray
from tqdm.auto import tqdm

from actors import ClientFleet, ParameterServer
from ravan_ray.budgets import client_levels, heads_for_level
from ravan_ray.checkpoints import latest_checkpoint, load_checkpoint
from ravan_ray.config import RunConfig, save_config
from ravan_ray.data import label_histogram, partition
from ravan_ray.logs import quiet_logger
from ravan_ray.methods.base import ClientTask
from ravan_ray.models import export_weights
from ravan_ray.privacy import PrivacyBudget, build_mechanism
from ravan_ray.tasks import build_task, task_class
from ravan_ray.training import preflight
from ravan_ray.report import plot_run
from ravan_ray.results import (read_metrics, read_table, summarize, with_validation, write_metrics, write_summary,
                               write_table)

log = logging.getLogger(__name__)
RoundCallback = Callable[[dict[str, Any], Optional[str]], None]


class SetupError(ValueError):
    """The run cannot start as configured (resources, model, targets); one line for the user."""


@dataclass
class FederatedData:
    train: dict[str, np.ndarray]  # the task's row-aligned training arrays
    test: dict[str, Any]
    validation: Optional[dict[str, Any]]  # held out before partitioning, prepared as test is; None without one
    partitions: list[np.ndarray]  # the training rows of each client
    task_info: dict[str, Any]  # what every process needs to build the task's model
    histogram: pd.DataFrame
    partition_kind: str  # the split used: the configured one, or iid where the task has no labels to split on


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
        if kind == "dirichlet":
            print(f"ravan-ray: {config.model.task} has no class labels for the Dirichlet split; set "
                  f"data.partition.label_field to a column to split on (e.g. a category). Splitting iid.",
                  file=sys.stderr)
            kind = "iid"
    parts = partition(labels, config.federation.num_clients, kind, d.partition.alpha, d.partition.min_size,
                      config.seed)
    histogram = label_histogram(labels, parts, max(1, len(data.partition_names)))
    if data.partition_labels is None:
        histogram.columns = ["samples"]
    if data.train_examples is not None:  # example ids -> the rows those examples made
        owner = np.empty(data.num_examples, dtype=np.int64)
        for client, examples in enumerate(parts):
            owner[examples] = client
        row_owner = owner[data.train_examples]
        by_client = np.argsort(row_owner, kind="stable")  # stable: each client's rows stay in ascending order
        parts = np.split(by_client, np.cumsum(np.bincount(row_owner, minlength=len(parts)))[:-1])
    return FederatedData(data.train, data.test, data.validation, parts, data.info, histogram, kind)


def sample_clients(seed: int, round_index: int, num_clients: int, per_round: int) -> list[int]:
    rng = np.random.default_rng([seed, round_index, 0x5A4D])
    return sorted(int(c) for c in rng.choice(num_clients, size=per_round, replace=False))


def client_rounds(config: RunConfig) -> list[list[int]]:
    """The rounds each client is sampled in (the seeded draw of :func:`sample_clients`), for the accountant."""
    fed = config.federation
    rounds: list[list[int]] = [[] for _ in range(fed.num_clients)]
    for round_index in range(1, fed.rounds + 1):
        for client in sample_clients(config.seed, round_index, fed.num_clients, fed.clients_per_round):
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


@contextmanager
def ray_runtime(config: RunConfig) -> Iterator[None]:
    """Use the Ray we are already in (a Tune trial, a job), connect to resources.address / RAY_ADDRESS, or
    start a private local Ray bound to 127.0.0.1 and shut it down afterwards."""
    if ray.is_initialized():
        yield
        return
    address = config.resources.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        # No dashboard (nothing listens for HTTP). Ray core's own gRPC servers choose their interfaces
        # themselves; ray.init resolves 127.0.0.1 to the node's address, so there is nothing to pass.
        # Token authentication stays on (Ray's default for a new local cluster); Ray's warning that
        # announces that default means nothing for a private Ray this command starts and stops itself.
        with quiet_logger(RAY_AUTH_LOGGER):
            ray.init(num_cpus=config.resources.num_cpus, num_gpus=config.resources.num_gpus,
                     include_dashboard=False, logging_level=logging.WARNING,
                     # errors come back as exceptions; worker logs would repeat them as remote tracebacks
                     log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


RAY_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


def check_resources(config: RunConfig, fleet: ClientFleet) -> None:
    """Fail fast, instead of waiting forever, when the actors can never all be placed."""
    if ray.util.get_current_placement_group() is not None:
        return  # a Tune trial: its placement group was sized for exactly these actors
    total = ray.cluster_resources()
    need = fleet.resources_needed()
    need["CPU"] += config.resources.server_cpus
    need["GPU"] += config.resources.server_gpus
    for kind, amount in need.items():
        have = total.get(kind, 0.0)
        if amount > have + 1e-9:
            mode = config.resources.actor_mode
            raise SetupError(
                f"{mode} mode needs {amount:g} {kind} for {fleet.size} client actors (+ server) but the cluster has "
                f"{have:g}; lower resources.{'cpus' if kind == 'CPU' else 'gpus'}_per_client"
                + (" or use resources.actor_mode=pool" if mode == "per_client" else " or resources.pool_size"))


_ERROR_LINE = re.compile(r"^(\w*(Error|Exception)): (.+)$")
# Errors raised for bad input inside an actor's constructor; anything else is a bug and is re-raised.
_INPUT_ERRORS = {"ValueError", "ModelError", "DataError", "ConfigError", "SetupError", "OSError", "FileNotFoundError"}


def started(actor: Any, what: str) -> Any:
    """Wait for an actor's constructor; a setup problem inside it (no target module, model not found)
    becomes one SetupError line instead of a remote traceback."""
    try:
        ray.get(actor.ping.remote())
    except ray.exceptions.RayActorError as error:
        lines = [m for m in map(_ERROR_LINE.match, str(error).splitlines()) if m]
        if not lines or lines[-1].group(1) not in _INPUT_ERRORS:
            raise
        raise SetupError(f"{what} could not start: {lines[-1].group(3)}") from None
    return actor


def run_federation(config: RunConfig, run_dir: str | Path, resume: bool = False,
                   on_round: Optional[RoundCallback] = None) -> dict[str, Any]:
    """Run the federation described by ``config`` into ``run_dir`` (or continue it with ``resume``)."""
    run_dir = Path(run_dir)
    fed = config.federation
    data = prepare_data(config)
    resolved = preflight(config, data.task_info)
    budget = build_mechanism(config).plan_budget([len(p) for p in data.partitions], client_rounds(config))
    if budget is not None:
        resolved["privacy"] = {"noise_multiplier": budget.noise_multiplier, "delta": budget.delta,
                               "epsilon_after_all_rounds": budget.epsilon(fed.rounds)}
    metric_columns = task_class(config.model.task).metrics
    if data.validation is not None:
        metric_columns = with_validation(metric_columns)
    levels = client_levels(fed.num_clients, config.compute.distribution, config.compute.levels, config.seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "config.yaml", extra={"method": resolved, "task": data.task_info,
                                                         "partition": data.partition_kind})
    data.histogram.to_csv(run_dir / "label_histogram.csv")
    pd.DataFrame({"client": range(fed.num_clients), "level": levels,
                  "heads": [heads_for_level(lv, config.method.heads) for lv in levels],
                  "samples": [len(p) for p in data.partitions]}).to_csv(run_dir / "client_budgets.csv", index=False)
    config = with_noise_multiplier(config, budget)  # what the actors run: the noise multiplier, given or calibrated
    first_round, state, client_states, rows = restore(run_dir) if resume else (1, None, {}, [])
    client_log = read_table(run_dir / "clients.csv", before_round=first_round)

    with ray_runtime(config):
        task_info = data.task_info
        test_ref = ray.put(data.test)
        validation_ref = None if data.validation is None else ray.put(data.validation)
        actor_prefix = f"ravan-{uuid.uuid4().hex[:8]}"
        in_trial = ray.util.get_current_placement_group() is not None
        frozen_ref = publish_frozen_weights(config, task_info)
        fleet = ClientFleet(config, task_info, ray.put(data.train), data.partitions, name_prefix=actor_prefix,
                            cluster_cpus=None if in_trial else ray.cluster_resources().get("CPU"),
                            frozen_ref=frozen_ref)
        check_resources(config, fleet)
        if first_round <= fed.rounds:
            fleet.start(sample_clients(config.seed, first_round, fed.num_clients, fed.clients_per_round))
        # A server that cannot start raises here; the fleet's actors (not detached) end with their handles.
        server = start_server(config, task_info, test_ref, state, f"{actor_prefix}-server", frozen_ref, validation_ref)
        client_state_refs = {cid: ray.put(cs) for cid, cs in client_states.items()}
        wall_offset = rows[-1]["wall_s"] if rows else 0.0
        run_started = time.perf_counter()
        server_restarts = 0

        primary = task_class(config.model.task).primary_metric
        shown = [(_short_name(primary), primary)]  # the progress line's score
        progress = tqdm(total=fed.rounds, initial=first_round - 1, desc=config.method.name, unit="round", disable=None)
        # Played rounds whose rows wait for their evaluation (at most the last one or two with overlap).
        unfinished: deque[PlayedRound] = deque()
        round_index = first_round
        try:
            while round_index <= fed.rounds or unfinished:
                try:
                    if round_index <= fed.rounds:
                        unfinished.append(play_round(config, round_index, server, fleet, levels, client_state_refs))
                        round_index += 1
                    # Finish rounds in order; wait for one only when no round is left to overlap it with.
                    while unfinished and (unfinished[0].evaluated() or round_index > fed.rounds
                                          or not fed.overlap_evaluation):
                        played = unfinished.popleft()
                        checkpoint_path = finish_round(config, run_dir, played, server)
                        row = played.row
                        if budget is not None:
                            row["epsilon"] = budget.epsilon(row["round"])
                        row["wall_s"] = wall_offset + time.perf_counter() - run_started
                        row["server_restarts"] = server_restarts
                        rows.append(row)
                        client_log.extend(played.outcome.log)
                        write_metrics(run_dir / "metrics.csv", rows, metric_columns)
                        write_table(run_dir / "clients.csv", client_log)
                        write_summary(run_dir / "summary.json", summarize(config, rows, row["wall_s"]))
                        progress.update(1)
                        progress.set_postfix(loss=f"{row['train_loss']:.3f}",
                                             **{short: _fmt(row.get(m)) for short, m in shown})
                        if progress.disable and not os.environ.get("TQDM_DISABLE"):  # no terminal (a Ray job, CI)
                            scores = " ".join(f"{short} {_fmt(row.get(m))}" for short, m in shown)
                            print(f"{config.method.name} round {row['round']}/{fed.rounds} loss {row['train_loss']:.3f} "
                                  f"{scores} ({row['round_s']:.1f} s)", file=sys.stderr, flush=True)
                        if on_round is not None:
                            on_round(row, checkpoint_path)
                except ray.exceptions.RayActorError:
                    # The parameter server died: bring it back from the last checkpoint and redo the rounds
                    # since; every round is a function of (state, seed, round), so they come out the same.
                    server_restarts += 1
                    if server_restarts > fed.max_server_restarts:
                        raise
                    log.warning("parameter server lost in round %d; restoring from the last checkpoint", round_index)
                    unfinished.clear()
                    round_index, state, client_states, rows = restore(run_dir, rows)
                    client_log = [entry for entry in client_log if entry["round"] < round_index]
                    client_state_refs = {cid: ray.put(cs) for cid, cs in client_states.items()}
                    server = start_server(config, task_info, test_ref, state, f"{actor_prefix}-server-{server_restarts}",
                                          frozen_ref, validation_ref)
                    progress.n = round_index - 1
        finally:
            progress.close()
            fleet.shutdown()
            ray.kill(server, no_restart=True)
    if rows:
        plot_run(run_dir)
    return summarize(config, rows, rows[-1]["wall_s"] if rows else 0.0)


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
               client_state_refs: dict[int, Any]) -> PlayedRound:
    """One round: broadcast, local training, aggregation; starts the evaluation (without waiting for it).
    Updates ``client_state_refs``."""
    fed = config.federation
    started = time.perf_counter()
    sampled = sample_clients(config.seed, round_index, fed.num_clients, fed.clients_per_round)
    state_ref, downlink_ref = server.broadcast.options(num_returns=2).remote(sampled)
    downlink_bytes = ray.get(downlink_ref)  # also: the server is alive before clients depend on it
    tasks = [ClientTask(cid, round_index, float(levels[cid]), config.seed) for cid in sampled]
    outcome = run_clients(fleet, tasks, state_ref, client_state_refs, fed)
    server_metrics = ray.get(server.aggregate.remote(round_index, *outcome.update_refs))
    row = {"round": round_index, "clients": len(outcome.update_refs),
           "train_loss": float(np.mean(outcome.train_losses)) if outcome.train_losses else np.nan,
           "downlink_bytes": downlink_bytes, "failed_clients": outcome.failed,
           "dropped_clients": outcome.dropped, **server_metrics,
           "round_s": time.perf_counter() - started}  # training and aggregation; evaluation is not in it
    evaluation = None
    if round_index % fed.eval_every == 0 or round_index == fed.rounds:
        # The last round's evaluation has no next round to overlap: it runs alone, on every thread.
        evaluation = server.evaluate.remote(round_index, not fed.overlap_evaluation or round_index == fed.rounds)
    client_state_refs.update(outcome.client_state_refs)
    return PlayedRound(row, outcome, evaluation, dict(client_state_refs))


def finish_round(config: RunConfig, run_dir: Path, played: PlayedRound, server) -> Optional[str]:
    """Complete the round's row with its evaluation and write its checkpoint when one is due; returns the
    checkpoint's path or None. The server then drops the round's state."""
    round_index = played.row["round"]
    if played.evaluation is not None:
        played.row.update(ray.get(played.evaluation))
    checkpoint_path = None
    if round_index % config.output.checkpoint_every == 0 or round_index == config.federation.rounds:
        ids = sorted(played.client_state_refs)
        checkpoint_path = ray.get(server.checkpoint.remote(
            str(run_dir), round_index, {"seed": config.seed}, config.output.keep_checkpoints,
            ids, *[played.client_state_refs[i] for i in ids]))
    server.release.remote(round_index)
    return checkpoint_path


def publish_frozen_weights(config: RunConfig, task_info: dict[str, Any]):
    """The pretrained weights, loaded once by the driver and put in the object store, where every actor on
    a node reads the same pages (``resources.share_frozen_weights``); None when sharing is off."""
    if not config.resources.share_frozen_weights:
        return None
    return ray.put(export_weights(build_task(config, task_info).load_model()))


def start_server(config: RunConfig, task_info: dict[str, Any], test_ref, state, name: str, frozen_ref=None,
                 validation_ref=None):
    res = config.resources
    server = ParameterServer.options(num_cpus=res.server_cpus, num_gpus=res.server_gpus, name=name) \
        .remote(config.to_dict(), task_info, test_ref, state, frozen_ref, validation_ref)
    return started(server, "the parameter server")


def restore(run_dir: Path, rows: Optional[list[dict[str, Any]]] = None):
    """(next round, state, client states, metric rows up to the checkpoint) from the last checkpoint;
    round 1 and an empty state when there is none yet."""
    checkpoint = latest_checkpoint(run_dir)
    state, client_states, last_round = None, {}, 0
    if checkpoint is not None:
        state, client_states, meta = load_checkpoint(checkpoint)
        last_round = int(meta["round"])
    if rows is None:
        rows = read_metrics(run_dir / "metrics.csv") if (run_dir / "metrics.csv").exists() else []
    return last_round + 1, state, client_states, [r for r in rows if r["round"] <= last_round]


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
    """Dispatch the round's client tasks; drop stragglers past the timeout; skip or retry dead clients.

    The updates themselves stay in the object store and go straight to the server; the driver only
    fetches each client's small status (its loss) to learn whether it finished."""
    pending = {t.client_id: (t, pos) for pos, t in enumerate(tasks)}
    done: dict[int, tuple[Any, Any, dict]] = {}
    failed = dropped = 0
    log: list[dict[str, Any]] = []
    round_index = tasks[0].round if tasks else 0
    attempts = 2 if fed.on_client_failure == "retry" else 1
    for _ in range(attempts):
        if not pending:
            break
        if fed.round_timeout_s is not None:  # the timeout is for training, not for an actor loading its model
            fleet.wait_ready(list(pending.values()))
        refs = {cid: fleet.submit(t, pos, state_ref, client_state_refs.get(t.client_id))
                for cid, (t, pos) in pending.items()}
        status_refs = {refs[cid][2]: cid for cid in refs}
        ready, late = ray.wait(list(status_refs), num_returns=len(status_refs), timeout=fed.round_timeout_s)
        for ref in late:  # stragglers: drop this round, restart their actor so it does not lag next round
            cid = status_refs[ref]
            dropped += 1
            log.append({"round": round_index, "client": cid, "status": "dropped"})
            fleet.replace(cid, pending.pop(cid)[1])
        still_pending = {}
        for ref in ready:
            cid = status_refs[ref]
            try:
                status = ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError):
                failed += 1  # counted even when the retry succeeds: the failure happened
                log.append({"round": round_index, "client": cid, "status": "failed"})
                fleet.replace(cid, pending[cid][1])
                still_pending[cid] = pending[cid]
                continue
            done[cid] = (refs[cid][0], refs[cid][1], status)
            log.append({"round": round_index, "client": cid, "status": "ok", "train_loss": status["train_loss"],
                        "seconds": status["finished"] - status["started"], "started": status["started"],
                        "finished": status["finished"], "pid": status["pid"],
                        "gpu_ids": ";".join(map(str, status["gpu_ids"]))})
        pending = still_pending
    ids = sorted(done)
    return RoundOutcome(
        update_refs=[done[c][0] for c in ids],
        client_state_refs={c: done[c][1] for c in ids if done[c][2]["has_client_state"]},
        train_losses=[done[c][2]["train_loss"] for c in ids],
        failed=failed,
        dropped=dropped,
        log=log,
    )


def _short_name(metric: str) -> str:
    """The progress line's name of a task's primary metric ("loss" is the round's training loss)."""
    return {"test_accuracy": "acc", "test_exact_match": "em", "test_f1": "f1"}.get(metric, metric)


def _fmt(value: Any) -> str:
    return "-" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.3f}"
