"""Battle logs in the shape of FastChat's clean_battle JSONL, read and checked line by line.

A record: model_a, model_b, winner (model_a | model_b | tie | tie (bothbad)), judge, conversation_a/_b
(OpenAI-shaped messages), turn, anony, language, tstamp, conv_metadata (token and markdown counts), and
herd's additions: question_id (the battle's id), fingerprint_a/_b and verified_a/_b (the exact weights;
verified false where an endpoint could not say), sampling (the settings both answers were generated
with), board ("human" or "judge") and tstamp_start. Published LMArena logs carry only FastChat's fields;
they rate the same way, each name one variant.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from herd.arena.rating import WINNERS
from herd.arena.style import conv_metadata
from herd.errors import DataError
from herd.jsonl import json_objects


def _check(path, line: int, record: dict) -> dict:
    where = f"{path}:{line}"
    for key in ("model_a", "model_b"):
        if not isinstance(record.get(key), str) or not record[key]:
            raise DataError(f"{where}: `{key}` must be a contestant's name, got {record.get(key)!r}")
    if record["model_a"] == record["model_b"] and record.get("fingerprint_a") == record.get("fingerprint_b"):
        raise DataError(f"{where}: `model_a` and `model_b` are the same contestant ({record['model_a']!r})")
    if record.get("winner") not in WINNERS:
        raise DataError(f"{where}: `winner` must be one of {', '.join(WINNERS)}; got {record.get('winner')!r}")
    for key in ("conversation_a", "conversation_b"):
        conv = record.get(key)
        if conv is not None and not (isinstance(conv, list) and all(
                isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") for m in conv)):
            raise DataError(f"{where}: `{key}` must be a list of {{role, content}} messages")
    for key in ("fingerprint_a", "fingerprint_b"):
        if record.get(key) is not None and not isinstance(record[key], str):
            raise DataError(f"{where}: `{key}` must be a string")
    if record.get("board", "human") not in ("human", "judge"):
        raise DataError(f"{where}: `board` must be human or judge, got {record['board']!r}")
    if "conv_metadata" not in record and record.get("conversation_a") and record.get("conversation_b"):
        record["conv_metadata"] = conv_metadata(record["conversation_a"], record["conversation_b"])
    return record


def read_battles(path: str | Path) -> list[dict]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise DataError(f"{path}: cannot read the battle log ({e.strerror})") from None
    if text.lstrip().startswith("["):  # FastChat's clean_battle_*.json is one JSON array
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        return [_check(path, i, r) for i, r in enumerate(items, 1)]
    return [_check(path, n, r) for n, r in json_objects(path, text.splitlines())]


def write_battles(records: Iterable[dict], out) -> int:
    n = 0
    for record in records:
        out.write(json.dumps(record, ensure_ascii=False) + "\n")
        n += 1
    return n
