"""Reading task data: JSONL with errors that name the file, the line and the field; SHA-256 of inputs."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any, Iterator

from herd.errors import DataError  # a task's data file is missing, malformed, or holds a field of the wrong kind
from herd.jsonl import json_objects


def regular_file(path: str | os.PathLike, what: str = "file") -> Path:
    """`path` if it names a regular file (symlinks followed); DataError otherwise. A device (/dev/zero), a
    FIFO or a directory would hang a read or fail it halfway; they are refused before anything is opened."""
    p = Path(path).expanduser()
    try:
        mode = p.stat().st_mode
    except FileNotFoundError:
        raise DataError(f"{what} {str(p)!r} does not exist") from None
    except OSError as e:
        raise DataError(f"{what} {str(p)!r} cannot be read ({e.strerror})") from None
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else (
            "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
        raise DataError(f"{what} {str(p)!r} is {kind}, not a regular file")
    return p


def sha256_file(path: str | os.PathLike, what: str = "file") -> str:
    h = hashlib.sha256()
    with open(regular_file(path, what), "rb") as f:
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
    return regular_file(path, what)


def read_jsonl(path: str | os.PathLike, fields: dict[str, type | tuple[type, ...]]) -> list[dict]:
    """Every non-blank line of a JSONL file as a dict holding at least `fields` (name -> type)."""
    path = existing_file(path, "data file")
    rows = []
    line = [0]

    def lines(f):  # UTF-8 line by line, so that an error names its line
        for raw in f:
            line[0] += 1
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{line[0]}: not UTF-8 text (byte {e.start}: {e.reason})") from None

    with open(path, "rb") as f:
        try:
            objects = list(json_objects(path, lines(f)))
        except RecursionError:
            raise DataError(f"{path}:{line[0]}: JSON nested too deeply") from None
        for n, row in objects:
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


def read_text_prefix(path: str | os.PathLike, size: int) -> tuple[str, bool]:
    """(the first `size` bytes of a UTF-8 text file, less a character they cut, and whether that is the whole
    file): what reads only as much of a large text as a task needs."""
    path = existing_file(path, "text file")
    with open(path, "rb") as f:
        data = f.read(size + 1)
    complete = len(data) <= size
    data = data[:size]
    try:
        return data.decode("utf-8") if complete else _decode_cut(data), complete
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None


def _decode_cut(data: bytes) -> str:
    for drop in range(4):  # a UTF-8 character is at most 4 bytes: the cut may split the last one
        try:
            return data[:len(data) - drop].decode("utf-8")
        except UnicodeDecodeError as e:
            if e.start < len(data) - 4 or drop == 3:
                raise
    raise AssertionError("unreachable")


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
