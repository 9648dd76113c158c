"""Battle logs in the shape of FastChat's clean_battle JSONL, read and checked line by line.

A record: model_a, model_b, winner (model_a | model_b | tie | tie (bothbad)), judge, conversation_a/_b
(OpenAI-shaped messages), turn, anony, language, tstamp, conv_metadata (token and markdown counts), and
herd's additions: question_id (the battle's id), fingerprint_a/_b and verified_a/_b (the exact weights;
verified only where herd loaded and hashed them itself, never for an endpoint's claim), sampling (the
settings both answers were generated with), board ("human" or "judge") and tstamp_start; an assistant
message may carry `"cut": true` (the voter's page closed before it finished: the answer so far) or
`"failed": true` (the contestant failed to answer). Published LMArena logs carry only FastChat's fields;
they rate the same way, each name one variant.

Every field herd reads is checked for its type and range (a log is input from anywhere), so a bad line is
a DataError naming the file, the line and what is wrong, never a traceback.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable

from herd.arena import untrusted
from herd.arena.rating import WINNERS
from herd.arena.style import conv_metadata
from herd.errors import DataError


MAX_NAME_CHARS = 200  # the contestants table's name and fingerprint columns
MAX_ID_CHARS = 64  # the battles table's uid column
MAX_JUDGE_CHARS = 100  # the battles table's voter column
MAX_COUNT = 2**31 - 1  # token counts are stored as 32-bit integers
STYLE_KEYS = [f"{key}_{side}" for side in "ab" for key in ("header_count", "list_count", "bold_count")]


def _is_number(value) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an int past a float's range
        return False


def _is_id(value) -> bool:
    if isinstance(value, int) and not isinstance(value, bool):
        return abs(value) < 10 ** (MAX_ID_CHARS - 1)
    return isinstance(value, str) and len(value) <= MAX_ID_CHARS


def _is_count(value) -> bool:
    return _is_number(value) and 0 <= value <= MAX_COUNT


def _problem(record: dict) -> str | None:
    """What makes `record` unusable as a battle, or None."""
    for key in ("model_a", "model_b"):
        if not isinstance(record.get(key), str) or not record[key] or len(record[key]) > MAX_NAME_CHARS:
            return (f"`{key}` must be a contestant's name (1 to {MAX_NAME_CHARS} characters), "
                    f"got {_show(record.get(key))}")
    for key in ("fingerprint_a", "fingerprint_b"):
        if record.get(key) is not None and (not isinstance(record[key], str) or len(record[key]) > MAX_NAME_CHARS):
            return f"`{key}` must be a string of at most {MAX_NAME_CHARS} characters, got {_show(record[key])}"
    if record["model_a"] == record["model_b"] and record.get("fingerprint_a") == record.get("fingerprint_b"):
        return f"`model_a` and `model_b` are the same contestant ({record['model_a']!r})"
    if not isinstance(record.get("winner"), str) or record["winner"] not in WINNERS:
        return f"`winner` must be one of {', '.join(WINNERS)}; got {_show(record.get('winner'))}"
    for key in ("conversation_a", "conversation_b"):
        conv = record.get(key)
        if conv is not None and not (isinstance(conv, list) and all(
                isinstance(m, dict) and isinstance(m.get("content"), str) and isinstance(m.get("role"), str)
                and m["role"] for m in conv)):
            return f"`{key}` must be a list of {{role, content}} messages (strings)"
    for key in ("tstamp", "tstamp_start"):
        if record.get(key) is not None and not _is_number(record[key]):
            return f"`{key}` must be a time in seconds (a finite number), got {_show(record[key])}"
    qid = record.get("question_id")
    if qid is not None and not _is_id(qid):
        return f"`question_id` must be a string or integer of at most {MAX_ID_CHARS} characters, got {_show(qid)}"
    judge = record.get("judge")
    if judge is not None and (not isinstance(judge, str) or len(judge) > MAX_JUDGE_CHARS):
        return f"`judge` must be a string of at most {MAX_JUDGE_CHARS} characters, got {_show(judge)}"
    for key in ("verified_a", "verified_b", "anony"):
        if record.get(key) is not None and not isinstance(record[key], bool):
            return f"`{key}` must be true or false, got {_show(record[key])}"
    if record.get("sampling") is not None and not isinstance(record["sampling"], dict):
        return f"`sampling` must be an object of sampling settings, got {_show(record['sampling'])}"
    if record.get("board", "human") not in ("human", "judge"):
        return f"`board` must be human or judge, got {_show(record['board'])}"
    meta = record.get("conv_metadata")
    if meta is not None:
        if not isinstance(meta, dict):
            return f"`conv_metadata` must be an object, got {_show(meta)}"
        for key in ("sum_assistant_a_tokens", "sum_assistant_b_tokens"):
            if not _is_count(meta.get(key)):
                return (f"`conv_metadata.{key}` must be a count (a number from 0 to {MAX_COUNT}), "
                        f"got {_show(meta.get(key))}")
        for key in STYLE_KEYS:
            value = meta.get(key)
            if not (_is_count(value) or isinstance(value, dict) and value and all(map(_is_count, value.values()))):
                return f"`conv_metadata.{key}` must be a count or an object of counts, got {_show(value)}"
    return None


def _show(value) -> str:
    """A short description of a bad value for an error line."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**18:
        return "an integer past 10**18"
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def _check(where: str, record) -> dict:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object (one battle), got {type(record).__name__}")
    problem = _problem(record)
    if problem:
        raise DataError(f"{where}: {problem}")
    if "conv_metadata" not in record and record.get("conversation_a") and record.get("conversation_b"):
        record["conv_metadata"] = conv_metadata(record["conversation_a"], record["conversation_b"])
    return record


def read_battles(path: str | Path) -> list[dict]:
    """The battles of a log, each checked; DataError naming the file and line (or item) of the first bad one."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise DataError(f"{path}: cannot read the battle log ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        line = e.object[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 (byte {e.object[e.start]:#04x})") from None
    if text.lstrip().startswith("["):  # FastChat's clean_battle_*.json is one JSON array
        try:
            items = untrusted.loads(text)
        except untrusted.UntrustedJSON as e:
            raise DataError(f"{path}: {e}") from None
        if not isinstance(items, list):
            raise DataError(f"{path}: expected a JSON array of battles")
        return [_check(f"{path}: item {i}", r) for i, r in enumerate(items, 1)]
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = untrusted.loads(line)
        except untrusted.UntrustedJSON as e:
            raise DataError(f"{path}:{n}: {e}") from None
        records.append(_check(f"{path}:{n}", record))
    return records


def write_battles(records: Iterable[dict], out) -> int:
    n = 0
    for record in records:
        out.write(json.dumps(record, ensure_ascii=False) + "\n")
        n += 1
    return n
