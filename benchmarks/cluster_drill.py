"""A fault drill on a real 3-node Ray cluster built on this one machine: what a cluster user meets.

    sudo .venv/bin/python benchmarks/cluster_drill.py --cases all --write-results   # every case, 45-50 min*
    sudo .venv/bin/python benchmarks/cluster_drill.py --cases reference,worker_lost_retry
    .venv/bin/python benchmarks/cluster_drill.py --list                              # the cases

**The cluster.** Five network namespaces (``ip netns``), all named ``rrdrill-*``: ``rrdrill-net`` holds a bridge,
and a veth pair joins it to each of ``rrdrill-head``, ``rrdrill-w1``, ``rrdrill-w2`` (the Ray nodes) and
``rrdrill-laptop`` (a machine that is no node), each with its own address in a private /24 checked to be unused by
this machine's interfaces and routes. Nothing joins the bridge to the machine's own network: all traffic stays
inside the namespaces. Every machine has a mount namespace of its own (``unshare --mount``, kept in
/run/rrdrill) with a private tmpfs over /tmp/ray (so no ``ray_current_cluster`` file of the drill's reaches the
machine's other Ray users); the workers and the laptop also have private tmpfs disks over the run-output folder
(/tmp/rrdrill/runs) and the model folder (/tmp/rrdrill/models): what a worker writes there the head never sees, and
a model directory on the head is absent on the workers. The head's disk is the machine's: it is where a driver
started on the head writes. Each node runs ``ray start --block`` with its own ``--node-ip-address``, ``--temp-dir``
and ``--num-cpus=1`` (one case: a head with ``--num-cpus=0``), ``RAY_AUTH_MODE=disabled``, usage stats off, the
dashboard on the head's address. This checkout's virtualenv serves every machine.

**The workload.** MiniLM (``minilm``) on the synthetic 12-class task, 20 clients, 4 a round, 4 rounds of 4 local
steps of 8 (:data:`WORKLOAD`), seed 0; drivers start with ``ip netns exec`` on the head (``resources.address=
HEAD:6379``) or the laptop. The cases that test a fault rather than placement run a pool that fits today's
placement (``resources.pool_size=3``: one 1-CPU actor per node); what they compute does not depend on resources.*.

(*) On this 2-core machine shared with other developers' test suites (load average 30-60): most of it is each
run's start-up (a model loaded by four processes at once) and the time it takes to call a run hung; on a quiet
machine, and once nothing hangs, less. Every case is selectable with ``--cases``; ``reference`` runs first when an
earlier drill's reference of the same workload is not saved.

**The faults.** A node is killed as a machine goes down: every process of its ``ray start`` at once (SIGKILL),
1 s after round 1's row is written (round 2 is then under way; round 1 has no evaluation, so its row is written as
it ends). A lost worker is one with a client actor and without the server (the server's loss is its own case).
Ctrl-C is SIGINT to the driver's process group, as a terminal sends it.

**A row.** ``case``; ``outcome`` (finished, recovered, started over: a resume or a restarted server played the kept
rounds again, refused: one line and exit 2, failed, hung); what happened, in one line; ``seconds``: to recover
(from the fault to the row of the round it hit, the resume included where the case needs one), or to fail or
hang; ``rows lost``: rounds missing from metrics.csv on the driver's machine when the case ended (``-``: the
command refused before any round, as it should); ``metrics equal``: metrics.csv against the fault-free
``reference`` case's (same workload and seed), every column but the wall-clock ones (wall_s, round_s, agg_s,
eval_s): ``yes``, ``yes but <columns>`` when only the fault counts (failed_clients, server_restarts, ...) differ,
``no: <columns>``, ``-`` without rows. A run is hung when round 1's row has not come twice the reference's
start-up after its start, or metrics.csv has not changed for one and a half times that since (:class:`Limits`);
a command expected to answer does so in 60 s. A hung command is stopped the way a user would: Ctrl-C (what it did
is recorded), then SIGTERM and SIGKILL.

**The machine as it was.** The drill stops only what it started: each ``ray start`` and driver in a session of
its own, stopped by process group and descendants with their start times checked (benchmarks/processes.py),
never with ``ray stop``; at the end every process left in its namespaces. It then unmounts its mount namespaces
and deletes its network namespaces (their veths and bridge go with them) and /tmp/rrdrill, on success, failure,
Ctrl-C, SIGTERM or SIGHUP. A drill killed with SIGKILL leaves them until the next drill, which removes them first
(one drill at a time: /run/rrdrill.lock).

Writes benchmarks/out/cluster_drill/{drill.md,drill.csv,drill.json}, each case's metrics.csv and command logs
there, and prints the table; ``--write-results`` also replaces the section "## Faults survived on a real 3-node
cluster" of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import fcntl
import ipaddress
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from io import StringIO
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
from processes import processes_of, signal_all, stop_processes  # noqa: E402
from systems import md_table  # noqa: E402

from ravan_ray.results import TIMING_COLUMNS  # noqa: E402

BIN = Path(sys.executable).parent
OUT = ROOT / "benchmarks" / "out" / "cluster_drill"
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
SECTION = "## Faults survived on a real 3-node cluster"

PREFIX = "rrdrill"
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # colours in Ray's log lines
LOCK = Path(f"/run/{PREFIX}.lock")
STATE = Path(f"/run/{PREFIX}")  # the persistent mount namespaces
WORK = Path(f"/tmp/{PREFIX}")  # short: Ray's socket paths under --temp-dir have a length limit
RUNS, MODELS = WORK / "runs", WORK / "models"
SUBNETS = [f"10.{a}.{b}.0/24" for a in (213, 214) for b in (77, 78, 79)]
GCS_PORT, DASHBOARD_PORT, CLIENT_PORT = 6379, 8265, 10001
OBJECT_STORE_BYTES = 300 * 1024 * 1024  # per node; the weights shared by share_frozen_weights fit (90 MB)

WORKLOAD = ["seed=0", "model.name=minilm", "data.name=synthetic", "data.max_train_samples=800",
            "data.max_test_samples=200", "federation.num_clients=20", "federation.clients_per_round=4",
            "federation.rounds=4", "federation.local_steps=4", "federation.batch_size=8", "federation.eval_every=2"]
ROUNDS = 4
# A fault comes FAULT_DELAY_S after round 1's row is written: in round 2, whose clients then train (round 1 has no
# evaluation, so its row is written as it ends; a round takes several seconds).
FAULT_DELAY_S = 1.0
FITS_TODAY = ["resources.pool_size=3"]  # one 1-CPU actor per node (the default sizing is the fragmentation case)
FAULT_COUNTS = ("clients", "failed_clients", "dropped_clients", "rejected_uploads", "server_restarts")

# Time limits (s). A round takes seconds; a run's start-up (data, and the model loaded on every node) ~80 s on a
# loaded 2-core machine. A run is hung when round 1's row has not come ``Limits.start_s`` after its start, or its
# metrics.csv has not changed for ``Limits.stall_s`` since (a lost actor's replacement loads its model, as at
# start-up). Both grow with the reference run's own start-up, so a busy machine does not read as a hang.
START_LIMIT_S = 150
STALL_S = 90


@dataclass
class Limits:
    start_s: float = START_LIMIT_S
    stall_s: float = STALL_S

    def scale(self, reference_start_s: float) -> None:
        """Twice the reference's time to its first row for a start-up, one and a half for a stall."""
        self.start_s = max(START_LIMIT_S, 2 * reference_start_s)
        self.stall_s = max(STALL_S, 1.5 * reference_start_s)


LIMITS = Limits()
RUN_LIMIT_S = 420  # a run's whole life, however it progresses
HEAD_LOST_LIMIT_S = 90  # a driver whose head died, until it ends (Ray's own GCS timeout is 60 s)
ANSWER_LIMIT_S = 60  # a command expected to answer (or refuse) quickly
CTRL_C_GRACE_S = 20  # how long a Ctrl-C gets before the drill stops the command itself
NODE_LIMIT_S = 120  # a node (re)start until the cluster lists it alive

ENV = {"PATH": f"{BIN}:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8",
       "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
       "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}


# ------------------------------------------------------------------------------------------------ machines
@dataclass
class Host:
    """One machine of the drill: a network namespace with one address, and a mount namespace whose ``private``
    folders are tmpfs disks of its own."""
    name: str
    ip: str = ""
    private: tuple[Path, ...] = ()

    @property
    def netns(self) -> str:
        return f"{PREFIX}-{self.name}"

    @property
    def mnt(self) -> Path:
        return STATE / f"mnt-{self.name}"

    def argv(self, command: list[str]) -> list[str]:
        """``command`` run on this machine (``ip netns exec`` inside its mount namespace)."""
        return ["nsenter", f"--mount={self.mnt}", "ip", "netns", "exec", self.netns, *command]

    def run(self, command: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(command), capture_output=True, text=True, timeout=timeout, env=ENV)

    def files(self, command: list[str]) -> subprocess.CompletedProcess:
        """A file command in this machine's mount namespace (its own disks)."""
        return subprocess.run(["nsenter", f"--mount={self.mnt}", *command], capture_output=True, text=True,
                              timeout=60)

    def read(self, path: Path) -> Optional[str]:
        done = self.files(["cat", str(path)])
        return done.stdout if done.returncode == 0 else None

    def listdir(self, path: Path) -> list[str]:
        done = self.files(["ls", "-1", str(path)])
        return done.stdout.split() if done.returncode == 0 else []


HEAD = Host("head", private=(Path("/tmp/ray"),))
W1 = Host("w1", private=(Path("/tmp/ray"), RUNS, MODELS))
W2 = Host("w2", private=(Path("/tmp/ray"), RUNS, MODELS))
LAPTOP = Host("laptop", private=(Path("/tmp/ray"), RUNS, MODELS))
HOSTS = (HEAD, W1, W2, LAPTOP)
NODES = (HEAD, W1, W2)


def sh(*command: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}: {done.stderr.strip() or done.stdout.strip()}")
    return done


def ensure_tools() -> None:
    """ip (iproute2), unshare and nsenter (util-linux): installed with apt-get where missing."""
    if all(shutil.which(tool) for tool in ("ip", "unshare", "nsenter")):
        return
    print("installing iproute2 and util-linux", flush=True)
    if subprocess.run(["apt-get", "install", "-y", "-q", "iproute2", "util-linux"]).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-q", "iproute2", "util-linux"], check=True)


def free_subnet() -> ipaddress.IPv4Network:
    """The first candidate /24 that no interface address or route of this machine overlaps."""
    used = []
    for entry in json.loads(sh("ip", "-j", "-4", "addr").stdout):
        used += [ipaddress.ip_interface(f"{a['local']}/{a['prefixlen']}").network for a in entry.get("addr_info", [])]
    for route in json.loads(sh("ip", "-j", "-4", "route", "show", "table", "all").stdout):
        if route.get("dst", "default") not in ("default", ""):
            used.append(ipaddress.ip_network(route["dst"], strict=False))
    for candidate in map(ipaddress.ip_network, SUBNETS):
        if not any(candidate.overlaps(net) for net in used if net.prefixlen > 0):
            return candidate
    raise RuntimeError(f"every candidate subnet ({', '.join(SUBNETS)}) is in use on this machine")


class Lab:
    """The namespaces, disks and processes of one drill; :meth:`teardown` removes all of them."""

    def __init__(self):
        self.lock_handle = None
        self.created_tmp_ray = False

    def __enter__(self) -> "Lab":
        LOCK.parent.mkdir(parents=True, exist_ok=True)
        self.lock_handle = open(LOCK, "a+")
        try:
            fcntl.flock(self.lock_handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(f"cluster_drill: another drill holds {LOCK}; one at a time") from None
        self.teardown(quiet=True)  # what a drill killed with SIGKILL left behind
        try:
            self._build()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.teardown()

    def _build(self) -> None:
        subnet = free_subnet()
        hosts = list(subnet.hosts())
        for index, host in enumerate(HOSTS):
            host.ip = str(hosts[index + 1])  # .2 head, .3 w1, .4 w2, .5 laptop (.1 stays free)
        print(f"network: {subnet} in namespaces {PREFIX}-*, "
              + ", ".join(f"{h.name} {h.ip}" for h in HOSTS), flush=True)
        sh("ip", "netns", "add", f"{PREFIX}-net")
        sh("ip", "-n", f"{PREFIX}-net", "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", f"{PREFIX}-net", "link", "set", "br0", "up")
        for host in HOSTS:
            sh("ip", "netns", "add", host.netns)
            sh("ip", "link", "add", "eth0", "netns", host.netns, "type", "veth",
               "peer", "name", f"v-{host.name}", "netns", f"{PREFIX}-net")
            sh("ip", "-n", f"{PREFIX}-net", "link", "set", f"v-{host.name}", "master", "br0", "up")
            sh("ip", "-n", host.netns, "addr", "add", f"{host.ip}/{subnet.prefixlen}", "dev", "eth0")
            sh("ip", "-n", host.netns, "link", "set", "eth0", "up")
            sh("ip", "-n", host.netns, "link", "set", "lo", "up")
        # A mount namespace is kept by bind-mounting its nsfs file, which needs a private mount to live on.
        STATE.mkdir(parents=True, exist_ok=True)
        sh("mount", "--bind", str(STATE), str(STATE))
        sh("mount", "--make-private", str(STATE))
        for folder in (RUNS, MODELS):
            folder.mkdir(parents=True, exist_ok=True)
        if not Path("/tmp/ray").exists():
            Path("/tmp/ray").mkdir(mode=0o1777)
            self.created_tmp_ray = True
        for host in HOSTS:
            host.mnt.touch()
            mounts = " && ".join(f"mount -t tmpfs -o size=1g,mode=1777 {PREFIX}-{host.name} {folder}"
                                 for folder in host.private)
            sh("unshare", f"--mount={host.mnt}", "--propagation", "private", "sh", "-c", mounts)

    def teardown(self, quiet: bool = False) -> None:
        """Stop every process in the drill's network namespaces, unmount its mount namespaces, delete its
        namespaces and scratch folder. Safe to call twice; no signal stops it half way."""
        handlers = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            names = [f"{PREFIX}-net"] + [h.netns for h in HOSTS]
            stop_processes(namespace_processes([Path("/run/netns") / n for n in names], "net"), grace_s=5)
            for host in HOSTS:
                if host.mnt.exists():
                    sh("umount", str(host.mnt), check=False)
            if STATE.exists():
                sh("umount", str(STATE), check=False)
                shutil.rmtree(STATE, ignore_errors=True)
            existing = set(sh("ip", "netns", "list", check=False).stdout.split())
            for name in names:
                if name in existing:
                    sh("ip", "netns", "del", name, check=False)
            shutil.rmtree(WORK, ignore_errors=True)
            if self.created_tmp_ray:
                try:
                    Path("/tmp/ray").rmdir()
                except OSError:
                    pass
            if not quiet:
                left = [n for n in names if n in set(sh("ip", "netns", "list", check=False).stdout.split())]
                mounts = [line for line in Path("/proc/mounts").read_text().splitlines() if PREFIX in line]
                print("cleaned up: namespaces, mounts and processes of the drill removed"
                      if not left and not mounts else f"cleanup left namespaces {left} mounts {mounts}", flush=True)
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)


def namespace_processes(ns_files: list[Path], kind: str) -> dict[int, str]:
    """Every process inside the given namespaces (matched by the nsfs inode), with its start time."""
    inodes = set()
    for path in ns_files:
        try:
            inodes.add(os.stat(path).st_ino)
        except OSError:
            pass
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}/ns/{kind}").st_ino in inodes:
                    found[int(entry)] = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[19]
            except (OSError, IndexError):
                pass
    return found


# ------------------------------------------------------------------------------------------------ commands
class Command:
    """A command the drill started on one machine, in a session of its own, its output in a log file."""

    def __init__(self, host: Host, command: list[str], log: Path):
        self.host, self.log = host, log
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as handle:
            handle.write(f"$ [{host.name}] {' '.join(command)}\n")
            handle.flush()
            self.popen = subprocess.Popen(host.argv(command), stdout=handle, stderr=subprocess.STDOUT, env=ENV,
                                          start_new_session=True, cwd=WORK)
        self.started = time.monotonic()

    @property
    def code(self) -> Optional[int]:
        return self.popen.poll()

    def wait(self, limit_s: float, until: Callable[[], bool] = lambda: False) -> bool:
        """Wait until the command ends or ``until()`` holds (True), or ``limit_s`` passes (False)."""
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            if self.code is not None or until():
                return True
            time.sleep(0.5)
        return self.code is not None or until()

    def interrupt(self, grace_s: float = CTRL_C_GRACE_S) -> Optional[float]:
        """Ctrl-C (SIGINT to the command's process group, as a terminal sends it); the seconds until the command
        ended, or None when it was still running after ``grace_s``."""
        sent = time.monotonic()
        try:
            os.killpg(self.popen.pid, signal.SIGINT)
        except OSError:
            pass
        return time.monotonic() - sent if self.wait(grace_s) else None

    def stop(self) -> None:
        stop_processes(processes_of(self.popen.pid), grace_s=5)
        self.popen.wait(timeout=10)

    def end_hung(self) -> str:
        """Stop a command that outlived its limit as a user would, Ctrl-C first; says what Ctrl-C did."""
        took = self.interrupt()
        self.stop()
        return f"Ctrl-C ended it in {took:.0f} s" if took is not None else f"Ctrl-C did not end it in {CTRL_C_GRACE_S} s"

    def output(self) -> str:
        return self.log.read_text(errors="replace").split("\n", 1)[-1]

    def last_line(self) -> str:
        lines = [line.strip() for line in self.output().splitlines() if line.strip()]
        return lines[-1][:160] if lines else "(nothing printed)"

    def one_line_error(self) -> bool:
        """The command failed as the platform means bad input to: exit 2, one line, no traceback."""
        return self.code == 2 and "Traceback" not in self.output()


class RayNode:
    """``ray start --block`` on one machine: the head, or a worker joining it."""

    def __init__(self, host: Host, head: Optional[Host], num_cpus: int = 1, name: Optional[str] = None):
        self.host, self.head, self.num_cpus = host, head, num_cpus
        self.name = name or host.name
        self.command: Optional[Command] = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        temp_dir = WORK / f"t-{self.name}"
        common = ["--block", f"--node-ip-address={self.host.ip}", f"--temp-dir={temp_dir}",
                  f"--num-cpus={self.num_cpus}", "--num-gpus=0", "--disable-usage-stats",
                  f"--object-store-memory={OBJECT_STORE_BYTES}"]
        if self.head is None:
            args = ["--head", f"--port={GCS_PORT}", f"--dashboard-host={self.host.ip}",
                    f"--dashboard-port={DASHBOARD_PORT}", f"--ray-client-server-port={CLIENT_PORT}"]
        else:
            args = [f"--address={self.head.ip}:{GCS_PORT}"]
        self.command = Command(self.host, [str(BIN / "ray"), "start", *args, *common],
                               OUT / "logs" / f"node-{self.name}-{self.starts}.log")

    def running(self) -> bool:
        return self.command is not None and self.command.code is None

    def crash(self) -> None:
        """The whole node at once, as if its machine went down: raylet, GCS (head), workers, actors."""
        if self.command is not None:
            signal_all(processes_of(self.command.popen.pid), signal.SIGKILL)
            self.command.popen.wait(timeout=30)

    def stop(self) -> None:
        if self.command is not None and self.command.code is None:
            self.command.stop()


class Cluster:
    """The head and the two workers; :meth:`up` (re)starts what is not running and waits for all three."""

    def __init__(self):
        self.head_cpus = 1
        self.nodes: dict[str, RayNode] = {}

    @property
    def address(self) -> str:
        return f"{HEAD.ip}:{GCS_PORT}"

    def up(self, head_cpus: int = 1) -> None:
        if head_cpus != self.head_cpus or not self.nodes.get("head", RayNode(HEAD, None)).running():
            self.down()  # a new head: the workers join it afresh
        self.head_cpus = head_cpus
        self.nodes.setdefault("head", RayNode(HEAD, None, head_cpus))
        for host in (W1, W2):
            self.nodes.setdefault(host.name, RayNode(host, HEAD))
        started = time.monotonic()
        for node in self.nodes.values():
            if not node.running():
                node.start()
                if node.head is None:
                    self._wait_for(lambda s: s is not None, "the head's dashboard")
        # Each node registered ('ray start' says so), and a node killed before gone from the list: the GCS takes
        # its health checks' time to declare it dead, and its replacement has the same address.
        self._wait_for(lambda s: all("Ray runtime started" in n.command.output() for n in self.nodes.values())
                       and s is not None and sorted(s["nodes"]) == sorted(h.name for h in NODES), "3 nodes alive")
        self._wait_for(lambda s: not [a for a in s["actors"] if a["state"] in ("ALIVE", "PENDING_CREATION",
                                                                               "RESTARTING")],
                       "no actor left from the last case")
        print(f"  cluster up: head ({head_cpus} CPU), w1, w2 (1 CPU each) in {time.monotonic() - started:.0f} s",
              flush=True)

    def _wait_for(self, ready: Callable[[Optional[dict]], bool], what: str) -> dict:
        """Poll the head until ``ready(state)``; a node whose 'ray start' exits (on a busy machine Ray's own start-up
        timeout can pass) is started again, twice at most."""
        deadline = time.monotonic() + NODE_LIMIT_S
        while time.monotonic() < deadline:
            for node in self.nodes.values():
                if node.command is not None and node.command.code is not None:
                    if node.starts >= 3:
                        raise RuntimeError(f"ray start on {node.name} exited: {node.command.last_line()}")
                    print(f"  ray start on {node.name} exited ({node.command.last_line()[:80]}); again", flush=True)
                    node.start()
                    deadline = time.monotonic() + NODE_LIMIT_S
            seen = self.state()
            if ready(seen):
                return seen
            time.sleep(2)
        raise RuntimeError(f"the cluster did not get to '{what}' in {NODE_LIMIT_S} s")

    def state(self) -> Optional[dict]:
        """The nodes alive and the actors (class, state, machine) as the head's dashboard lists them; None when
        it does not answer."""
        done = HEAD.run([str(BIN / "python"), "-c", STATE_PROBE, f"http://{HEAD.ip}:{DASHBOARD_PORT}"], timeout=60)
        try:
            seen = json.loads(done.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            return None
        names = {h.ip: h.name for h in HOSTS}
        for actor in seen["actors"]:
            actor["host"] = names.get(actor.pop("ip"), "?")
        seen["nodes"] = [names.get(ip, ip) for ip in seen["nodes"]]
        return seen

    def placement(self) -> str:
        """Where the run's actors are: 'clients on head, w1, w2; server on w2'."""
        where = self.hosts_of()
        return "; ".join(f"{role} on {', '.join(where[role]) or 'none'}" for role in ("clients", "server"))

    def hosts_of(self) -> dict[str, list[str]]:
        """The machines of the live client actors and of the parameter server."""
        seen = self.state() or {"actors": []}
        alive_actors = [a for a in seen["actors"] if a["state"] == "ALIVE"]
        return {role: sorted(a["host"] for a in alive_actors if a["class"] == cls)
                for role, cls in (("clients", "ClientActor"), ("server", "ParameterServer"))}

    def actor_states(self, cls: str) -> str:
        seen = self.state() or {"actors": []}
        counts: dict[str, int] = {}
        for actor in seen["actors"]:
            if actor["class"] == cls and actor["state"] != "DEAD":
                counts[actor["state"]] = counts.get(actor["state"], 0) + 1
        return ", ".join(f"{n} {state}" for state, n in sorted(counts.items())) or "none"

    def down(self) -> None:
        for node in self.nodes.values():
            node.stop()
        self.nodes.clear()


STATE_PROBE = r"""
import json, sys
from ray.util.state import list_actors, list_nodes
address = sys.argv[1]
try:
    nodes = list_nodes(address=address, limit=100, raise_on_missing_output=False)
    ips = {n.node_id: n.node_ip for n in nodes}
    actors = list_actors(address=address, limit=10000, raise_on_missing_output=False)
except Exception:
    sys.exit(1)
print(json.dumps({"nodes": [n.node_ip for n in nodes if n.state == "ALIVE"],
                  "actors": [{"class": a.class_name, "state": a.state, "ip": ips.get(a.node_id)} for a in actors]}))
"""


# ------------------------------------------------------------------------------------------------ runs
def times(count: int) -> str:
    return "once" if count == 1 else f"{count} times"


def sets(overrides: list[str]) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


@dataclass
class Run:
    """A run directory on one machine (its driver's)."""
    host: Host
    path: Path

    def metrics(self) -> Optional[pd.DataFrame]:
        text = self.host.read(self.path / "metrics.csv")
        if not text or not text.strip():
            return None
        frame = pd.read_csv(StringIO(text))
        return frame if len(frame) else None

    def rows(self) -> int:
        frame = self.metrics()
        return 0 if frame is None else len(frame)

    def checkpoints(self) -> list[str]:
        return self.host.listdir(self.path / "checkpoints")


def checkpoints_where(path: Path) -> str:
    """Which machines hold checkpoints of the run directory ``path``, each on its own disk: 'w2 (1, 2)'."""
    found = []
    for host in HOSTS:
        rounds = [n.removeprefix("round_").lstrip("0") for n in host.listdir(path / "checkpoints")
                  if n.startswith("round_") and "." not in n]
        if rounds:
            found.append(f"{host.name} ({', '.join(rounds)})")
    return "; ".join(found) or "nowhere"


def ravan(host: Host, case: str, args: list[str], log_name: str = "driver") -> Command:
    return Command(host, [str(BIN / "ravan-ray"), *args], OUT / "logs" / f"{case}-{log_name}.log")


def start_run(case: str, overrides: list[str], host: Host = HEAD, address: Optional[str] = "gcs",
              name: Optional[str] = None) -> tuple[Command, Run]:
    """``ravan-ray run`` of the workload on ``host`` into RUNS/<name>; ``address``: 'gcs' (HEAD:6379), a full
    address, or None (no address: the command picks its Ray)."""
    run = Run(host, RUNS / (name or case))
    extra = [] if address is None else [f"resources.address={HEAD.ip}:{GCS_PORT}" if address == "gcs" else
                                        f"resources.address={address}"]
    return ravan(host, name or case, ["run", "--output", str(run.path), *sets(WORKLOAD + extra + overrides)]), run


def played_again(before: Optional[pd.DataFrame], after: Optional[pd.DataFrame]) -> bool:
    """Whether a resume wrote the rounds it found in metrics.csv again (they hold other wall-clock times): it
    started over instead of continuing."""
    if before is None or after is None:
        return False
    kept = before.merge(after, on="round", suffixes=("", "_after"))
    return bool(len(kept)) and not np.allclose(kept["wall_s"], kept["wall_s_after"], rtol=0, atol=1e-9)


def follow(command: Command, run: Run, until: Callable[[], bool] = lambda: False,
           start_limit_s: Optional[float] = None, hung_if: Callable[[], bool] = lambda: False) -> bool:
    """Wait while the run makes progress: True when the command ended or ``until()`` holds; False when it hung
    (no row ``start_limit_s`` (default: LIMITS.start_s) after the command started, metrics.csv unchanged for
    LIMITS.stall_s since, ``hung_if()``, or RUN_LIMIT_S in all)."""
    start_limit_s = LIMITS.start_s if start_limit_s is None else start_limit_s
    seen, changed = run.host.read(run.path / "metrics.csv"), time.monotonic()
    while command.code is None and not until():
        now = time.monotonic()
        if hung_if() or now - command.started > RUN_LIMIT_S:
            return False
        text = run.host.read(run.path / "metrics.csv")
        if text != seen:
            seen, changed = text, now
        elif (now - changed > LIMITS.stall_s) if text else (now - command.started > start_limit_s):
            return False
        time.sleep(1)
    return True


def after_fault(command: Command, run: Run, fault: float, in_round: int) -> tuple[Optional[float], str]:
    """Follow a run after a fault in round ``in_round``: the seconds from the fault until that round's row (None:
    it never came), and what became of the run, in a few words."""
    recovered = None
    if follow(command, run, until=lambda: run.rows() >= in_round, start_limit_s=0):
        recovered = time.monotonic() - fault if run.rows() >= in_round else None
        follow(command, run, start_limit_s=0)
    said = [f"round {in_round}'s row came {recovered:.0f} s after it" if recovered is not None else
            f"no row for round {in_round}"]
    rows = run.rows()
    if command.code is None:
        said.append(f"hung {'with all rows written' if rows == ROUNDS else f'in round {rows + 1}'} "
                    f"({time.monotonic() - fault:.0f} s after the fault)")
    else:
        said.append(f"{ended(command)} with {rows} rows")
    return recovered, "; ".join(said)


def fault_due(drill: Drill, case: str, command: Command, run: Run, rows: int = 1,
              delay_s: float = FAULT_DELAY_S) -> bool:
    """Follow the run until ``rows`` rows are written, then ``delay_s`` (the next round is under way); False,
    with the case's row recorded, when it never got there."""
    if follow(command, run, until=lambda: run.rows() >= rows) and run.rows() >= rows:
        time.sleep(delay_s)
        return True
    said = ended(command) if command.code is not None else "hung"
    drill.finish(case, command, run, f"never finished round {rows} ({said})", time.monotonic() - command.started)
    return False


# ------------------------------------------------------------------------------------------------ rows
@dataclass
class Row:
    case: str
    outcome: str  # finished / recovered / refused / failed / hung
    happened: str
    seconds: Optional[float]
    rows_lost: Optional[int]
    metrics_equal: str


def compare(frame: Optional[pd.DataFrame], reference: Optional[pd.DataFrame]) -> str:
    """metrics.csv against the reference's on the rounds both have, every column but the wall-clock ones:
    'yes', 'yes but <fault counts>' (only failed_clients, clients, ... differ), 'no: <columns>', or '-'."""
    if frame is None or reference is None:
        return "-"
    ours, theirs = frame.set_index("round"), reference.set_index("round")
    rounds = ours.index.intersection(theirs.index)
    if not len(rounds):
        return "-"
    differ = []
    for column in theirs.columns:
        if column in TIMING_COLUMNS:
            continue
        if column not in ours.columns:
            differ.append(column)
            continue
        a, b = ours.loc[rounds, column], theirs.loc[rounds, column]
        both_empty = a.isna() & b.isna()
        numeric = pd.api.types.is_numeric_dtype(a) and pd.api.types.is_numeric_dtype(b)
        same = (both_empty | np.isclose(a.astype(float), b.astype(float), rtol=1e-9, atol=0.0)) if numeric \
            else (both_empty | (a.astype(str) == b.astype(str)))
        if not bool(same.all()):
            differ.append(column)
    partial = f" ({len(rounds)} of {len(theirs)} rounds)" if len(rounds) < len(theirs) else ""
    if not differ:
        return "yes" + partial
    if all(c in FAULT_COUNTS for c in differ):
        return f"yes but {', '.join(differ)}{partial}"
    return f"no: {', '.join(differ)}{partial}"


def rows_lost(frame: Optional[pd.DataFrame], command: Optional[Command] = None) -> Optional[int]:
    """Rounds missing from metrics.csv; None when the command refused (one line, exit 2) before any round."""
    if frame is None and command is not None and command.one_line_error():
        return None
    return ROUNDS - (0 if frame is None else frame["round"].nunique())


def save_metrics(case: str, run: Run) -> Optional[pd.DataFrame]:
    frame = run.metrics()
    if frame is not None:
        (OUT / "runs" / case).mkdir(parents=True, exist_ok=True)
        frame.to_csv(OUT / "runs" / case / "metrics.csv", index=False)
    return frame


CREATION_FAILED = re.compile(r"\((ClientActor|ParameterServer) pid=\d+, ip=([\d.]+)\).*error raised in its creation task")


def creation_failures(output: str) -> str:
    """Which actors failed in their constructor, where, from the remote errors a driver printed: 'ClientActor on
    w1, w2; ParameterServer on w2'."""
    names = {h.ip: h.name for h in HOSTS}
    found: dict[str, set[str]] = {}
    for match in CREATION_FAILED.finditer(ANSI.sub("", output)):
        found.setdefault(match.group(1), set()).add(names.get(match.group(2), match.group(2)))
    return "; ".join(f"{cls} on {', '.join(sorted(where))}" for cls, where in sorted(found.items()))


ERROR_LINE = re.compile(r"^\s*([\w.]+(?:Error|Exception|Interrupt)\b.*)$")


def ended(command: Command) -> str:
    """How a command ended, in a few words: its exit code and last line (after a traceback: its last error line)."""
    if command.code == 0:
        return "exit 0"
    output = ANSI.sub("", command.output())
    traceback = "Traceback" in output
    errors = [m.group(1) for m in map(ERROR_LINE.match, output.splitlines()) if m] if traceback else []
    said = errors[-1][:160] if errors else command.last_line()
    kind = "one line" if command.one_line_error() else ("traceback" if traceback else "")
    return f"exit {command.code}{', ' + kind if kind else ''}: '{said}'"


def run_outcome(command: Command, frame: Optional[pd.DataFrame], fault: bool, started_over: bool = False) -> str:
    if command.code is None:
        return "hung"
    if command.code == 0 and frame is not None and frame["round"].nunique() == ROUNDS:
        return "started over" if started_over else ("recovered" if fault else "finished")
    return "refused" if command.one_line_error() else "failed"


# ------------------------------------------------------------------------------------------------ cases
@dataclass
class Drill:
    cluster: Cluster = field(default_factory=Cluster)
    reference: Optional[pd.DataFrame] = None
    rows: list[Row] = field(default_factory=list)

    def add(self, row: Row) -> None:
        self.rows.append(row)
        seconds = "-" if row.seconds is None else f"{row.seconds:.0f} s"
        lost = "-" if row.rows_lost is None else row.rows_lost
        print(f"  -> {row.outcome}: {row.happened} [{seconds}, rows lost {lost}, metrics equal "
              f"{row.metrics_equal}]", flush=True)

    def finish(self, case: str, command: Command, run: Run, happened: str, seconds: Optional[float],
               fault: bool = False, expects_run: bool = True, started_over: bool = False) -> None:
        """A row for a run case: its outcome, rows lost and comparison read from the run directory
        (``expects_run``: False where the command should refuse, so no row is lost; ``started_over``: a resume
        played the kept rounds again)."""
        frame = save_metrics(case, run)
        outcome = run_outcome(command, frame, fault, started_over)
        if frame is not None and frame["failed_clients"].sum() and "failed " not in happened:
            happened += f"; clients a round {'/'.join(map(str, frame['clients']))}, failed " \
                        f"{'/'.join(map(str, frame['failed_clients']))}"
        if command.code is None:
            happened += f"; {command.end_hung()}"
        lost = rows_lost(frame, command) if expects_run else None
        self.add(Row(case, outcome, happened, seconds, lost, compare(frame, self.reference)))


def case_reference(drill: Drill) -> None:
    """The fault-free run every other case is compared with: attached to the 3-node cluster from the head."""
    drill.cluster.up()
    command, run = start_run("reference", FITS_TODAY)
    follow(command, run, until=lambda: run.rows() >= 1, start_limit_s=RUN_LIMIT_S)
    first_row_s = time.monotonic() - command.started
    placed = run.rows() and drill.cluster.placement()
    follow(command, run)
    seconds = time.monotonic() - command.started
    frame = save_metrics("reference", run)
    if command.code == 0 and frame is not None and frame["round"].nunique() == ROUNDS:
        drill.reference = frame
        LIMITS.scale(first_row_s)
        (OUT / "runs" / "reference" / "reference.json").write_text(
            json.dumps({"workload": WORKLOAD, "first_row_s": first_row_s}) + "\n")
        print(f"  round 1's row after {first_row_s:.0f} s: a run is hung with no row after {LIMITS.start_s:.0f} s, "
              f"or none new for {LIMITS.stall_s:.0f} s", flush=True)
    happened = f"{ended(command) if command.code is not None else 'hung'}; " \
               f"{0 if frame is None else frame['round'].nunique()} rounds; {placed or 'no placement seen'}; " \
               f"checkpoints on: {checkpoints_where(run.path)}"
    outcome = run_outcome(command, frame, False)
    if command.code is None:
        happened += f"; {command.end_hung()}"
    drill.add(Row("reference", outcome, happened, seconds, rows_lost(frame, command),
                  "reference" if drill.reference is not None else "-"))


def case_fragmentation(drill: Drill) -> None:
    """clients_per_round=4 on three 1-CPU nodes with the default pool sizing."""
    drill.cluster.up()
    command, run = start_run("fragmentation", [])
    placed = follow(command, run, until=lambda: run.rows() >= 1) and run.rows() and drill.cluster.placement()
    if placed:
        follow(command, run)
    rows = run.rows()
    if command.code is None:
        happened = (f"no row in {time.monotonic() - command.started:.0f} s" if rows == 0 else
                    f"{rows} rows, then none") + f"; client actors: {drill.cluster.actor_states('ClientActor')}; " \
            + ("nothing printed" if not command.output().strip() else f"last line '{command.last_line()}'")
    else:
        happened = f"{ended(command)}; {rows} rows; {placed or 'no placement seen'}"
    drill.finish("fragmentation", command, run, happened, time.monotonic() - command.started)


def _worker_lost(drill: Drill, case: str, policy: str) -> None:
    drill.cluster.up()
    command, run = start_run(case, FITS_TODAY + [f"federation.on_client_failure={policy}"])
    if not fault_due(drill, case, command, run, delay_s=0):
        return
    where = drill.cluster.hosts_of()  # takes seconds: the fault comes later in round 2
    # a worker with a client and without the server: this case loses clients only (server_node_lost the server)
    victim = next((h for h in ("w1", "w2") if h in where["clients"] and h not in where["server"]), "w1")
    in_round = run.rows() + 1
    drill.cluster.nodes[victim].crash()
    killed = time.monotonic()
    recovered, became = after_fault(command, run, killed, in_round)
    parts = [f"clients on {', '.join(where['clients'])}; server on {', '.join(where['server']) or 'none'}; "
             f"{victim} killed in round {in_round}", became]
    if command.code is None:
        parts.append(f"client actors: {drill.cluster.actor_states('ClientActor')}")
    drill.finish(case, command, run, "; ".join(parts),
                 recovered if recovered is not None else time.monotonic() - killed, fault=True)


def case_worker_lost_retry(drill: Drill) -> None:
    """A worker node killed mid-round (raylet and workers at once), on_client_failure=retry."""
    _worker_lost(drill, "worker_lost_retry", "retry")


def case_worker_lost_skip(drill: Drill) -> None:
    """The same, on_client_failure=skip."""
    _worker_lost(drill, "worker_lost_skip", "skip")


def case_server_node_lost(drill: Drill) -> None:
    """The parameter server's node killed mid-round, with a CPU spare elsewhere (server_cpus=1, a pool of 1)."""
    drill.cluster.up()
    command, run = start_run("server_node_lost", ["resources.pool_size=1", "resources.server_cpus=1"])
    if not fault_due(drill, "server_node_lost", command, run, delay_s=0):
        return  # (the placement probe below takes seconds: the fault comes later in round 2)
    placed = drill.cluster.placement()
    server_host = placed.rsplit("server on ", 1)[-1]
    if server_host not in ("w1", "w2"):
        follow(command, run)
        drill.finish("server_node_lost", command, run, f"not run: {placed} (the case needs it on a worker)", None)
        return
    in_round, before = run.rows() + 1, run.metrics()
    drill.cluster.nodes[server_host].crash()
    killed = time.monotonic()
    recovered, became = after_fault(command, run, killed, in_round)
    frame = run.metrics()
    restarts = int(frame["server_restarts"].max()) if frame is not None else 0
    parts = [f"{placed}; {server_host} killed in round {in_round}", became, f"server restarts {restarts}"
             + (", played again from round 1" if played_again(before, frame) else ""),
             f"checkpoints on: {checkpoints_where(run.path)}"]
    if command.code is None:
        parts.append(f"server: {drill.cluster.actor_states('ParameterServer')}")
    drill.finish("server_node_lost", command, run, "; ".join(parts),
                 recovered if recovered is not None else time.monotonic() - killed, fault=True)


def resume_run(drill: Drill, case: str, run: Run, parts: list[str], fault: float,
               seconds: Optional[float] = None) -> None:
    """'ravan-ray resume' of an interrupted run on the driver's machine, and the case's row: ``seconds``, by default
    from ``fault`` to the first row beyond those kept, and whether it started over instead of continuing."""
    before = run.metrics()
    kept = 0 if before is None else len(before)
    resume = ravan(run.host, case, ["resume", str(run.path)], "resume")
    recovered = None
    if follow(resume, run, until=lambda: run.rows() > kept) and run.rows() > kept:
        recovered = time.monotonic() - fault
        follow(resume, run, start_limit_s=0)
    started_over = played_again(before, run.metrics())
    parts.append(f"resume: {ended(resume) if resume.code is not None else 'hung'}"
                 + (", started over from round 1" if started_over else ""))
    drill.finish(case, resume, run, "; ".join(parts), recovered if seconds is None else seconds, fault=True,
                 started_over=started_over)


def case_head_lost(drill: Drill) -> None:
    """The head killed mid-round (GCS, raylet, its workers), restarted; then 'ravan-ray resume' on it."""
    drill.cluster.up()
    command, run = start_run("head_lost", FITS_TODAY)
    if not fault_due(drill, "head_lost", command, run):
        return
    in_round = run.rows() + 1
    drill.cluster.nodes["head"].crash()
    killed = time.monotonic()
    if not command.wait(HEAD_LOST_LIMIT_S):
        drill.finish("head_lost", command, run, f"head killed in round {in_round}; the driver hung "
                     f"({HEAD_LOST_LIMIT_S} s)", HEAD_LOST_LIMIT_S, fault=True)
        return
    parts = [f"head killed in round {in_round}; the driver ended {time.monotonic() - killed:.0f} s later "
             f"({ended(command)}); rows kept: {run.rows()}; checkpoints on: {checkpoints_where(run.path)}",
             "cluster restarted"]
    drill.cluster.up()  # the workers' raylets end with their GCS; everything starts afresh
    resume_run(drill, "head_lost", run, parts, killed)


def case_ctrl_c(drill: Drill) -> None:
    """Ctrl-C (SIGINT to the driver's process group) mid-round, then 'ravan-ray resume'."""
    drill.cluster.up()
    command, run = start_run("ctrl_c", FITS_TODAY)
    if not fault_due(drill, "ctrl_c", command, run):
        return
    in_round = run.rows() + 1
    took = command.interrupt()
    if took is None:
        drill.finish("ctrl_c", command, run, f"Ctrl-C in round {in_round}: still running after {CTRL_C_GRACE_S} s",
                     CTRL_C_GRACE_S, fault=True)
        return
    parts = [f"Ctrl-C in round {in_round} ended the driver in {took:.1f} s ({ended(command)}); rows kept: "
             f"{run.rows()}; checkpoints on: {checkpoints_where(run.path)}"]
    resume_run(drill, "ctrl_c", run, parts, time.monotonic(), seconds=took)  # the seconds: what Ctrl-C took


def case_checkpoints_on_worker(drill: Drill) -> None:
    """A head with --num-cpus=0 and server_cpus=1: the server runs on a worker. The driver is killed after round
    2; then, on the driver's machine, where are the checkpoints, and what do export and resume do?"""
    drill.cluster.up(head_cpus=0)
    command, run = start_run("checkpoints_on_worker", ["resources.server_cpus=1"])
    if not fault_due(drill, "checkpoints_on_worker", command, run, rows=2):
        return
    placed = drill.cluster.placement()
    command.stop()  # the driver dies (SIGTERM, then SIGKILL): an interrupted run to export and resume
    stopped = time.monotonic()
    export = ravan(HEAD, "checkpoints_on_worker", ["export", str(run.path), "--format", "peft", "--output",
                                                   str(RUNS / "checkpoints_on_worker-export")], "export")
    if not export.wait(ANSWER_LIMIT_S):
        export.stop()
    parts = [f"{placed}; driver stopped after {run.rows()} rows; checkpoints on: {checkpoints_where(run.path)}",
             f"export: {ended(export) if export.code is not None else 'hung'}"]
    resume_run(drill, "checkpoints_on_worker", run, parts, stopped)
    drill.cluster.down()  # the next case wants a head with a CPU


def _model_on_head(drill: Drill, case: str, extra: list[str]) -> None:
    drill.cluster.up()
    local = MODELS / "minilm"
    if not local.exists():
        from ravan_ray.models import offline_minilm_path

        shutil.copytree(offline_minilm_path(), local)  # on the head's disk only: the workers have their own
    command, run = start_run(case, FITS_TODAY + [f"model.name={local}", *extra])
    placed = follow(command, run, until=lambda: run.rows() >= 1) and run.rows() and drill.cluster.placement()
    follow(command, run)
    visible = [h.name for h in NODES if h.listdir(local)]
    failed = creation_failures(command.output())
    happened = f"model directory on {', '.join(visible)} only; {placed or 'no round'}; " \
               f"failed to start: {failed or 'none'}; {ended(command) if command.code is not None else 'hung'}"
    drill.finish(case, command, run, happened, time.monotonic() - command.started)


def case_model_on_head(drill: Drill) -> None:
    """model.name=a directory that exists on the head only."""
    _model_on_head(drill, "model_on_head", [])


def case_model_on_head_shared(drill: Drill) -> None:
    """The same with resources.share_frozen_weights=true (weights through the object store)."""
    _model_on_head(drill, "model_on_head_shared", ["resources.share_frozen_weights=true"])


def case_laptop_gcs_address(drill: Drill) -> None:
    """From the laptop (no node), a plain GCS address: expected one line within seconds."""
    drill.cluster.up()
    command, run = start_run("laptop_gcs_address", FITS_TODAY, host=LAPTOP)
    answered = command.wait(ANSWER_LIMIT_S)
    seconds = time.monotonic() - command.started
    printed = len([line for line in command.output().splitlines() if line.strip()])
    happened = f"{ended(command)} ({printed} lines)" if answered else \
        f"no answer in {ANSWER_LIMIT_S} s, {printed} lines printed" + \
        (f", the last '{command.last_line()}'" if printed else "")
    drill.finish("laptop_gcs_address", command, run, happened, seconds, expects_run=False)


def case_laptop_job_submit(drill: Drill) -> None:
    """'ray job submit --working-dir' from the laptop; the job's driver runs on the head, writing there."""
    drill.cluster.up()
    run = Run(HEAD, RUNS / "laptop_job_submit")
    submission = f"{PREFIX}-{int(time.time())}"
    dashboard = f"http://{HEAD.ip}:{DASHBOARD_PORT}"
    excludes = json.dumps({"excludes": [".git", ".venv", "runs", "benchmarks/out"]})
    command = Command(LAPTOP, [str(BIN / "ray"), "job", "submit", "--address", dashboard, "--submission-id",
                               submission, "--working-dir", str(ROOT), "--runtime-env-json", excludes, "--",
                               "ravan-ray", "run", "--output", str(run.path), *sets(WORKLOAD + FITS_TODAY)],
                      OUT / "logs" / "laptop_job_submit-submit.log")
    follow(command, run, start_limit_s=LIMITS.start_s + 60)  # + packing, uploading and unpacking the code
    seconds = time.monotonic() - command.started
    if command.code is None:
        LAPTOP.run([str(BIN / "ray"), "job", "stop", "--address", dashboard, submission], timeout=60)
    happened = f"submit {ended(command) if command.code is not None else 'hung'}; {run.rows()} rows in the " \
               f"job's --output on the head"
    drill.finish("laptop_job_submit", command, run, happened, seconds)


def case_laptop_ray_client(drill: Drill) -> None:
    """Ray Client (ray://HEAD:10001) from the laptop: the driver's loop runs on the laptop, where its files go."""
    drill.cluster.up()
    command, run = start_run("laptop_ray_client", FITS_TODAY, host=LAPTOP,
                             address=f"ray://{HEAD.ip}:{CLIENT_PORT}")
    follow(command, run)
    retried = ""
    if command.code is not None and "Initialization failure from server" in command.output():
        # Ray's client proxy failed to start this client's server process (seen once on a loaded machine, with
        # nothing in that server's log): Ray's flake, not the run's; a second try says what the run does.
        retried = f"first try: Ray's client server did not start ('{command.last_line()[:70]}...'); second try: "
        command, run = start_run("laptop_ray_client", FITS_TODAY, host=LAPTOP,
                                 address=f"ray://{HEAD.ip}:{CLIENT_PORT}", name="laptop_ray_client-2")
        follow(command, run)
    seconds = time.monotonic() - command.started
    happened = f"{retried}{ended(command) if command.code is not None else 'hung'}; metrics.csv on the laptop: " \
               f"{run.rows()} rows; checkpoints on: {checkpoints_where(run.path)}"
    drill.finish("laptop_ray_client", command, run, happened, seconds)


def case_dead_cluster(drill: Drill) -> None:
    """On the laptop, a head started with 'ray start' (default temp dir) and killed without cleanup, so its
    address stays in /tmp/ray/ray_current_cluster; then 'ravan-ray run' and 'ravan-ray sweep' with no address."""
    drill.cluster.down()  # not needed; its CPUs are the machine's
    dead = RayNode(LAPTOP, None, name="dead-head")
    dead.command = Command(LAPTOP, [str(BIN / "ray"), "start", "--head", "--block", f"--node-ip-address={LAPTOP.ip}",
                                    "--port=6391", "--num-cpus=1", "--include-dashboard=false",
                                    "--disable-usage-stats", f"--object-store-memory={OBJECT_STORE_BYTES}"],
                           OUT / "logs" / "node-dead-head.log")
    address_file = Path("/tmp/ray/ray_current_cluster")
    dead.command.wait(NODE_LIMIT_S, lambda: bool(LAPTOP.read(address_file)))
    recorded = (LAPTOP.read(address_file) or "").strip()
    time.sleep(3)
    dead.crash()
    print(f"  dead head: {recorded or 'no address recorded'} in ray_current_cluster, killed", flush=True)

    def retrying(command: Command) -> Callable[[], bool]:
        """Hung: no row yet, a minute gone, and Ray's 'Failed to connect to GCS' printed."""
        return lambda: (time.monotonic() - command.started > ANSWER_LIMIT_S
                        and "Failed to connect to GCS" in command.output())

    command, run = start_run("dead_cluster_run", [], host=LAPTOP, address=None)
    follow(command, run, hung_if=lambda: run.rows() == 0 and retrying(command)())
    seconds = time.monotonic() - command.started
    happened = f"'{recorded}' in ray_current_cluster; " + (
        ended(command) if command.code is not None else
        f"'Failed to connect to GCS' printed {times(command.output().count('Failed to connect to GCS'))} in "
        f"{seconds:.0f} s")
    drill.finish("dead_cluster_run", command, run, happened, seconds)

    sweep_dir = RUNS / "dead_cluster_sweep"
    sweep = ravan(LAPTOP, "dead_cluster_sweep", ["sweep", str(ROOT / "tune_configs" / "smoke.yaml"), "--output",
                                                 str(sweep_dir)])
    sweep.wait(RUN_LIMIT_S, retrying(sweep))
    seconds = time.monotonic() - sweep.started
    results = LAPTOP.read(sweep_dir / "results.csv")
    trials = len(pd.read_csv(StringIO(results))) if results else 0
    if sweep.code is None:
        outcome = "hung"
        happened = (f"'Failed to connect to GCS' printed {times(sweep.output().count('Failed to connect to GCS'))} "
                    f"in {seconds:.0f} s; {sweep.end_hung()}")
    else:
        outcome = "finished" if sweep.code == 0 and trials else "failed"
        happened = f"{ended(sweep)}; {trials} trials in results.csv"
    drill.add(Row("dead_cluster_sweep", outcome, happened, seconds, None, "-"))
    LAPTOP.files(["rm", "-f", str(address_file)])


CASES: dict[str, Callable[[Drill], None]] = {
    # the 3 x 1-CPU cluster; cases that kill a node restart it afterwards
    "reference": case_reference,
    "fragmentation": case_fragmentation,
    "laptop_gcs_address": case_laptop_gcs_address,
    "laptop_job_submit": case_laptop_job_submit,
    "laptop_ray_client": case_laptop_ray_client,
    "model_on_head": case_model_on_head,
    "model_on_head_shared": case_model_on_head_shared,
    "ctrl_c": case_ctrl_c,
    "worker_lost_retry": case_worker_lost_retry,
    "worker_lost_skip": case_worker_lost_skip,
    "server_node_lost": case_server_node_lost,
    "head_lost": case_head_lost,
    # a head with --num-cpus=0
    "checkpoints_on_worker": case_checkpoints_on_worker,
    # no cluster: the laptop alone
    "dead_cluster": case_dead_cluster,
}


# ------------------------------------------------------------------------------------------------ tables
HEADER = ["case", "outcome", "what happened", "seconds", "rows lost", "metrics equal"]


def table_rows(rows: list[Row]) -> list[list[str]]:
    return [[r.case, r.outcome, r.happened.replace("|", "/"), "-" if r.seconds is None else f"{r.seconds:.0f}",
             "-" if r.rows_lost is None else str(r.rows_lost), r.metrics_equal] for r in rows]


def write_tables(rows: list[Row], meta: dict) -> str:
    """OUT/drill.{md,csv,json}; returns the markdown table."""
    OUT.mkdir(parents=True, exist_ok=True)
    table = md_table(HEADER, table_rows(rows))
    (OUT / "drill.md").write_text(table + "\n")
    pd.DataFrame([asdict(r) for r in rows]).to_csv(OUT / "drill.csv", index=False)
    (OUT / "drill.json").write_text(json.dumps({**meta, "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
    return table


def replace_section(text: str, title: str, body: str) -> str:
    """``text`` with the markdown section ``title`` (up to the next '## ' heading) replaced by ``title`` and
    ``body``, or with them appended when it has no such section."""
    lines = text.splitlines()
    new = [title, "", *body.strip("\n").splitlines(), ""]
    if title in lines:
        start = lines.index(title)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        lines[start:end] = new
    else:
        lines += ["", *new] if lines and lines[-1].strip() else new
    return "\n".join(lines).rstrip("\n") + "\n"


def results_body(table: str, meta: dict) -> str:
    return (f"Command: `{meta['command']}` ({meta['date']}, Ray {meta['ray']}, ravan-ray commit {meta['commit']}, "
            f"{meta['minutes']:.1f} min on {meta['machine']}, load average {meta['load']} at the start from other "
            "developers' work). Per case: benchmarks/out/cluster_drill/ (drill.csv, drill.json, each run's "
            "metrics.csv, every driver's and client command's log; the nodes' own logs stay on the machine).\n\n"
            "A head and two workers (`ray start`, 1 CPU each) and a laptop that is no node, each in its own network "
            "namespace with its own address, the workers and the laptop with disks of their own (tmpfs over the "
            "run and model folders); the workload: MiniLM on the synthetic task, 20 clients, 4 a round, 4 rounds, "
            "seed 0; a node is killed (all its processes at once) early in round 2 (benchmarks/cluster_drill.py "
            "says what each case does). `seconds`: to recover (from the fault to the row of the round it hit), or "
            "to fail or hang; `started over`: a resume or a restarted server played the kept rounds again (the "
            "checkpoints were on another machine); `rows lost`: rounds missing from metrics.csv on the driver's "
            "machine at the end; `metrics equal`: against the fault-free `reference` case, every column but the "
            f"wall-clock ones. Hung: no metrics.csv row {meta['hung_without_a_first_row_s']:.0f} s after a run's "
            f"start, or none new for {meta['hung_without_a_new_row_s']:.0f} s (twice and one and a half times the "
            "reference's start-up); a hung command is then sent Ctrl-C, as a user would.\n\n" + table + "\n")


# ------------------------------------------------------------------------------------------------ main
def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="all", help="comma-separated case names, or 'all' (see --list)")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--write-results", action="store_true",
                        help=f"replace the section '{SECTION}' of benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    if args.list:
        for name, case in CASES.items():
            print(f"{name:<22} {' '.join(case.__doc__.split())}")
        return 0
    chosen = list(CASES) if args.cases == "all" else [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in chosen if c not in CASES]
    if unknown:
        print(f"cluster_drill: unknown case {', '.join(unknown)}; --list shows them", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("cluster_drill: needs root (network and mount namespaces): sudo .venv/bin/python "
              "benchmarks/cluster_drill.py ...", file=sys.stderr)
        return 2
    ensure_tools()
    chosen = sorted(chosen, key=list(CASES).index)
    started = time.monotonic()
    load = f"{os.getloadavg()[0]:.1f}"  # how busy the shared machine was

    def interrupted(signum, _frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupted)
    drill = Drill()
    shutil.rmtree(OUT / "logs", ignore_errors=True)
    saved = OUT / "runs" / "reference"
    try:
        with Lab():
            known = json.loads((saved / "reference.json").read_text()) if (saved / "reference.json").is_file() \
                else {}
            if "reference" not in chosen and known.get("workload") == WORKLOAD:
                drill.reference = pd.read_csv(saved / "metrics.csv")  # an earlier drill's, of the same workload
                LIMITS.scale(known["first_row_s"])
            elif "reference" not in chosen:
                chosen.insert(0, "reference")
            for name in chosen:
                print(f"case {name}: {' '.join(CASES[name].__doc__.split())}", flush=True)
                case_started = time.monotonic()
                try:
                    CASES[name](drill)
                except (RuntimeError, subprocess.TimeoutExpired) as error:
                    drill.add(Row(name, "drill error", str(error)[:200], None, None, "-"))
                    drill.cluster.down()
                print(f"  ({time.monotonic() - case_started:.0f} s)", flush=True)
            drill.cluster.down()
    except KeyboardInterrupt as stop:
        print(f"cluster_drill: stopped ({stop or 'SIGINT'}); the machine is cleaned up", file=sys.stderr)
        return 130
    finally:
        if drill.rows:
            meta = run_meta(args, time.monotonic() - started, load)
            table = write_tables(drill.rows, meta)
            print("\n" + table)
            if args.write_results:
                RESULTS.write_text(replace_section(RESULTS.read_text(), SECTION, results_body(table, meta)))
                print(f"wrote the section '{SECTION}' of {RESULTS}")
    return 0


def run_meta(args: argparse.Namespace, seconds: float, load: str) -> dict:
    import ray

    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    cases = "all" if args.cases == "all" else args.cases
    return {"command": f"sudo .venv/bin/python benchmarks/cluster_drill.py --cases {cases}"
                       + (" --write-results" if args.write_results else ""),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "ray": ray.__version__,
            "commit": commit, "minutes": seconds / 60, "load": load, "machine": f"{os.cpu_count()} CPUs, {platform.machine()}",
            "workload": WORKLOAD, "hung_without_a_first_row_s": LIMITS.start_s, "hung_without_a_new_row_s": LIMITS.stall_s}


if __name__ == "__main__":
    sys.exit(main())
