"""Simulated system heterogeneity: device speed, availability and a round deadline, in simulated seconds.

Real federations wait on slow phones and lose clients that go offline (FedScale's device traces,
FedLLM-Factory's availability); a simulation on one machine trains every client at the machine's speed. This
module decides, before a round's clients train, what such a federation would have seen, from the ``system:``
config and the run seed only, so that a run stays a function of (config, seed):

- **availability**: a sampled client is online in a round with probability ``system.availability`` (one draw
  per client and round, from (seed, round)), or when a trace's window (client, start, end rounds) holds the
  round. The server samples as without the simulation; an offline sampled client is dropped from the round
  (it never downloads, and the round does not wait for it).
- **time model** (simulated seconds, nothing measured): a client's round takes

      traffic + work = 2 x bytes x 8 / (bandwidth_mbps x 1e6)  +  steps x rows x seconds_per_row / speed

  ``bytes`` is the round's downlink per online client (what the server broadcasts, its mean over them), charged
  once for the download and once more for the upload: the upload is taken to be as large as the download (the
  state a method sends and gets back; a method that uploads less, as Ravan its trained heads, is charged the
  same), because the step limit of a late client must be known before it trains. ``rows`` is what one local
  step trains: min(federation.batch_size, the client's rows). ``speed`` is the client's relative speed (1: the
  reference device that trains a row in ``seconds_per_row``; 2: twice as fast), log-normal exp(speed_sigma x
  N(0, 1)) per client, drawn once per run from the seed, or read from a trace (client, speed). Speed is its own
  axis: a method that reads compute levels (Ravan's heads, HetLoRA's ranks) still reads them, and a low level
  does not make a client faster here.
- **deadline** (``system.deadline_s``): a client whose time exceeds it is late. ``late=drop`` drops it (it is
  not trained: its upload would be discarded); ``late=partial`` trains the whole local steps it finishes by the
  deadline (traffic first) and uploads them, dropped only when that is none.

The round's simulated time (``simulated_round_s``) is the slowest online client's, where a dropped late client
counts the deadline (the server waited for it until then); 0 when no sampled client is online.
metrics.csv's ``offline_clients`` and ``late_clients`` count the simulated losses, and ``dropped_clients``
adds the ones that left the round (offline, and late ones under drop or with no step done) to the real-time
stragglers it counts without the simulation (uploads past ``federation.round_timeout_s`` of wall-clock time).

Under differential privacy the accountant still counts every sampled client's rounds and full local steps: a
client that was offline or cut short spent less than it is charged (the reported epsilon is an upper bound).

Nothing here imports Ray: the driver asks :meth:`SystemModel.online` and :meth:`SystemModel.plan` once a round.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ravan_ray.config import ConfigError, RunConfig

#: metrics.csv's columns of a run that simulates (``system.active``), after the federation's own
SYSTEM_COLUMNS = ["simulated_round_s", "offline_clients", "late_clients"]
_SPEED_STREAM, _AVAILABILITY_STREAM = 0x5BEED, 0xA7A1


@dataclass(frozen=True)
class ClientPlan:
    """What the simulation decided for one sampled client in one round."""

    client: int
    online: bool
    late: bool = False
    steps: Optional[int] = None  # None: every local step; k: cut short at the deadline; 0: nothing to upload
    seconds: float = 0.0  # simulated time until its upload arrived (or the deadline, when it was dropped as late)

    @property
    def trains(self) -> bool:
        return self.online and self.steps != 0


@dataclass
class RoundPlan:
    """A round's clients as the simulation sees them; with ``active`` false (nothing simulated) every sampled client
    trains all its steps and the round adds nothing to metrics.csv."""

    clients: list[ClientPlan]
    active: bool = True

    @property
    def training(self) -> list[tuple[int, Optional[int]]]:
        """(client, steps) of the clients that train, in client order."""
        return [(c.client, c.steps) for c in self.clients if c.trains]

    @property
    def dropped(self) -> int:
        """Sampled clients the simulation left out of the round: offline, or late with nothing to upload."""
        return sum(not c.trains for c in self.clients)

    def columns(self) -> dict[str, Any]:
        if not self.active:
            return {}
        online = [c.seconds for c in self.clients if c.online]
        return {"simulated_round_s": max(online) if online else 0.0,
                "offline_clients": sum(not c.online for c in self.clients),
                "late_clients": sum(c.late for c in self.clients)}

    def annotate(self, log: list[dict[str, Any]], round_index: int) -> None:
        """Complete the round's clients.csv entries: the simulated time (and, for a client cut short, its steps) of
        each client that trained, and an entry for each that did not (status offline, or late when dropped)."""
        if not self.active:
            return
        by_client = {c.client: c for c in self.clients}
        for entry in log:
            plan = by_client.get(entry["client"])
            if plan is not None:
                entry.update({"simulated_s": plan.seconds, **({"steps": plan.steps} if plan.late else {})})
        log.extend({"round": round_index, "client": c.client, "status": "offline" if not c.online else "late",
                    "simulated_s": c.seconds} for c in self.clients if not c.trains)


class SystemModel:
    """The run's simulated devices: their speeds and online windows, and each round's plan."""

    def __init__(self, config: RunConfig, client_rows: list[int]):
        self.settings = config.system
        self.seed = config.seed
        self.num_clients = config.federation.num_clients
        self.local_steps = config.federation.local_steps
        self.rows_per_step = np.minimum(config.federation.batch_size, np.asarray(client_rows, dtype=np.int64))
        self.speeds = self._speeds()
        self.windows = None if self.settings.availability_trace is None else \
            read_availability_trace(self.settings.availability_trace, self.num_clients)

    def _speeds(self) -> np.ndarray:
        s = self.settings
        if s.speed_trace is not None:
            return read_speed_trace(s.speed_trace, self.num_clients)
        rng = np.random.default_rng([self.seed, _SPEED_STREAM])
        return np.exp(s.speed_sigma * rng.standard_normal(self.num_clients))

    def online(self, round_index: int, clients: list[int]) -> list[int]:
        """The sampled ``clients`` that are online in this round. A draw for every client of the federation, so
        whether a client is online does not depend on which others were sampled."""
        if self.windows is not None:
            return [c for c in clients if any(start <= round_index <= end for start, end in self.windows[c])]
        if self.settings.availability >= 1:
            return list(clients)
        draws = np.random.default_rng([self.seed, round_index, _AVAILABILITY_STREAM]).random(self.num_clients)
        return [c for c in clients if draws[c] < self.settings.availability]

    def plan(self, sampled: list[int], online: list[int], downlink_bytes: int) -> RoundPlan:
        """Each sampled client's fate this round, given the online ones and the bytes broadcast to them."""
        s = self.settings
        per_client = downlink_bytes / max(1, len(online))
        traffic = 0.0 if s.bandwidth_mbps is None else 2 * per_client * 8 / (s.bandwidth_mbps * 1e6)
        plans = []
        for client in sampled:
            if client not in online:
                plans.append(ClientPlan(client, online=False))
                continue
            step_s = float(self.rows_per_step[client]) * s.seconds_per_row / float(self.speeds[client])
            # the whole steps that fit in the deadline after the traffic (a hair of slack: 3 x 0.1 s fits in 0.3 s)
            fits = self.local_steps if s.deadline_s is None else \
                max(0, math.floor((s.deadline_s - traffic) / step_s + 1e-9))
            if fits >= self.local_steps:
                plans.append(ClientPlan(client, online=True, seconds=traffic + self.local_steps * step_s))
            elif s.late == "drop" or fits == 0:
                plans.append(ClientPlan(client, online=True, late=True, steps=0, seconds=s.deadline_s))
            else:
                plans.append(ClientPlan(client, online=True, late=True, steps=fits, seconds=traffic + fits * step_s))
        return RoundPlan(plans, active=s.active)


def _read_trace(path: str, columns: tuple[str, ...], what: str):
    """A trace CSV as a DataFrame with these integer / float columns, or one line saying what is wrong."""
    import pandas as pd  # here: actors import nothing of this module, and the driver has pandas anyway

    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        frame = pd.read_csv(file)
    except (ValueError, pd.errors.ParserError) as error:
        raise ConfigError(f"{what} {path} is not a CSV file ({' '.join(str(error).split())})") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ConfigError(f"{what} {path} needs the columns {', '.join(columns)} (it has {', '.join(map(str, frame.columns))})")
    for column in columns:
        values = pd.to_numeric(frame[column], errors="coerce")
        if values.isna().any() or not np.isfinite(values).all():
            row = int(np.flatnonzero(values.isna() | ~np.isfinite(values.fillna(0)))[0]) + 2
            raise ConfigError(f"{what} {path}: column {column} has a value that is not a number (line {row})")
        frame[column] = values
    return frame


def _check_clients(frame, path: str, what: str, num_clients: int) -> None:
    clients = frame["client"]
    if (clients != clients.round()).any() or (clients < 0).any() or (clients >= num_clients).any():
        raise ConfigError(f"{what} {path}: client ids must be integers 0..{num_clients - 1} (federation.num_clients)")
    absent = sorted(set(range(num_clients)) - set(clients.astype(int)))
    if absent:
        shown = ", ".join(map(str, absent[:10])) + (", ..." if len(absent) > 10 else "")
        raise ConfigError(f"{what} {path} lists no row for {len(absent)} of the {num_clients} clients ({shown}); "
                          f"list every client")


def read_speed_trace(path: str, num_clients: int) -> np.ndarray:
    """system.speed_trace: client,speed with one row per client, speeds > 0."""
    frame = _read_trace(path, ("client", "speed"), "system.speed_trace")
    _check_clients(frame, path, "system.speed_trace", num_clients)
    if frame["client"].duplicated().any():
        client = int(frame["client"][frame["client"].duplicated()].iloc[0])
        raise ConfigError(f"system.speed_trace {path} lists client {client} twice; give one speed per client")
    if (frame["speed"] <= 0).any():
        raise ConfigError(f"system.speed_trace {path}: every speed must be > 0 (a relative speed, 1 = the reference)")
    speeds = np.empty(num_clients)
    speeds[frame["client"].astype(int).to_numpy()] = frame["speed"].to_numpy(dtype=float)
    return speeds


def read_availability_trace(path: str, num_clients: int) -> dict[int, list[tuple[int, int]]]:
    """system.availability_trace: client,start,end rows (rounds, inclusive) in which a client is online."""
    frame = _read_trace(path, ("client", "start", "end"), "system.availability_trace")
    _check_clients(frame, path, "system.availability_trace", num_clients)
    if (frame["end"] < frame["start"]).any():
        line = int(np.flatnonzero((frame["end"] < frame["start"]).to_numpy())[0]) + 2
        raise ConfigError(f"system.availability_trace {path}: a window ends before it starts (line {line})")
    windows: dict[int, list[tuple[int, int]]] = {c: [] for c in range(num_clients)}
    for client, start, end in frame[["client", "start", "end"]].itertuples(index=False):
        windows[int(client)].append((int(start), int(end)))
    return windows


def check_traces(config: RunConfig) -> None:
    """Read the config's traces, for a one-line error before anything loads (``ravan-ray run --dry-run`` too)."""
    s, clients = config.system, config.federation.num_clients
    if s.speed_trace is not None:
        read_speed_trace(s.speed_trace, clients)
    if s.availability_trace is not None:
        read_availability_trace(s.availability_trace, clients)


def system_columns(config: RunConfig) -> list[str]:
    """The simulated columns metrics.csv gets for this config (none when nothing is simulated)."""
    return list(SYSTEM_COLUMNS) if config.system.active else []
