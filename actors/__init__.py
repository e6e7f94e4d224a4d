"""Ray actors of the simulation: client actors (one per client or a pool) and the parameter server."""

from actors.client import ClientActor, ClientFleet
from actors.server import ParameterServer

__all__ = ["ClientActor", "ClientFleet", "ParameterServer"]
