"""JSON Lines data files (evaluation tasks, training data), read so that every error names the file and line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

from herd.errors import DataError


def json_objects(path: str | Path, lines: Iterable[str]) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line of `lines` read from `path`: each must be one JSON
    object, else DataError naming path:line."""
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
        except RecursionError:
            raise DataError(f"{path}:{n}: JSON nested too deeply for herd to read") from None
        except ValueError as e:  # a number Python will not convert (an integer of over 4300 digits)
            raise DataError(f"{path}:{n}: JSON herd cannot read ({e})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{n}: expected a JSON object, got {type(record).__name__}")
        yield n, record


__all__ = ["json_objects"]
