"""Checked reads shared by the readers of JSON configs (HF, Meta): every wrong type or impossible value
becomes a herd error that names the file and the field, never a bare ValueError from int("sixty-four").

Also the check every reader runs before anything is built: the layer count the header claims against
the layers whose tensors are actually in the file (a header saying 2^31 layers must fail at once).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

from herd.errors import ConfigError, FormatError, HerdError, MissingTensor, UnexpectedTensor

REQUIRED = object()


def read_json(path: Path, error: type[HerdError] = FormatError, expect: type = dict) -> Any:
    """The JSON value in `path`, which must be of type `expect` (an object unless told otherwise)."""
    try:
        value = json.loads(Path(path).read_bytes())
    except OSError as e:
        raise FormatError(f"{path}: cannot be read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise FormatError(f"{path} is not valid JSON: not UTF-8 text ({e.reason})") from None
    except json.JSONDecodeError as e:
        raise FormatError(f"{path} is not valid JSON: {e}") from None
    except RecursionError:
        raise FormatError(f"{path} is not valid JSON herd can read: nested too deeply") from None
    if not isinstance(value, expect):
        raise error(f"{path}: holds a JSON {_json_type(value)}, expected {_json_type(expect())}")
    return value


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    return {dict: "object", list: "array", str: "string", int: "number", float: "number"}.get(
        type(value), "null" if value is None else type(value).__name__
    )


class Fields:
    """Typed access to one JSON object. `where` names it in messages: a file, or a file and a parent key."""

    def __init__(self, data: Any, where: str, error: type[HerdError] = ConfigError):
        if not isinstance(data, dict):
            raise error(f"{where}: holds a JSON {_json_type(data)}, expected an object")
        self.data, self.where, self.error = data, where, error

    def __contains__(self, key: str) -> bool:
        return key in self.data

    def _get(self, key: str, default: Any) -> Any:
        if key in self.data:
            return self.data[key]
        if default is REQUIRED:
            raise self.error(f"{self.where} lacks the field {key!r}")
        return default

    def fail(self, key: str, what: str, value: Any) -> HerdError:
        return self.error(f"{self.where}: field {key!r} must be {what}, got {json.dumps(value, default=repr)[:80]}")

    def int(self, key: str, default: Any = REQUIRED, none: bool = False) -> Any:
        """An integer; an integral float (4096.0, as some exporters write) counts. `none`: null allowed."""
        value = self._get(key, default)
        if value is None and (none or default is None):
            return None
        if isinstance(value, float) and math.isfinite(value) and value == int(value):
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, "an integer", value)
        return value

    def _checked(self, key: str, default: Any, ok, what: str) -> Any:
        value = self._get(key, default)
        if value is None and default is None:
            return None
        if not ok(value):
            raise self.fail(key, what, value)
        return value

    def float(self, key: str, default: Any = REQUIRED) -> Any:
        value = self._checked(key, default, lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number")
        return None if value is None else float(value)

    def bool(self, key: str, default: Any = REQUIRED) -> Any:
        return self._checked(key, default, lambda v: isinstance(v, bool), "true or false")

    def str(self, key: str, default: Any = REQUIRED) -> Any:
        return self._checked(key, default, lambda v: isinstance(v, str), "a string")

    def object(self, key: str, default: Any = REQUIRED) -> "Fields | None":
        value = self._checked(key, default, lambda v: isinstance(v, dict), "an object")
        return None if value is None else Fields(value, f"{self.where}: {key}", self.error)

    def int_list(self, key: str, default: Any = REQUIRED) -> Any:
        value = self._get(key, default)
        if value is None and default is None:
            return None
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise self.fail(key, "a list of integers", value)
        return value


@contextlib.contextmanager
def naming(path: Path | str, names: Mapping[str, str] | None = None):
    """Inside: a ConfigError from ModelArgs (which knows no files) gains the file and the reader's own key."""
    try:
        yield
    except ConfigError as e:
        field = getattr(e, "field", None)
        if field is None or str(e).startswith(str(path)):
            raise
        names = names or {}
        key = names.get(field) or names.get(field.split(".")[0])
        raise ConfigError(f"{path}: {key + ': ' if key else ''}{e}") from None


# No Llama has more than 126 layers and llama.cpp stops at 512; this only keeps per-layer tables small
# where a file has no layer tensors to check the count against.
MAX_LAYERS = 1 << 14


def check_layer_count(declared: int, tensor_names: Iterable[str], pattern: str, path: Path, field: str,
                      metadata_only: bool = False) -> None:
    """The header's layer count must be what the tensors show: layers 0..declared-1, no more, no fewer.
    `pattern` is a regex whose first group is the layer id in a tensor name. `metadata_only`: a file with
    no layer tensors at all is accepted (a GGUF vocabulary file); the loader refuses to build from it."""
    if isinstance(declared, bool) or not isinstance(declared, int) or declared <= 0:
        raise ConfigError(f"{path}: {field} must be a positive integer, got {declared!r}")
    found = re.compile(pattern)
    present: dict[int, str] = {}  # layer id -> a tensor of it, to name in messages
    for name in tensor_names:
        if m := found.match(name):
            present.setdefault(int(m[1]), name)
    if not present and metadata_only:
        if declared > MAX_LAYERS:
            raise ConfigError(f"{path}: {field} is {declared}, which cannot be right (limit {MAX_LAYERS})")
        return
    if present and max(present) >= declared:
        raise UnexpectedTensor(
            f"{path}: {field} is {declared}, but the file holds tensors for layer {max(present)} "
            f"(such as {present[max(present)]}; {len(present)} layers in all)"
        )
    if len(present) != declared:
        missing = sorted(set(range(min(declared, max(present, default=0) + 2))) - set(present))[:4]
        raise MissingTensor(
            f"{path}: {field} is {declared}, but the file holds tensors for {len(present)} layer(s)"
            + (f" (none for layer {missing[0]})" if missing else "")
        )
