"""Text <-> token ids behind one interface, whatever the model shipped.

Implementations: SentencePiece `tokenizer.model` (Llama 1/2), tiktoken-format `tokenizer.model`
(Llama 3/4), HF `tokenizer.json`, and the vocabulary embedded in a GGUF file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from herd.errors import FormatError
from herd.tokenizer.base import Tokenizer
from herd.tokenizer.stream import StreamDecoder

__all__ = ["StreamDecoder", "Tokenizer", "load_tokenizer", "load_tokenizer_file"]


class TokenizerSource(Protocol):
    """herd.formats.checkpoint.TokenizerSource, by shape: herd.tokenizer must not import herd.formats."""

    kind: str
    path: Path | None
    gguf_metadata: dict[str, Any] | None
    config: dict[str, Any]


def load_tokenizer(source: TokenizerSource) -> Tokenizer:
    """The tokenizer a checkpoint describes: its GGUF vocabulary, tokenizer.json or tokenizer.model.

    A `tokenizer.model` is read as what its bytes are (tiktoken lines or a SentencePiece protobuf),
    whichever kind the source guessed. An `add_bos_token` in `source.config` overrides the default.
    """
    if source.kind == "gguf":
        from herd.tokenizer.gguf_vocab import GGUFVocabTokenizer

        tok: Tokenizer = GGUFVocabTokenizer(source.gguf_metadata, name=str(source.path or "GGUF file"))
    elif source.kind == "hf_json":
        from herd.tokenizer.hf_json import HFJsonTokenizer

        tok = HFJsonTokenizer(_existing(source.path), source.config)
    elif source.kind in ("tiktoken", "sentencepiece"):
        tok = load_tokenizer_file(_existing(source.path))
    else:
        raise FormatError(f"unknown tokenizer kind {source.kind!r} (expected gguf, hf_json, tiktoken or sentencepiece)")
    if source.kind != "hf_json" and "add_bos_token" in (source.config or {}):
        tok.add_bos = bool(source.config["add_bos_token"]) and tok.bos_id is not None
    return tok


def load_tokenizer_file(path: Path | str) -> Tokenizer:
    """A `tokenizer.model`, tiktoken or SentencePiece, told apart by content."""
    from herd.tokenizer.tiktoken_bpe import TiktokenTokenizer, is_tiktoken_file

    path = _existing(path)
    data = path.read_bytes()
    if is_tiktoken_file(data[:1024]):
        return TiktokenTokenizer(path, data)
    from herd.tokenizer.spm import SentencePieceTokenizer

    try:
        return SentencePieceTokenizer(path, data)
    except FormatError:
        raise FormatError(f"{path}: neither a SentencePiece model nor tiktoken `base64 rank` lines") from None


def _existing(path: Path | str | None) -> Path:
    if path is None or not Path(path).is_file():
        raise FormatError(f"tokenizer file {path} does not exist or is not a file")
    return Path(path)
