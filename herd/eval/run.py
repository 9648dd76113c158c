"""herd.eval.evaluate: run tasks on a model (in-process) or an endpoint, and build the report."""

from __future__ import annotations

import datetime
import random

from herd.eval.backends import DETERMINISM, EngineBackend, ServerBackend
from herd.eval.report import FORMAT
from herd.eval.tasks import Bar, Task, make_task


class RichBar(Bar):
    """A progress bar per task on stderr."""

    def __init__(self, progress, name: str):
        self.progress, self.name, self.task = progress, name, None

    def start(self, total: int) -> None:
        if self.task is None:
            self.task = self.progress.add_task(self.name, total=total)
        else:
            self.progress.update(self.task, total=(self.progress.tasks[self.task].total or 0) + total)

    def advance(self, n: int = 1) -> None:
        if self.task is not None:
            self.progress.advance(self.task, n)


def backend_for(model=None, server: str | None = None, batch_size: int = 16, api_key: str | None = None,
                served_model: str | None = None, **load_options):
    if server is not None:
        return ServerBackend(server, served_model, api_key, batch_size)
    if isinstance(model, (str, type(None))) or hasattr(model, "__fspath__"):
        import herd

        model = herd.load(model, **load_options)
    return EngineBackend(model, batch_size)


def run_tasks(backend, tasks: list[Task], seed: int, source=None, progress: bool = False,
              settings: dict | None = None) -> dict:
    records = []
    bar_context = None
    if progress:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        bar_context = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                               TimeElapsedColumn(), console=Console(stderr=True), transient=False)
        bar_context.start()
    try:
        for task in tasks:
            random.seed(seed)  # nothing should draw from the global generator; if something does, it is fixed
            bar = RichBar(bar_context, task.name) if bar_context else Bar()
            data = task.data_record()
            result = task.run(backend, bar)
            records.append({"definition": task.definition(), "data": data, "metrics": result.metrics,
                            "items": result.items, "tables": result.tables, "compute": result.compute,
                            "plots": getattr(result, "plots", {})})
    finally:
        if bar_context:
            bar_context.stop()
    return {
        "format": FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": backend.model_record(source),
        "runtime": backend.runtime_record(),
        "seed": seed,
        "settings": settings or {},
        "determinism": DETERMINISM,
        "tasks": records,
    }


def evaluate(model=None, tasks=("mc-arithmetic",), *, server: str | None = None, batch_size: int = 16,
             seed: int = 0, progress: bool = False, api_key: str | None = None, served_model: str | None = None,
             load_options: dict | None = None, **task_options) -> dict:
    """Score `tasks` (names, or Task objects) and return the report (a dict; herd.eval.report.save writes it).

    `model`: a herd.LLM, or anything herd.load takes (path, alias); `server`: the base URL of an
    OpenAI-compatible endpoint instead. `task_options` go to every task that has them: data, limit,
    context, shots, chat, max_tokens, ... and the seed."""
    backend = backend_for(model, server, batch_size, api_key, served_model, **(load_options or {}))
    built = [t if isinstance(t, Task) else make_task(t, seed=seed, **task_options) for t in tasks]
    if server is not None:
        source = server
    elif isinstance(model, (str, type(None))) or hasattr(model, "__fspath__"):
        source = str(model) if model is not None else None
    else:
        source = str(model.checkpoint.path)
    return run_tasks(backend, built, seed, source=source, progress=progress,
                     settings={"batch_size": batch_size, **{k: v for k, v in task_options.items() if v is not None}})
