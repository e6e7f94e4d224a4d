"""Tasks, one file each, all behind :class:`ravan_ray.tasks.base.Task`: what is learned (data, model
class and head, loss, metrics), independent of how it is federated."""

from __future__ import annotations

from typing import Any, Optional

from ravan_ray.registry import registered_class
from ravan_ray.tasks.base import Task, TaskData

# name -> "module:Class"; imported on first use so a run pays only for the task it runs.
REGISTRY: dict[str, str] = {
    "text_classification": "ravan_ray.tasks.text_classification:TextClassification",
    "image_classification": "ravan_ray.tasks.image_classification:ImageClassification",
    "causal_lm": "ravan_ray.tasks.causal_lm:CausalLM",
    "question_answering": "ravan_ray.tasks.question_answering:QuestionAnswering",
    "seq2seq": "ravan_ray.tasks.seq2seq:Seq2Seq",
}


def task_class(name: str) -> type[Task]:
    return registered_class(REGISTRY, name, "task")


def build_task(config, info: Optional[dict[str, Any]] = None) -> Task:
    return task_class(config.model.task)(config, info)


__all__ = ["REGISTRY", "Task", "TaskData", "build_task", "task_class"]
