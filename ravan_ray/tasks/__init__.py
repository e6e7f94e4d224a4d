"""Tasks, one file each, all behind :class:`ravan_ray.tasks.base.Task`: what is learned (data, model
class and head, loss, metrics), independent of how it is federated.

This module is the registry, and only that: it imports no task (nor the protocol), so the config validates names
and options against it (ravan_ray/config.py) without an import cycle, and a run imports only the task it uses."""

from __future__ import annotations

from typing import Any, Optional

from ravan_ray.registry import registered_class

# name -> "module:Class"; imported on first use so a run pays only for the task it runs.
REGISTRY: dict[str, str] = {
    "text_classification": "ravan_ray.tasks.text_classification:TextClassification",
    "image_classification": "ravan_ray.tasks.image_classification:ImageClassification",
    "causal_lm": "ravan_ray.tasks.causal_lm:CausalLM",
    "question_answering": "ravan_ray.tasks.question_answering:QuestionAnswering",
    "seq2seq": "ravan_ray.tasks.seq2seq:Seq2Seq",
}


def task_class(name: str) -> type:
    """The :class:`~ravan_ray.tasks.base.Task` subclass registered as ``name``."""
    return registered_class(REGISTRY, name, "task")


def build_task(config, info: Optional[dict[str, Any]] = None):
    """The task of ``config`` (a :class:`~ravan_ray.tasks.base.Task`); ``info``: what the driver's data preparation
    told every process (label names, pad token)."""
    return task_class(config.model.task)(config, info)


__all__ = ["REGISTRY", "build_task", "task_class"]
