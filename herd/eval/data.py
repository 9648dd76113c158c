"""Reading task data: JSONL with errors that name the file, the line and the field; SHA-256 of inputs."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

from herd.errors import DataError  # a task's data file is missing, malformed, or holds a field of the wrong kind
from herd.jsonl import json_objects


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sha256_json(value: Any) -> str:
    return sha256_text(canonical_json(value))


def canonical_json(value: Any) -> str:
    """The one serialization that hashes and signatures are computed over."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def existing_file(path: str | os.PathLike, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"{what} {str(p)!r} is not a file")
    return p


def read_jsonl(path: str | os.PathLike, fields: dict[str, type | tuple[type, ...]]) -> list[dict]:
    """Every non-blank line of a JSONL file as a dict holding at least `fields` (name -> type)."""
    path = existing_file(path, "data file")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, row in json_objects(path, f):
            for name, kind in fields.items():
                if name not in row:
                    raise DataError(f"{path}:{n}: missing field {name!r}")
                value = row[name]
                if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
                    raise DataError(f"{path}:{n}: field {name!r} must be {_kind(kind)}, got a boolean")
                if not isinstance(value, kind):
                    raise DataError(f"{path}:{n}: field {name!r} must be {_kind(kind)}, got {type(value).__name__}")
            row["_line"] = n
            rows.append(row)
    if not rows:
        raise DataError(f"{path}: no items (the file is empty)")
    return rows


def _kind(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {str: "a string", int: "an integer", list: "a list", float: "a number", dict: "an object"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def read_text(path: str | os.PathLike) -> str:
    path = existing_file(path, "text file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None


def iter_corpus_lines(path: str | os.PathLike) -> Iterator[tuple[Path, str]]:
    """(file, line) for every line of a file or of every file under a directory, read lazily."""
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"corpus {str(root)!r} does not exist")
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    for file in files:
        with open(file, encoding="utf-8", errors="replace") as f:
            for line in f:
                yield file, line
