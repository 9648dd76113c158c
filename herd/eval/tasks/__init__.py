"""The built-in tasks, by name. Each is a Task dataclass (see herd.eval.tasks.base)."""

from __future__ import annotations

import os
from pathlib import Path

from herd.eval.data import DataError
from herd.eval.tasks.base import Bar, Item, Task, TaskResult
from herd.eval.tasks.multiple_choice import ArithmeticChoice, MultipleChoice
from herd.eval.tasks.gsm8k import GSM8K
from herd.eval.tasks.perplexity import Perplexity
from herd.eval.tasks.reasoning import Reasoning
from herd.eval.tasks.retrieval import Retrieval

TASKS: dict[str, type[Task]] = {t.name: t for t in (Perplexity, MultipleChoice, ArithmeticChoice, GSM8K, Retrieval,
                                                    Reasoning)}


def register(task: type[Task]) -> type[Task]:
    TASKS[task.name] = task
    return task


def make_task(name: str, **options) -> Task:
    """A task by name with the options it takes (others are ignored: one command line serves many tasks)."""
    if name not in TASKS:
        raise DataError(f"unknown task {name!r}; known: {', '.join(sorted(TASKS))}")
    task = TASKS[name]
    options = {k: v for k, v in options.items() if v is not None}
    for field_name in task.data_fields:  # a report names its data by absolute path: verify runs from anywhere
        if isinstance(options.get(field_name), (str, os.PathLike)):
            options[field_name] = str(Path(options[field_name]).expanduser().absolute())
    built = task.from_definition(options)
    built.check()
    return built


def task_from_definition(definition: dict, **overrides) -> Task:
    """The task a report's definition names, every setting checked first (DataError names the one that is
    wrong)."""
    name = definition.get("task")
    if name not in TASKS:
        raise DataError(f"the report names task {name!r}, which this herd does not have")
    TASKS[name].check_definition({**definition, **overrides})
    return TASKS[name].from_definition(definition, **overrides)


__all__ = ["TASKS", "Bar", "Item", "Task", "TaskResult", "make_task", "register", "task_from_definition"]
