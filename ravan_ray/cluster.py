"""Ray for one command (a run, a sweep): the cluster it joins or the private Ray it starts, how many actors that
cluster's nodes can hold, and waiting on Ray with a deadline (never for ever, and never deaf to Ctrl-C)."""

from __future__ import annotations

import logging
import math
import os
import re
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional

RAY_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
Resources = dict[str, float]  # {"CPU": 2.0, "GPU": 0.5}
# How long an address gets to answer before the command says it does not (a TCP connect, then the GCS's node list).
ADDRESS_TIMEOUT_S = 5.0
GCS_TIMEOUT_S = 20.0


class ClusterError(ValueError):
    """The cluster cannot be reached, or cannot hold what the run needs; one line for the user."""


class SetupError(ValueError):
    """An actor could not start as configured (a model that does not load on its node, ...); one line."""


@contextmanager
def ray_runtime(resources, address: Optional[str] = None) -> Iterator[None]:
    """Use the Ray we are already in (a Tune trial, a job); else connect to ``address`` (by default
    ``resources.address``, then RAY_ADDRESS), or start a private local Ray (``resources.num_cpus`` /
    ``num_gpus``) bound to 127.0.0.1, and shut down what was started here afterwards.

    The private Ray is ``address="local"``: a plain ``ray.init()`` would attach to whatever cluster this machine
    last knew (Ray's ray_current_cluster file), a dead one included, and retry it for minutes. An address is
    checked before Ray is given it, so one that does not answer, or a cluster this machine is no node of, is one
    line within seconds instead of a hang."""
    import ray

    if ray.is_initialized():
        yield
        return
    address = address or resources.address or os.environ.get("RAY_ADDRESS")
    if address:
        check_address(address)
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        from ravan_ray.logs import quiet_logger

        # No dashboard (nothing listens for HTTP). Ray core's own gRPC servers choose their interfaces
        # themselves; ray.init resolves 127.0.0.1 to the node's address, so there is nothing to pass.
        # Token authentication stays on (Ray's default for a new local cluster); Ray's warning that
        # announces that default means nothing for a private Ray this command starts and stops itself.
        with quiet_logger(RAY_AUTH_LOGGER):
            ray.init(address="local", num_cpus=resources.num_cpus, num_gpus=resources.num_gpus,
                     include_dashboard=False, logging_level=logging.WARNING,
                     # errors come back as exceptions; worker logs would repeat them as remote tracebacks
                     log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


# ------------------------------------------------------------------------------------------ checking an address
def check_address(address: str) -> None:
    """Raise ClusterError, within seconds, when ``address`` cannot work from this machine: nothing answers there,
    or (a plain GCS address, HOST:PORT) the cluster has no node on this machine. A driver attached by a plain
    address joins through a local raylet of that cluster; from a machine that is no node Ray waits for one for
    minutes. Ray Client (``ray://HOST:10001``) and ``ray job submit`` are the ways in from outside."""
    if address == "auto":
        return  # Ray's own discovery of a cluster on this machine; it fails fast when there is none
    client = address.startswith("ray://")
    host, port = _host_port(address.removeprefix("ray://"), 10001 if client else 6379)
    try:
        socket.create_connection((host, port), timeout=ADDRESS_TIMEOUT_S).close()
    except OSError as error:
        raise ClusterError(f"Ray address {address} does not answer ({error.strerror or type(error).__name__}); "
                           f"is a Ray head running there? Without an address, ravan-ray starts a private local Ray"
                           ) from None
    if client:
        return
    node_ips = _cluster_node_ips(f"{host}:{port}", address)
    if node_ips and not node_ips & local_ip_addresses():
        raise ClusterError(
            f"this machine is not a node of the Ray cluster at {address} (its nodes: {', '.join(sorted(node_ips))}); "
            f"connect from outside with Ray Client, resources.address=ray://{host}:10001, or submit the command "
            f"with 'ray job submit --address http://{host}:8265 --working-dir . -- ravan-ray ...'")


def _host_port(address: str, default_port: int) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host:
        return address, default_port
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        raise ClusterError(f"Ray address {address!r} is not HOST:PORT") from None


def _cluster_node_ips(gcs_address: str, shown: str) -> Optional[set[str]]:
    """The addresses of the cluster's live nodes, asked of its GCS on a thread of its own (Ray's GCS client blocks
    for ~35 s on a port that answers but is no GCS). None when the GCS answered but would not say (e.g. it wants
    an authentication token this process lacks): ray.init then fails on the same grounds, in its own words."""
    found: dict[str, Any] = {}

    def ask() -> None:
        try:
            from ray._raylet import GcsClient

            infos = GcsClient(address=gcs_address).get_all_node_info(timeout=GCS_TIMEOUT_S)
            found["ips"] = {info.node_manager_address for info in infos.values() if info.state == 0}  # 0: ALIVE
        except Exception as error:  # Ray's own error types (RpcError, AuthenticationError) vary by version
            found["error"] = error

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    thread.join(GCS_TIMEOUT_S + ADDRESS_TIMEOUT_S)
    if "ips" in found:
        return found["ips"]
    error = found.get("error")
    if error is not None and "timed out" not in str(error).lower():
        return None
    raise ClusterError(f"Ray address {shown} answers, but not as a Ray cluster's GCS (no answer to a request for "
                       f"its nodes in {GCS_TIMEOUT_S:g} s)")


def local_ip_addresses() -> set[str]:
    """Every address of this machine's interfaces (in its network namespace)."""
    import psutil  # comes with Ray

    return {a.address for addrs in psutil.net_if_addrs().values() for a in addrs
            if a.family in (socket.AF_INET, socket.AF_INET6)}


# ------------------------------------------------------------------------------------------ what the nodes hold
def total(bundles: list[Resources]) -> Resources:
    """What a set of reservations (actors, placement-group bundles) asks for together."""
    summed: Resources = {}
    for bundle in bundles:
        for kind, amount in bundle.items():
            summed[kind] = summed.get(kind, 0.0) + amount
    return summed


def shortfall(need: Resources, have: Resources) -> Optional[str]:
    """The first kind of resource ``need`` asks more of than ``have`` holds, or None when it fits."""
    return next((kind for kind, amount in need.items() if amount > have.get(kind, 0.0) + 1e-9), None)


def describe(resources: Resources, kinds: Optional[set[str]] = None) -> str:
    """"2 CPU, 0.5 GPU" for the given kinds of resource (default: those present)."""
    kinds = set(resources) if kinds is None else set(kinds)
    return ", ".join(f"{resources.get(k, 0.0):g} {k}" for k in sorted(kinds))


def live_nodes() -> list[Resources]:
    """The total resources of each live node of the cluster Ray is connected to."""
    import ray

    return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]


def copies_that_fit(node: Resources, bundle: Resources) -> int:
    """How many reservations of ``bundle`` one node holds (kinds the bundle does not ask for do not limit it)."""
    asked = {kind: amount for kind, amount in bundle.items() if amount > 0}
    if not asked:
        return 10**9
    return min(int(math.floor(node.get(kind, 0.0) / amount + 1e-9)) for kind, amount in asked.items())


def place_first(nodes: list[Resources], bundle: Resources) -> Optional[list[Resources]]:
    """The nodes with ``bundle`` taken from the one it leaves the most room on (the parameter server, placed
    before the client actors are counted), or None when no node holds it."""
    bundle = {kind: amount for kind, amount in bundle.items() if amount > 0}
    if not bundle:
        return list(nodes)
    holders = [i for i, node in enumerate(nodes) if shortfall(bundle, node) is None]
    if not holders:
        return None
    best = max(holders, key=lambda i: tuple(nodes[i].get(k, 0.0) - v for k, v in sorted(bundle.items())))
    left = [dict(node) for node in nodes]
    for kind, amount in bundle.items():
        left[best][kind] -= amount
    return left


@dataclass(frozen=True)
class ActorPlan:
    """How many client actors a run starts and what each reserves."""
    size: int
    cpus: float  # per actor
    gpus: float  # per actor


def plan_actors(nodes: list[Resources], cpus: float, gpus: float, wanted: int, can_share_cores: bool,
                server: Optional[Resources] = None) -> ActorPlan:
    """Size a run's client actors to what each node holds, not to the cluster's sum (three 1-CPU nodes hold three
    1-CPU actors, not four of 0.75 CPU).

    ``wanted`` actors of ``cpus`` / ``gpus`` each, fewer where the nodes hold fewer. Single-threaded CPU actors may
    share cores (``can_share_cores``: the OS time-slices whole processes and each keeps its one torch thread, so the
    numbers do not change): with ``fit`` actors on the cores, m clients run in waves of ``fit`` and a last wave of
    ``m % fit`` leaves cores idle (3 clients on 2 cores: the third trains alone), so the pool grows to the smallest
    size whose last wave still fills the cores, each actor reserving the cores divided among them, as long as every
    node still holds its share of them. Raises ClusterError when not even one actor (and the server) fits a node."""
    server = server or {}
    left = place_first(nodes, server)
    bundle = {"CPU": cpus, "GPU": gpus}
    largest = max(nodes, key=lambda n: (n.get("GPU", 0.0), n.get("CPU", 0.0)), default={})
    if left is None:
        raise ClusterError(f"the parameter server needs {describe(server)} but the largest node has "
                           f"{describe(largest, set(server))}; lower resources.server_cpus / server_gpus")
    fit = sum(copies_that_fit(node, bundle) for node in left)
    if fit == 0:
        raise ClusterError(f"a client actor needs {describe(bundle)} but the largest node has "
                           f"{describe(largest, {'CPU', 'GPU'})}"
                           + (" after the parameter server's share" if any(server.values()) else "")
                           + "; lower resources.cpus_per_client / gpus_per_client or add a larger node")
    if fit >= wanted or not can_share_cores:
        return ActorPlan(min(wanted, fit), cpus, gpus)
    grown = next(size for size in range(fit, wanted + 1) if wanted % size == 0 or wanted % size >= fit)
    shared = fit * cpus / grown
    if grown > fit and sum(copies_that_fit(node, {"CPU": shared, "GPU": gpus}) for node in left) >= grown:
        return ActorPlan(grown, shared, gpus)
    return ActorPlan(fit, cpus, gpus)


# ------------------------------------------------------------------------------------------ waiting on Ray
class Deadline:
    """A point in time a wait may not pass; None seconds: no limit."""

    def __init__(self, seconds: Optional[float]):
        self.seconds = seconds
        self.at = None if seconds is None else time.monotonic() + seconds

    def left(self) -> Optional[float]:
        return None if self.at is None else max(0.0, self.at - time.monotonic())

    def passed(self) -> bool:
        return self.at is not None and time.monotonic() >= self.at


# Ray's blocking calls sit in C++ and let Python's signal handlers run only between calls: wait in slices this long,
# so that Ctrl-C ends the command within about a second.
WAIT_SLICE_S = 1.0


def wait_for(refs: list, deadline: Deadline, num_returns: Optional[int] = None) -> tuple[list, list]:
    """``ray.wait`` for ``num_returns`` (default: all) of ``refs`` until the deadline: (ready, not ready)."""
    import ray

    pending, ready = list(refs), []
    wanted = len(refs) if num_returns is None else num_returns
    while pending and len(ready) < wanted:
        left = deadline.left()
        if left is not None and left <= 0:
            break
        slice_s = WAIT_SLICE_S if left is None else min(WAIT_SLICE_S, left)
        done, pending = ray.wait(pending, num_returns=min(len(pending), wanted - len(ready)), timeout=slice_s)
        ready += done
    return ready, pending


# Waits on the platform's own work (an actor starting: a node with room, then its constructor loading the model; a
# call to the parameter server: aggregating, evaluating) last at most the round timeout, but never less than this: a
# model takes minutes to load on a busy machine, and a straggler timeout of a few seconds for the clients' training
# must not stop the actors from starting or the server from evaluating.
MIN_PATIENCE_S = 120.0


def patient_deadline(round_timeout_s: float) -> Deadline:
    return Deadline(max(round_timeout_s, MIN_PATIENCE_S))


class Unresponsive(TimeoutError):
    """A Ray call did not answer before its deadline."""


def get_within(ref, deadline: Deadline, what: str):
    """``ray.get(ref)`` by the deadline, or Unresponsive naming ``what``."""
    import ray

    ready, _ = wait_for([ref], deadline)
    if not ready:
        raise Unresponsive(f"{what} did not answer within {deadline.seconds:g} s")
    return ray.get(ready[0])


# ------------------------------------------------------------------------------------------ errors from actors
# The exception line of a remote traceback: the first unindented line after its last frame. Its name may be dotted
# (ravan_ray.models.ModelError: Python names an exception by its module unless it is a builtin).
_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*): (.*)$")
_NODE = re.compile(r"\bip=([0-9A-Fa-f.:]+)")
# Errors that already say what is wrong in the user's terms: shown by their message alone.
_PLAIN_ERRORS = {"ValueError", "OSError", "FileNotFoundError", "ModelError", "DataError", "ConfigError", "SetupError",
                 "ClusterError", "CheckpointError", "RunFilesError", "SweepError"}


def remote_error_line(error: BaseException, where: bool = False) -> str:
    """One line for an error Ray brings back from an actor or task (the cause's message, or the exception line of
    the remote traceback it carries), whatever the exception's name. ``where``: prefixed with " on node IP: " when
    Ray says which node it ran on."""
    cause = getattr(error, "cause", None)  # RayTaskError: the original exception, where it could be pickled
    text = getattr(error, "error_msg", None) or str(error)
    if isinstance(cause, BaseException) and not isinstance(cause, type(error)):
        name, message = type(cause).__name__, " ".join(str(cause).split())
    else:
        name, message = _exception_line(text)
    short = name.rsplit(".", 1)[-1]
    line = message if (short in _PLAIN_ERRORS or not short) and message else f"{short}: {message}" if message else short
    if not where:
        return line
    node = _NODE.search(text)
    return f" on node {node.group(1)}: {line}" if node else f": {line}"


def _exception_line(text: str) -> tuple[str, str]:
    lines = text.splitlines()
    frames = [i for i, line in enumerate(lines) if line.lstrip().startswith('File "')]
    for line in lines[frames[-1] + 1 if frames else 0:]:
        match = _EXCEPTION_LINE.match(line)
        if match and not line.startswith(" "):
            return match.group(1), " ".join(match.group(2).split())
    first = next((line.strip() for line in lines if line.strip()), "")
    return "", first[:300]  # no traceback in it: its first line, unnamed
