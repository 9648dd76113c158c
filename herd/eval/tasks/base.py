"""What every task is: a definition (JSON, enough to rebuild it), its items, how they are scored, and how
per-item scores add up to the task's metrics."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from herd.errors import HerdError
from herd.eval.data import DataError, regular_file, sha256_file

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

    @classmethod
    def check_definition(cls, d: dict) -> None:
        """DataError naming the first setting of a definition read from a report that this task does not have,
        or that is not of its kind and range (a definition rebuilds items: a count of 10**12 would never end)."""
        names = {f.name: f for f in dataclasses.fields(cls)}
        for key in d:
            if key not in names and key not in ("task", "kind", "version"):
                raise DataError(f"task {cls.name!r} has no setting {key!r}")
        for key, value in d.items():
            if key not in names:
                continue
            rule = SETTINGS.get(key)
            if rule is None:
                raise DataError(f"task {cls.name!r}: setting {key!r} cannot be read from a report")
            kinds, low, high, element = rule
            if value is None and type(None) in kinds:
                continue
            if isinstance(value, bool) != (bool in kinds) or not isinstance(value, kinds):
                raise DataError(f"task {cls.name!r}: setting {key!r} is {value!r}, not {_kinds_text(kinds)}")
            values = value if isinstance(value, list) else [value]
            if isinstance(value, list) and not 1 <= len(value) <= 100:
                raise DataError(f"task {cls.name!r}: setting {key!r} holds {len(value)} values (1 to 100)")
            for v in values:
                if element is not None and (isinstance(v, bool) or not isinstance(v, element)):
                    raise DataError(f"task {cls.name!r}: setting {key!r} holds {v!r}, not {_kinds_text(element)}")
                if low is not None and not (isinstance(v, (int, float)) and low <= v <= high):
                    raise DataError(f"task {cls.name!r}: setting {key!r} is {v!r}, outside {low}..{high}")

    def data_record(self) -> dict:
        """SHA-256 of every data file the items come from (generated tasks: none, their seed is in the
        definition)."""
        out = {}
        for name in self.data_fields:
            path = getattr(self, name)
            if path is not None:
                out[name] = {"path": str(path), "sha256": sha256_file(path, f"task {self.name!r}: data file")}
        return out

    def check(self) -> None:
        """What can be found wrong before a model loads: every data file named is a regular file."""
        for name in self.data_fields:
            if getattr(self, name) is not None:
                regular_file(getattr(self, name), f"task {self.name!r}: {name} file")

    def items(self, backend=None) -> list[Item]:
        """The task's items; tasks whose items are measured in tokens (haystack lengths) need the backend."""
        raise NotImplementedError

    def score(self, backend, items: list[Item], bar: Bar, only: set[str] | None = None) -> list[dict]:
        """One record per item (with `only`, per item of those ids), the model's outputs and what follows from
        them. Where the backend can, `only` computes its items exactly as scoring them all does."""
        raise NotImplementedError

    def rebuild(self, backend, items: list[Item], recorded: dict[str, dict]) -> list[dict]:
        """The records of `items` built again from the model outputs in `recorded` (id -> a report's record;
        only `output_fields` are read from it) and the task's own data: answers, targets, scores and
        everything else are derived here, never copied. OutputError when a recorded output is not of the
        kind the task writes."""
        raise NotImplementedError

    def aggregate(self, records: list[dict]) -> TaskResult:
        raise NotImplementedError

    def run(self, backend, bar: Bar | None = None, only: set[str] | None = None) -> TaskResult:
        return self.aggregate(self.score(backend, self.items(backend), bar or Bar(), only))

    # the model's outputs in a record: what `herd eval verify` compares when it scores an item again
    output_fields: ClassVar[tuple[str, ...]] = ("output",)


class OutputError(HerdError):
    """A report's record holds a model output that is not of the kind its task writes."""


def recorded_output(record: dict, field_name: str, kind, item_id: str):
    """`record[field_name]`, checked to be `kind` (a type, or a predicate); OutputError otherwise."""
    if field_name not in record:
        raise OutputError(f"item {item_id}: the record has no {field_name!r}")
    value = record[field_name]
    ok = kind(value) if callable(kind) and not isinstance(kind, type) else (
        isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool))
    if not ok:
        raise OutputError(f"item {item_id}: {field_name!r} is {_brief(value)}, not what the task writes")
    return value


def _brief(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# Every setting a task definition can hold: (kinds, lowest, highest, kind of a list's elements). The bounds
# keep a definition read from a report from asking for more items or steps than any run could have made.
SETTINGS: dict[str, tuple] = {
    "data": ((str, type(None)), None, None, None), "train": ((str, type(None)), None, None, None),
    "filler": ((str, type(None)), None, None, None),
    "limit": ((int, type(None)), 1, 10**6, None), "seed": ((int,), -2**63, 2**63, None),
    "digits": ((int,), 1, 15, None), "context": ((int, type(None)), 1, 1 << 22, None),
    "shots": ((int,), 0, 1000, None), "chat": ((bool,), None, None, None), "max_tokens": ((int,), 1, 1 << 20, None),
    "self_consistency": ((int, type(None)), 1, 1000, None),
    "sc_temperature": ((int, float, type(None)), 0, 100, None),
    "steps": ((list,), 1, 1000, (int,)), "per_depth": ((int,), 1, 10**5, None),
    "families": ((list,), None, None, (str,)), "lengths": ((list,), 1, 1 << 22, (int,)),
    "depths": ((list,), 0, 1, (int, float)), "needles": ((int,), 1, 20, None), "repeats": ((int,), 1, 10**4, None),
}


def _kinds_text(kinds) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list",
             type(None): "null"}
    return " or ".join(names.get(k, k.__name__) for k in (kinds if isinstance(kinds, tuple) else (kinds,)))


def require_file(path, task: str, what: str = "--data PATH") -> Path:
    if path is None:
        raise DataError(f"task {task!r} needs {what}")
    return regular_file(path, f"task {task!r}: data file")
