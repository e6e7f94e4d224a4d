"""Looking up the two seams' registries (methods/__init__.py, tasks/__init__.py: name -> "module:Class"): a class is
imported on first use, so a run pays only for the method and task it uses, and the config can validate against
the registries without importing what imports it."""

from __future__ import annotations

from importlib import import_module


def registered_class(registry: dict[str, str], name: str, kind: str) -> type:
    """The class ``registry[name]`` names as "module:Class"; an unknown name is one line listing the known."""
    if name not in registry:
        raise ValueError(f"unknown {kind} '{name}' (available: {', '.join(sorted(registry))})")
    module, cls = registry[name].split(":")
    return getattr(import_module(module), cls)
