"""Federated methods, one file (or folder) each, all behind :class:`ravan_ray.methods.base.FederatedMethod`.

This module is the registry, and only that: it imports no method (nor the protocol), so the config validates
names and options against it (ravan_ray/config.py) without an import cycle, and a run imports only the method it
uses."""

from __future__ import annotations

from ravan_ray.registry import registered_class

# name -> "module:Class"; imported on first use so a run pays only for the method it uses.
REGISTRY: dict[str, str] = {
    "ravan": "ravan_ray.methods.ravan:Ravan",
    "full_ft": "ravan_ray.methods.full_ft:FullFT",
    "fedit": "ravan_ray.methods.fedit:FedIT",
    "fedex_lora": "ravan_ray.methods.fedex_lora:FedExLoRA",
    "ffa_lora": "ravan_ray.methods.ffa_lora:FFALoRA",
    "fed_sb": "ravan_ray.methods.fed_sb:FedSB",
    "hetlora": "ravan_ray.methods.hetlora:HetLoRA",
    "flexlora": "ravan_ray.methods.flexlora:FlexLoRA",
    "flora": "ravan_ray.methods.flora:FLoRA",
    "fedsa_lora": "ravan_ray.methods.fedsa_lora:FedSALoRA",
    "fedsvd": "ravan_ray.methods.fedsvd:FedSVD",
    "rolora": "ravan_ray.methods.rolora:RoLoRA",
    "fed_plora": "ravan_ray.methods.fed_plora:FedPLoRA",
}


def method_class(name: str) -> type:
    """The :class:`~ravan_ray.methods.base.FederatedMethod` subclass registered as ``name``."""
    return registered_class(REGISTRY, name, "method")


def build_method(config):
    """The method of ``config`` (a :class:`~ravan_ray.methods.base.FederatedMethod`)."""
    return method_class(config.method.name)(config)


def method_columns() -> dict[str, float]:
    """Every registered method's own columns of metrics.csv (``FederatedMethod.metrics_columns``: Ravan's
    ``heads_trained``), each at the value a run of another method writes there. Every run writes them all, as its
    config.yaml lists every registered option, so the runs of a sweep over methods share their columns."""
    columns: dict[str, float] = {}
    for name in REGISTRY:
        columns.update(method_class(name).metrics_columns)
    return columns


__all__ = ["REGISTRY", "build_method", "method_class", "method_columns"]
