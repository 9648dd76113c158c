"""What every task is: a definition (JSON, enough to rebuild it), its items, how they are scored, and how
per-item scores add up to the task's metrics."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from herd.eval.data import DataError, sha256_file

BUILTIN = Path(__file__).resolve().parents[1] / "builtin"


@dataclass
class Item:
    id: str
    data: dict[str, Any]  # what the task needs to score it (prompt parts, choices, answer ...)


class Bar:
    """A progress sink: `start(total)` once, `advance(n)` as requests finish (no-op by default)."""

    def start(self, total: int) -> None:
        pass

    def advance(self, n: int = 1) -> None:
        pass


@dataclass
class TaskResult:
    items: list[dict]  # one record per item: id, prompt_sha256, output, answer, target, score
    metrics: dict[str, dict]  # name -> {"value", "stderr", "n"}
    tables: dict[str, Any] = field(default_factory=dict)  # e.g. accuracy per (length, depth)
    compute: dict[str, Any] = field(default_factory=dict)  # requests, tokens read and generated


class Task:
    """Subclasses are dataclasses whose fields are their settings; `definition()` is those fields, so a
    report's task can be rebuilt exactly (`from_definition`)."""

    name: ClassVar[str]
    kind: ClassVar[str]
    version: ClassVar[int] = 1
    data_fields: ClassVar[tuple[str, ...]] = ()  # fields that name data files

    def definition(self) -> dict:
        return {"task": self.name, "kind": self.kind, "version": self.version, **dataclasses.asdict(self)}

    @classmethod
    def from_definition(cls, d: dict, **overrides) -> "Task":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in {**d, **overrides}.items() if k in names})

    def data_record(self) -> dict:
        """SHA-256 of every data file the items come from (generated tasks: none, their seed is in the
        definition)."""
        out = {}
        for name in self.data_fields:
            path = getattr(self, name)
            if path is not None:
                out[name] = {"path": str(path), "sha256": sha256_file(path)}
        return out

    def items(self, backend=None) -> list[Item]:
        """The task's items; tasks whose items are measured in tokens (haystack lengths) need the backend."""
        raise NotImplementedError

    def score(self, backend, items: list[Item], bar: Bar) -> list[dict]:
        raise NotImplementedError

    def aggregate(self, records: list[dict]) -> TaskResult:
        raise NotImplementedError

    def run(self, backend, bar: Bar | None = None, only: set[str] | None = None) -> TaskResult:
        items = self.items(backend)
        if only is not None:
            items = [i for i in items if i.id in only]
        return self.aggregate(self.score(backend, items, bar or Bar()))

    # the item comparisons `herd eval verify` makes: which fields must match, and how closely
    exact_fields: ClassVar[tuple[str, ...]] = ("output", "answer", "score")
    close_fields: ClassVar[tuple[str, ...]] = ()


def require_file(path, task: str, what: str = "--data PATH") -> Path:
    if path is None:
        raise DataError(f"task {task!r} needs {what}")
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"task {task!r}: data file {str(p)!r} does not exist")
    return p

