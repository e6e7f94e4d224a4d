"""Ray for one command (a run, a sweep): the cluster it joins or the private Ray it starts, and whether
what it reserves fits what that cluster has."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Iterator, Optional

RAY_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
Resources = dict[str, float]  # {"CPU": 2.0, "GPU": 0.5}


@contextmanager
def ray_runtime(resources, address: Optional[str] = None) -> Iterator[None]:
    """Use the Ray we are already in (a Tune trial, a job); else connect to ``address`` (by default
    ``resources.address``, then RAY_ADDRESS), or start a private local Ray (``resources.num_cpus`` /
    ``num_gpus``) bound to 127.0.0.1, and shut down what was started here afterwards."""
    import ray

    if ray.is_initialized():
        yield
        return
    address = address or resources.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        from ravan_ray.logs import quiet_logger

        # No dashboard (nothing listens for HTTP). Ray core's own gRPC servers choose their interfaces
        # themselves; ray.init resolves 127.0.0.1 to the node's address, so there is nothing to pass.
        # Token authentication stays on (Ray's default for a new local cluster); Ray's warning that
        # announces that default means nothing for a private Ray this command starts and stops itself.
        with quiet_logger(RAY_AUTH_LOGGER):
            ray.init(num_cpus=resources.num_cpus, num_gpus=resources.num_gpus,
                     include_dashboard=False, logging_level=logging.WARNING,
                     # errors come back as exceptions; worker logs would repeat them as remote tracebacks
                     log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


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
