"""SentencePiece `tokenizer.model` (Llama 1/2): encoding through the `sentencepiece` library.

Decoding is herd's own (`PieceTable`), shared with GGUF "llama" vocabularies, so that special tokens can
be shown or skipped and the SentencePiece leading-space rule is applied the same way everywhere.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Callable
from pathlib import Path

import sentencepiece

from herd.errors import FormatError
from herd.tokenizer.base import Tokenizer, stop_ids_for

# Piece types: SentencePiece's ModelProto enum, which GGUF's tokenizer.ggml.token_type copies.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")

# SentencePiece (and HF's ByteFallback) turn every byte of an invalid UTF-8 sequence into its own U+FFFD.
codecs.register_error("herd-fffd-per-byte", lambda e: ("\ufffd" * (e.end - e.start), e.end))


class PieceTable:
    """Ids to text for SentencePiece-style vocabularies ("▁" for space, <0xNN> byte pieces).

    As SentencePiece does, the dummy-prefix space is dropped from the first piece of the text when
    the model adds one, and each byte of invalid UTF-8 becomes one U+FFFD. Control and unknown tokens
    are "special": shown as their text, or skipped (SentencePiece itself always hides control tokens
    and shows <unk> as " ⁇ ").
    """

    def __init__(self, pieces: list[str], types: list[int], add_dummy_prefix: bool):
        self.pieces, self.types, self.add_dummy_prefix = pieces, types, add_dummy_prefix
        self.surfaces: list[bytes] = []
        for piece, kind in zip(pieces, types):
            match = _BYTE_PIECE.match(piece) if kind == BYTE else None
            self.surfaces.append(bytes([int(match[1], 16)]) if match else piece.replace("\u2581", " ").encode())
        named = [(p, i) for i, (p, k) in enumerate(zip(pieces, types)) if k in (CONTROL, UNKNOWN, USER_DEFINED)]
        self.named = dict(named)  # text -> id (a repeated text: the last id, as in llama.cpp)
        self.special_texts = {p: i for p, i in self.named.items() if self.is_special(i)}
        self._splitter = special_splitter(list(self.special_texts))

    def encode(self, text: str, special: bool, encode_stretch: Callable[[str], list[int]]) -> list[int]:
        """With special=True, special-token texts become their ids and each stretch of text between them
        gets its own dummy prefix, as in llama.cpp and Meta's Llama 2 chat encoding (one call per turn)."""
        if not (special and self._splitter):
            return encode_stretch(text) if text else []
        ids: list[int] = []
        for part in self._splitter.split(text):
            if part in self.special_texts:
                ids.append(self.special_texts[part])
            elif part:
                ids += encode_stretch(part)
        return ids

    def is_special(self, token_id: int) -> bool:
        return self.types[token_id] in (CONTROL, UNKNOWN)

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        if ids and (min(ids) < 0 or max(ids) >= len(self.pieces)):
            bad = next(i for i in ids if not 0 <= i < len(self.pieces))
            raise ValueError(f"token id {bad} is outside this vocabulary of {len(self.pieces)}")
        if skip_special:
            ids = [i for i in ids if not self.is_special(i)]
        out = b"".join(self.surfaces[i] for i in ids)
        if self.add_dummy_prefix and ids and self.types[ids[0]] in (NORMAL, USER_DEFINED, UNUSED):
            out = out.removeprefix(b" ") if self.pieces[ids[0]].startswith("\u2581") else out
        return out.decode("utf-8", errors="herd-fffd-per-byte")


def special_splitter(texts: list[str]) -> re.Pattern[str] | None:
    """A regex that cuts text around any of `texts` (longest first), keeping them as separate parts."""
    if not texts:
        return None
    return re.compile("(" + "|".join(re.escape(t) for t in sorted(texts, key=len, reverse=True)) + ")")


class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"

    def __init__(self, path: Path, data: bytes | None = None):
        data = Path(path).read_bytes() if data is None else data
        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(data)
        except (RuntimeError, OSError) as e:
            raise FormatError(f"{path}: not a SentencePiece model ({e})") from None
        pieces, types, add_dummy_prefix = read_model_proto(data, path)
        if len(pieces) != self._sp.get_piece_size():
            raise FormatError(f"{path}: {len(pieces)} pieces parsed, sentencepiece reports {self._sp.get_piece_size()}")
        self._table = PieceTable(pieces, types, add_dummy_prefix)
        self.vocab_size = len(pieces)
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None
        self.add_bos = self.bos_id is not None
        self.stop_ids = stop_ids_for(self, self.eos_id)

    def encode(self, text: str, bos: bool | None = None, eos: bool = False, special: bool = False) -> list[int]:
        ids = [self.bos_id] if (self.add_bos if bos is None else bos) and self.bos_id is not None else []
        ids += self._table.encode(text, special, self._sp.encode)
        if eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        return self._table.decode(ids, skip_special)

    def special_id(self, text: str) -> int | None:
        return self._table.named.get(text)

    def id_to_piece(self, token_id: int) -> str:
        return self._table.pieces[token_id]

    def is_special(self, token_id: int) -> bool:
        return self._table.is_special(token_id)


def read_model_proto(data: bytes, path: Path | str = "tokenizer.model") -> tuple[list[str], list[int], bool]:
    """(pieces, piece types, add_dummy_prefix) from a serialized SentencePiece ModelProto.

    A minimal protobuf walk (ModelProto.pieces = 1 {piece = 1, score = 2, type = 3},
    ModelProto.normalizer_spec = 3 {add_dummy_prefix = 3}), so herd needs no protobuf package.
    """
    pieces, types, add_dummy_prefix = [], [], True
    try:
        for field, value in _fields(data, 0, len(data)):
            if field == 1 and isinstance(value, tuple):
                piece, kind = "", NORMAL
                for sub, sub_value in _fields(data, *value):
                    if sub == 1:
                        piece = data[sub_value[0] : sub_value[1]].decode("utf-8")
                    elif sub == 3:
                        kind = sub_value
                pieces.append(piece)
                types.append(kind)
            elif field == 3 and isinstance(value, tuple):
                for sub, sub_value in _fields(data, *value):
                    if sub == 3:
                        add_dummy_prefix = bool(sub_value)
    except (IndexError, UnicodeDecodeError, ValueError) as e:
        raise FormatError(f"{path}: malformed SentencePiece model ({e})") from None
    return pieces, types, add_dummy_prefix


def read_model_kind(data: bytes, path: Path | str = "tokenizer.model") -> tuple[int, bool]:
    """(TrainerSpec.model_type: 1 unigram, the default when unstated, 2 BPE, 3 word, 4 char; whether the
    model normalizes text: a non-empty NormalizerSpec.precompiled_charsmap) of a serialized ModelProto
    (trainer_spec = 2 {model_type = 3}, normalizer_spec = 3 {precompiled_charsmap = 2})."""
    model_type, normalizes = 1, False
    try:
        for field, value in _fields(data, 0, len(data)):
            if field in (2, 3) and isinstance(value, tuple):
                for sub, sub_value in _fields(data, *value):
                    if field == 2 and sub == 3 and isinstance(sub_value, int):
                        model_type = sub_value
                    elif field == 3 and sub == 2 and isinstance(sub_value, tuple):
                        normalizes = sub_value[1] > sub_value[0]
    except (IndexError, ValueError) as e:
        raise FormatError(f"{path}: malformed SentencePiece model ({e})") from None
    return model_type, normalizes


def _fields(buf: bytes, pos: int, end: int):
    """(field number, value) pairs of one protobuf message: ints for varints, (start, end) for bytes."""
    while pos < end:
        key, pos = _varint(buf, pos)
        wire = key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = (pos, pos + size), pos + size
            if pos > end:
                raise ValueError("field runs past the end of its message")
        elif wire in (1, 5):
            value, pos = None, pos + (8 if wire == 1 else 4)
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield key >> 3, value


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
