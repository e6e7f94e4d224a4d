"""The processes one launched command started, and only those, and how to stop them by pid.

A command started in a session of its own (``subprocess.Popen(..., start_new_session=True)``, e.g. ``ray start
--block``) owns its process group and every descendant of that group (Ray's GCS, raylet, workers, actors, a job's
driver). They are found from /proc with their start times, so a pid the kernel has since given to another process
is never signalled. Never ``ray stop`` instead: it ends every Ray process on the machine, other users' too.

Used by tests/test_cluster.py (a head started for one test) and benchmarks/cluster_drill.py (the nodes of a cluster).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Optional

Victims = dict[int, str]  # pid -> its start time (field 22 of /proc/PID/stat, in clock ticks since boot)


def _stat(pid: int | str) -> Optional[list[str]]:
    """/proc/PID/stat's fields after the command name (which may hold spaces and parentheses), or None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, process group, start time) of every process."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat(entry)) is not None:
            table[int(entry)] = (int(fields[1]), int(fields[2]), fields[19])
    return table


def processes_of(leader: int) -> Victims:
    """The processes of the command whose session leader is ``leader``: its process group and every descendant
    of those, with their start times (this process excluded)."""
    table = process_table()
    found = {pid for pid, (_, group, _) in table.items() if group == leader} | {leader}
    grew = True
    while grew:
        grew = False
        for pid, (parent, _, _) in table.items():
            if parent in found and pid not in found:
                found.add(pid)
                grew = True
    found.discard(os.getpid())
    return {pid: table[pid][2] for pid in found if pid in table}


def alive(pid: int, started: str) -> bool:
    """Whether the process ``pid`` that started at ``started`` still runs (a zombie does not)."""
    fields = _stat(pid)
    return fields is not None and fields[19] == started and fields[0] != "Z"


def signal_all(victims: Victims, sig: int) -> None:
    """Send ``sig`` to each process still alive, all at once (SIGKILL: as if its machine went down)."""
    for pid, started in victims.items():
        if alive(pid, started):
            try:
                os.kill(pid, sig)
            except OSError:
                pass


def stop_processes(victims: Victims, grace_s: float = 10.0) -> bool:
    """SIGTERM, up to ``grace_s`` to end, then SIGKILL what is left; True when all ended."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        signal_all(victims, sig)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(alive(pid, started) for pid, started in victims.items()):
            time.sleep(0.2)
    return not any(alive(pid, started) for pid, started in victims.items())


def stop_group(leader: subprocess.Popen, grace_s: float = 10.0) -> None:
    """Stop a command started in a session of its own, and everything it started."""
    stop_processes(processes_of(leader.pid), grace_s)
    try:
        leader.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
