"""Training data: JSONL or text files → token ids with a loss mask → rows of packed sequences.

Formats, told apart by the first record's keys (every line must be of the same kind):
- chat: {"messages": [...]} rendered with the model's own chat format; loss on the assistant turns only
  (each assistant message's tokens, its end-of-turn token included, as the format renders them);
- prompt/completion: {"prompt": ..., "completion": ...}; BOS + prompt + completion + EOS, loss on the
  completion and EOS;
- text: {"text": ...} lines, or a .txt file (one document): loss on every token; a document longer than a
  sequence is cut into sequences (that is what packing text means, nothing is dropped);
- preference: {"prompt", "chosen", "rejected"} for DPO (herd.finetune.dpo).

Packing puts examples one after another into rows of at most `max_len` tokens; every example keeps its
own positions (0, 1, ...) and segment id, and the training forward masks attention to the example's own
segment (herd.finetune.forward), so nothing attends across an example boundary.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from herd.errors import DataError
from herd.jsonl import json_objects

IGNORE = -100  # target of a position that is not trained (PyTorch's cross_entropy ignore_index)


@dataclass
class Example:
    ids: list[int]
    train: list[bool]  # train[t]: token t is a target (predicted from the tokens before it)
    where: str = ""  # file:line, for messages


@dataclass
class Dataset:
    examples: list[Example]
    kind: str
    path: Path
    sha256: str
    truncated: int = 0  # examples cut to max_len (only with truncate=True)
    records: int = 0

    @property
    def tokens(self) -> int:
        return sum(len(e.ids) for e in self.examples)


MAX_RECORD_BYTES = 1 << 20  # one JSONL record (one line), or one line of a .txt file: 1 MiB
PIECE_CHARS = 1 << 16  # long texts are tokenized in pieces of about this many characters (encode_text)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


KINDS = {"chat": ("messages",), "prompt_completion": ("prompt", "completion"), "text": ("text",),
         "preference": ("prompt", "chosen", "rejected")}


def record_kind(record: dict) -> str | None:
    keys = set(record)
    if {"prompt", "chosen", "rejected"} <= keys:
        return "preference"
    if "messages" in keys:
        return "chat"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if "text" in keys:
        return "text"
    return None


@dataclass
class DataFile:
    """A data file read and checked before any model is loaded: every record is JSON of the file's one kind, with
    fields of the right types, valid Unicode and at most MAX_RECORD_BYTES long. A .txt file is one text record."""

    path: Path
    sha256: str
    kind: str
    records: list[tuple[str, dict]]  # (file:line, record)


def _lines(path: Path, h) -> Iterator[str]:
    """The file's lines as text, each checked against MAX_RECORD_BYTES before it is decoded (a 20 MB line is
    refused after reading 1 MiB of it); every byte read goes into the hash `h`."""
    with open(path, "rb") as f:
        for n in itertools.count(1):
            line = f.readline(MAX_RECORD_BYTES + 3)  # room for the line's own \r\n
            if not line:
                return
            h.update(line)
            if len(line.rstrip(b"\r\n")) > MAX_RECORD_BYTES:
                raise DataError(f"{path}:{n}: a line longer than {MAX_RECORD_BYTES >> 20} MiB, herd's bound on one "
                                "record (split it into several records; a long document can go in a .txt file)")
            try:
                yield line.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{n}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _check_unicode(value, where: str) -> None:
    """DataError for a string anywhere in `value` that no tokenizer can encode: JSON's \\ud800 escape gives Python
    a lone surrogate."""
    todo = [value]
    while todo:
        v = todo.pop()
        if isinstance(v, str):
            if not v.isascii():
                try:
                    v.encode("utf-8")
                except UnicodeEncodeError as e:
                    raise DataError(f"{where}: a string holds a lone surrogate ({v[e.start]!r}) at character {e.start}: "
                                    "not valid Unicode") from None
        elif isinstance(v, dict):
            todo += list(v.keys()) + list(v.values())
        elif isinstance(v, list):
            todo += v


def _check_messages(messages, where: str, key: str = "messages") -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: \"{key}\" must be a non-empty list of messages, got {_type(messages)}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(f"{where}: {key}[{i}] must be an object with \"role\" and \"content\", got {_type(m)}")
        if not isinstance(m.get("role"), str):
            raise DataError(f"{where}: {key}[{i}].role must be a string, got {_type(m.get('role'))}")
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise DataError(f"{where}: {key}[{i}].content must be a string or a list of parts, got {_type(content)}")


def _type(value) -> str:
    return "null" if value is None else type(value).__name__


def _check_record(record: dict, kind: str, where: str) -> None:
    """The fields a record of `kind` needs, of the types it needs, before anything is tokenized."""
    _check_unicode(record, where)
    if kind == "chat":
        _check_messages(record["messages"], where)
        if not any(m.get("role") == "assistant" for m in record["messages"]):
            raise DataError(f"{where}: no assistant message, so nothing to learn")
    elif kind == "preference":
        if isinstance(record["prompt"], list):
            _check_messages(record["prompt"], where, "prompt")
        elif not isinstance(record["prompt"], str):
            raise DataError(f"{where}: \"prompt\" must be a string or a list of chat messages, got "
                            f"{_type(record['prompt'])}")
        for key in ("chosen", "rejected"):
            if not isinstance(record[key], str) or not record[key]:
                raise DataError(f"{where}: \"{key}\" must be a non-empty string, got {_type(record[key])}")
    else:
        for key in KINDS[kind]:
            _string(record, key, where)


def read_data(path: str | Path) -> DataFile:
    """Read and check a data file (see DataFile); the kind is told by the first record (a .txt file: text)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such data file")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file (a directory, device or pipe); give a .jsonl or .txt file")
    h = hashlib.sha256()
    if path.suffix == ".txt":
        text = "".join(_lines(path, h))
        _check_unicode(text, str(path))
        return DataFile(path, h.hexdigest(), "text", [(str(path), {"text": text})])
    records, kind = [], None
    for n, record in json_objects(path, _lines(path, h)):
        where = f"{path}:{n}"
        this = record_kind(record)
        if this is None:
            raise DataError(f"{where}: a record needs \"messages\", \"prompt\" + \"completion\", \"text\", or "
                            f"\"prompt\" + \"chosen\" + \"rejected\"; it has {sorted(record)[:6]}")
        if kind is None:
            kind = this
        elif this != kind:
            raise DataError(f"{where}: a {this} record in a file of {kind} records (line 1 decides the kind)")
        _check_record(record, kind, where)
        records.append((where, record))
    if not records:
        raise DataError(f"{path}: no records")
    return DataFile(path, h.hexdigest(), kind, records)


def read_records(path: str | Path) -> tuple[list[tuple[str, dict]], str]:
    """[(file:line, record)] of a JSONL file, all of one kind, and the kind. Blank lines are skipped."""
    data = read_data(path)
    return data.records, data.kind


def _string(record: dict, key: str, where: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise DataError(f"{where}: field \"{key}\" must be a string, got {type(value).__name__}")
    return value


def chat_example(messages, tokenizer, chat_format, where: str) -> Example:
    """Rendered once per assistant turn: the conversation up to that turn with the assistant header, then
    through it; the tokens in between are that turn's (trained) tokens. The format must render each prefix
    as a prefix of the whole, which every built-in format and ordinary template does."""
    from herd.chat import render
    from herd.errors import TemplateError

    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: \"messages\" must be a non-empty list")
    if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message, so nothing to learn")
    if chat_format is None:
        raise DataError(f"{where}: a chat record, but this model has no chat format (no template, unknown generation)")
    try:
        full = render(messages, tokenizer, chat_format, add_generation_prompt=False)
        train = [False] * len(full)
        for i, m in enumerate(messages):
            if m.get("role") != "assistant":
                continue
            before = render(messages[:i], tokenizer, chat_format, add_generation_prompt=True) if i else []
            through = render(messages[: i + 1], tokenizer, chat_format, add_generation_prompt=False)
            if full[: len(through)] != through or through[: len(before)] != before:
                raise DataError(f"{where}: the chat format does not render message {i} as a prefix of the "
                                "whole conversation, so its tokens cannot be told apart")
            for t in range(len(before), len(through)):
                train[t] = True
    except TemplateError as e:
        raise DataError(f"{where}: {e}") from None
    return Example(full, train, where)


def prompt_completion_example(prompt: str, completion: str, tokenizer, where: str) -> Example:
    head = tokenizer.encode(prompt, bos=True) if tokenizer.bos_id is not None else tokenizer.encode(prompt)
    tail = tokenizer.encode(completion, bos=False)
    if tokenizer.eos_id is not None:
        tail.append(tokenizer.eos_id)
    if not tail:
        raise DataError(f"{where}: empty completion")
    return Example(head + tail, [False] * len(head) + [True] * len(tail), where)


_PIECE_START = re.compile(r"(?<=\S\n)(?=\S)")  # after a newline that stands alone between two visible characters


def encode_text(tokenizer, text: str, bos: bool) -> list[int]:
    """tokenizer.encode(text, bos=bos), a long text in pieces of about PIECE_CHARS characters, so that the
    tokenizer's working memory (HF tokenizers holds about 100 bytes per character while encoding) follows the
    piece, not the text. A piece begins after a newline that stands alone between two visible characters: there
    every tokenizer herd reads splits anyway (byte-level BPE pre-tokenizers end a pre-token at such a newline,
    SentencePiece has no piece across it). A later piece is encoded with that newline in front and the newline's
    own tokens dropped, so that a dummy prefix or other start-of-text rule applies once, as in the whole text;
    if the newline does not encode as it does alone, the text is encoded whole. The ids are those of one encode
    (tests/test_finetune_data.py checks each kind of tokenizer), except where a tokenizer cuts a very long text
    itself: Meta's tiktoken code (herd.tokenizer.tiktoken_bpe) cuts every 400,000 characters, wherever that
    falls, and a piece is never that long."""
    if len(text) <= PIECE_CHARS:
        return tokenizer.encode(text, bos=bos)
    newline = tokenizer.encode("\n", bos=False)
    ids, start = [], 0
    while start < len(text):
        found = _PIECE_START.search(text, start + PIECE_CHARS)
        end = found.start() if found else len(text)
        if start == 0:
            ids += tokenizer.encode(text[:end], bos=bos)
        else:
            part = tokenizer.encode("\n" + text[start:end], bos=False)
            if part[:len(newline)] != newline:
                return tokenizer.encode(text, bos=bos)
            ids += part[len(newline):]
        start = end
    return ids


def text_examples(text: str, tokenizer, max_len: int, where: str) -> list[Example]:
    ids = encode_text(tokenizer, text, bos=tokenizer.bos_id is not None)
    if tokenizer.eos_id is not None:
        ids.append(tokenizer.eos_id)
    return [Example(ids[a:a + max_len], [True] * len(ids[a:a + max_len]), where)
            for a in range(0, len(ids), max_len) if len(ids[a:a + max_len]) > 1]


def load_dataset(data: str | Path | DataFile, tokenizer, chat_format, max_len: int, truncate: bool = False) -> Dataset:
    """The examples of a data file (a path, or a DataFile read_data made) for supervised fine-tuning (chat,
    prompt/completion or text)."""
    data = data if isinstance(data, DataFile) else read_data(data)
    path, kind = data.path, data.kind
    if kind == "preference":
        raise DataError(f"{path}: preference records (prompt/chosen/rejected) are for --method dpo")
    examples, truncated = [], 0
    for where, record in data.records:
        if kind == "text":
            examples += text_examples(record["text"], tokenizer, max_len, where)
            continue
        if kind == "chat":
            example = chat_example(record["messages"], tokenizer, chat_format, where)
        else:
            example = prompt_completion_example(record["prompt"], record["completion"], tokenizer, where)
        if len(example.ids) > max_len:
            if not truncate:
                raise DataError(f"{where}: {len(example.ids)} tokens, longer than --max-len {max_len} "
                                "(raise --max-len, or pass --truncate to cut such examples)")
            example = Example(example.ids[:max_len], example.train[:max_len], where)
            truncated += 1
        if not any(example.train[1:]):
            raise DataError(f"{where}: no trained token" + (" left after truncation" if truncated else ""))
        examples.append(example)
    if not examples:
        raise DataError(f"{path}: no example of two tokens or more to train on")
    return Dataset(examples, kind, path, data.sha256, truncated, len(data.records))


@dataclass
class Row:
    """One packed sequence: examples one after another, each with its own positions and segment."""

    ids: list[int] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)  # targets[t]: the token to predict at t, or IGNORE
    positions: list[int] = field(default_factory=list)
    segments: list[int] = field(default_factory=list)

    def add(self, example: Example) -> None:
        segment = self.segments[-1] + 1 if self.segments else 0
        n = len(example.ids)
        self.ids += example.ids
        self.targets += [example.ids[t + 1] if example.train[t + 1] else IGNORE for t in range(n - 1)] + [IGNORE]
        self.positions += list(range(n))
        self.segments += [segment] * n


def pack(examples: list[Example], max_len: int, packing: bool = True) -> list[Row]:
    """Examples in order into rows of at most max_len tokens (one example per row without packing)."""
    rows: list[Row] = []
    for e in examples:
        if not packing or not rows or len(rows[-1].ids) + len(e.ids) > max_len:
            rows.append(Row())
        rows[-1].add(e)
    return rows


@dataclass
class TensorBatch:
    tokens: torch.Tensor  # [B, T]
    targets: torch.Tensor  # [B, T], IGNORE where nothing is trained
    positions: torch.Tensor
    segments: torch.Tensor  # -1 on padding

    @property
    def n_targets(self) -> int:
        return int((self.targets != IGNORE).sum())

    def to(self, device) -> "TensorBatch":
        return TensorBatch(*(t.to(device) for t in (self.tokens, self.targets, self.positions, self.segments)))


def collate(rows: list[Row], pad_id: int = 0) -> TensorBatch:
    """Rows padded on the right to the longest; padding is its own segment (-1) and never a target."""
    width = max(len(r.ids) for r in rows)

    def padded(values, fill):
        return torch.tensor([v + [fill] * (width - len(v)) for v in values], dtype=torch.long)

    return TensorBatch(padded([r.ids for r in rows], pad_id), padded([r.targets for r in rows], IGNORE),
                       padded([r.positions for r in rows], 0), padded([r.segments for r in rows], -1))


def epoch_order(n_rows: int, seed: int, epoch: int) -> list[int]:
    """The rows' order in one epoch: a permutation that depends only on (seed, epoch), so a resumed run
    sees the same order."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**64)  # (the same for seeds below 2^44)
    return torch.randperm(n_rows, generator=g).tolist()


def check_fits(rows: list[Row], path, context: int) -> None:
    longest = max(len(r.ids) for r in rows)
    if longest > context:
        raise DataError(f"{path}: a sequence of {longest} tokens exceeds the model's context of {context} "
                        "(lower --max-len)")


__all__ = ["IGNORE", "MAX_RECORD_BYTES", "DataFile", "read_data", "encode_text", "Example", "Dataset", "Row", "TensorBatch", "load_dataset", "read_records", "pack", "collate",
           "epoch_order", "check_fits", "file_sha256", "chat_example", "prompt_completion_example", "text_examples"]
