"""tiktoken-format `tokenizer.model` (Llama 3, Llama 4): base64 byte strings with their ranks, one a line.

The file holds only the mergeable ranks; the split regex and the special tokens come from Meta's
`llama3/tokenizer.py` and `llama4/tokenizer.py` (reference §5.2, §5.3). A 200000-rank file is Llama 4,
any other size gets the Llama 3 scheme (256 specials after the ranks).
"""

from __future__ import annotations

import base64
import binascii
import re
from functools import lru_cache
from pathlib import Path

import tiktoken

from herd.errors import FormatError
from herd.tokenizer.base import Tokenizer, stop_ids_for

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA4_PATTERN = (  # O200K-style
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA4_BASE_TOKENS = 200000

# Meta encodes at most this many characters per tiktoken call, and cuts runs of (non-)whitespace
# longer than the second limit, which otherwise overflow the regex engine's stack.
_MAX_ENCODE_CHARS = 400_000
_MAX_RUN_CHARS = 25_000
_LONG_RUN = re.compile(r"\s{%d}|\S{%d}" % (_MAX_RUN_CHARS + 1, _MAX_RUN_CHARS + 1))
_TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/]+=*[ \t]+[0-9]+\r?$")


def llama3_special_tokens(count: int = 256) -> list[str]:
    """Llama 3.1+ names (llama-models); 3.0 called 128004/5/8/10/11 reserved tokens."""
    named = [
        "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>",
        "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|image|>",
    ]  # fmt: skip
    return named + [f"<|reserved_special_token_{2 + i}|>" for i in range(count - len(named))]


def llama4_special_tokens(count: int = 2048) -> list[str]:
    def reserved(name: str, n: int, start: int = 0) -> list[str]:
        return [f"<|{name}_reserved_special_token_{start + i}|>" for i in range(n)]

    basic = ["<|begin_of_text|>", "<|end_of_text|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"]
    text = [
        "<|header_start|>", "<|header_end|>", "<|eom|>", "<|eot|>", "<|step|>", *reserved("text_post_train", 6),
        "<|python_start|>", "<|python_end|>", "<|finetune_right_pad|>", *reserved("text_post_train", 61, 6),
    ]  # fmt: skip
    vision = [
        "<|image_start|>", "<|image_end|>", *reserved("vision", 2), "<|tile_x_separator|>", "<|tile_y_separator|>",
        *reserved("vision", 4, 2), "<|image|>", *reserved("vision", 1, 6), "<|patch|>", *reserved("vision", 1041, 7),
    ]  # fmt: skip
    reasoning = [*reserved("reasoning", 8), "<|reasoning_thinking_start|>", "<|reasoning_thinking_end|>"]
    named = basic + text + vision + reasoning
    return named + [f"<|reserved_special_token_{i}|>" for i in range(count - len(named))]


@lru_cache(maxsize=1)
def byte_level_alphabet() -> list[str]:
    """GPT-2's printable spelling of each byte value, as HF tokenizer.json and GGUF vocabularies store it."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelling, extra = {}, 0
    for b in range(256):
        if b in keep:
            spelling[b] = chr(b)
        else:
            spelling[b] = chr(256 + extra)
            extra += 1
    return [spelling[b] for b in range(256)]


def is_tiktoken_file(head: bytes) -> bool:
    """Whether the first bytes of a file read as tiktoken's `base64 rank` lines."""
    first = head.split(b"\n", 1)[0]
    return bool(_TIKTOKEN_LINE.match(first))


def read_ranks(data: bytes, path: Path | str) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error) as e:
            raise FormatError(f"{path}: line {lineno} is not a tiktoken `base64 rank` pair ({e})") from None
    if not ranks:
        raise FormatError(f"{path}: tiktoken file holds no ranks")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise FormatError(f"{path}: tiktoken ranks are not the distinct integers 0..{len(ranks) - 1}")
    return ranks


class TiktokenTokenizer(Tokenizer):
    kind = "tiktoken"

    def __init__(self, path: Path, data: bytes | None = None):
        ranks = read_ranks(Path(path).read_bytes() if data is None else data, path)
        self.n_base = len(ranks)
        llama4 = self.n_base == LLAMA4_BASE_TOKENS
        names = llama4_special_tokens() if llama4 else llama3_special_tokens()
        self._special = {name: self.n_base + i for i, name in enumerate(names)}
        self._model = tiktoken.Encoding(
            name=Path(path).name,
            pat_str=LLAMA4_PATTERN if llama4 else LLAMA3_PATTERN,
            mergeable_ranks=ranks,
            special_tokens=self._special,
        )
        self.vocab_size = self.n_base + len(names)
        self.bos_id = self._special["<|begin_of_text|>"]
        self.eos_id = self._special["<|end_of_text|>"]
        self.add_bos = True
        self.stop_ids = stop_ids_for(self, self.eos_id)

    def encode(self, text: str, bos: bool | None = None, eos: bool = False, special: bool = False) -> list[int]:
        allowed = "all" if special else set()
        ids = [self.bos_id] if (self.add_bos if bos is None else bos) else []
        for part in _meta_chunks(text):
            ids += self._model.encode(part, allowed_special=allowed, disallowed_special=())
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        self._check(ids)
        if skip_special:
            ids = [i for i in ids if i < self.n_base]
        return self._model.decode_bytes(ids).decode("utf-8", errors="replace")

    def special_id(self, text: str) -> int | None:
        return self._special.get(text)

    def id_to_piece(self, token_id: int) -> str:
        self._check([token_id])
        raw = self._model.decode_single_token_bytes(token_id)
        if token_id >= self.n_base:
            return raw.decode("utf-8")
        alphabet = byte_level_alphabet()
        return "".join(alphabet[b] for b in raw)

    def is_special(self, token_id: int) -> bool:
        return token_id >= self.n_base

    def _check(self, ids: list[int]) -> None:
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise ValueError(f"token id {bad} is outside this vocabulary of {self.vocab_size}")


def _meta_chunks(text: str):
    """Meta's cuts of long input (llama3 tokenizer.py), so very long texts tokenize as the reference does."""
    if len(text) <= _MAX_ENCODE_CHARS and not _LONG_RUN.search(text):
        yield text
        return
    for start in range(0, len(text), _MAX_ENCODE_CHARS):
        yield from _split_runs(text[start : start + _MAX_ENCODE_CHARS])


def _split_runs(s: str):
    run_len, run_is_space, start = 0, (s[0].isspace() if s else False), 0
    for i, ch in enumerate(s):
        is_space = ch.isspace()
        if run_is_space ^ is_space:
            run_len, run_is_space = 1, is_space
        else:
            run_len += 1
            if run_len > _MAX_RUN_CHARS:
                yield s[start:i]
                start, run_len = i, 1
    yield s[start:]
