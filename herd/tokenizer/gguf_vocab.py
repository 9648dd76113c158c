"""The vocabulary embedded in a GGUF file (`tokenizer.ggml.*`, reference §7.2), rebuilt as a `tokenizers` pipeline.

- "gpt2": byte-level BPE from tokens + merges; the split rule comes from `tokenizer.ggml.pre`, as in
  llama.cpp's `llama_vocab::impl::load` and `llm_tokenizer_bpe` (src/llama-vocab.cpp), see `PRE_TOKENIZERS`.
- "llama": SentencePiece BPE from tokens + scores + types (as transformers' GGUF converter rebuilds it):
  merges ranked by the score of the merged piece, byte fallback, "▁" for space, the dummy prefix per
  `add_space_prefix` on every stretch of text between control tokens (llama.cpp's rule); user-defined
  pieces are matched in the normalized text, as SentencePiece does. Decoded like a SentencePiece model.
Control (and unknown) tokens are special; user-defined tokens are always matched whole and always shown.
"""

from __future__ import annotations

import warnings
from typing import Any

from tokenizers import AddedToken, Regex, decoders, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE

from herd.errors import FormatError
from herd.tokenizer.base import stop_ids_for
from herd.tokenizer.hf_json import TokenizersBackedTokenizer
from herd.tokenizer.spm import BYTE, CONTROL, NORMAL, UNKNOWN, USER_DEFINED, PieceTable
from herd.tokenizer.tiktoken_bpe import LLAMA3_PATTERN, LLAMA4_PATTERN

_LLAMA3 = ("llama3", LLAMA3_PATTERN, True)
_GPT4O = ("gpt-4o", LLAMA4_PATTERN, False)
_DIGITS_GPT2 = ("smollm", None, False)  # llama.cpp: regexes {"\p{N}", GPT-2's}: each number character alone
_GPT2 = ("gpt-2", None, False)

# tokenizer.ggml.pre -> (rule, split regex run before byte-level encoding or None for GPT-2's, ignore_merges).
# ignore_merges: a piece that is itself in the vocabulary is one token (tiktoken's rule; llama.cpp sets it for
# its LLAMA3 group). herd also sets it for "llama4", whose reference tokenizer is tiktoken; llama.cpp does not.
PRE_TOKENIZERS: dict[str, tuple[str, str | None, bool]] = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"), _LLAMA3),
    "dbrx": ("llama3", LLAMA3_PATTERN, False),
    "smaug-bpe": ("llama3", LLAMA3_PATTERN, False),
    "llama4": ("llama4", LLAMA4_PATTERN, True),
    "gpt-4o": _GPT4O,
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"), _DIGITS_GPT2),
    **dict.fromkeys(("gpt-2", "phi-2", "mpt", "olmo", "jais", "exaone4"), _GPT2),
}
_ADD_BOS_BY_DEFAULT = {"llama3", "llama4"}  # llama.cpp's default when the file has no add_bos_token


class GGUFVocabTokenizer(TokenizersBackedTokenizer):
    def __init__(self, metadata: dict[str, Any] | None, name: str = "GGUF"):
        md = metadata or {}
        model = md.get("tokenizer.ggml.model")
        tokens = md.get("tokenizer.ggml.tokens")
        if not tokens or not isinstance(tokens, (list, tuple)) or not all(isinstance(t, str) for t in tokens):
            raise FormatError(f"{name}: tokenizer.ggml.tokens is missing or not a list of strings")
        n = len(tokens)
        raw_types = md.get("tokenizer.ggml.token_type")
        if raw_types is not None and not _all(raw_types, int):
            raise FormatError(f"{name}: tokenizer.ggml.token_type must be a list of integers, got {_show(raw_types)}")
        types = [NORMAL] * n if raw_types is None else list(raw_types)
        if len(types) != n:
            raise FormatError(f"{name}: tokenizer.ggml.token_type has {len(types)} entries for {n} tokens")
        self._tokens, self._types = list(tokens), types

        for key in ("add_bos_token", "add_space_prefix"):
            if not isinstance(md.get(f"tokenizer.ggml.{key}", False), bool):
                raise FormatError(f"{name}: tokenizer.ggml.{key} must be a bool, got {_show(md[f'tokenizer.ggml.{key}'])}")
        if model == "gpt2":
            self.kind = "gguf-gpt2"
            pre = md.get("tokenizer.ggml.pre")
            if pre is not None and not isinstance(pre, str):
                raise FormatError(f"{name}: tokenizer.ggml.pre must be a string, got {_show(pre)}")
            backend = self._byte_level(md, pre, name)
            default_bos = PRE_TOKENIZERS.get(pre, _GPT2)[0] in _ADD_BOS_BY_DEFAULT
            self._table = None
        elif model == "llama":
            self.kind = "gguf-llama"
            self._add_prefix = bool(md.get("tokenizer.ggml.add_space_prefix", True))
            backend = self._sentencepiece(md, name)
            default_bos = True
            self._table = PieceTable(self._tokens, types, self._add_prefix)
        else:
            raise FormatError(f"{name}: tokenizer.ggml.model {_show(model)} is not supported (herd reads 'gpt2' and 'llama')")
        self._init_backend(backend)
        self.vocab_size = n  # the file's count, even where a text repeats; specials come from the types:
        self._added = {t: i for i, (t, k) in enumerate(zip(tokens, types)) if k in (CONTROL, UNKNOWN, USER_DEFINED)}

        self.bos_id = self._token_id(md, "bos", name)
        self.eos_id = self._token_id(md, "eos", name)
        self.add_bos = bool(md.get("tokenizer.ggml.add_bos_token", default_bos)) and self.bos_id is not None
        extra = (self._token_id(md, "eot", name), self._token_id(md, "eom", name))
        self.stop_ids = stop_ids_for(self, self.eos_id, *extra)

    def encode(self, text: str, bos: bool | None = None, eos: bool = False, special: bool = False) -> list[int]:
        if self._table is None:
            return super().encode(text, bos, eos, special)
        # SentencePiece normalizes the whole stretch first (dummy prefix, "▁" for space), then matches
        # user-defined pieces in it; the backend holds only those, so special text stays plain here.
        prefix = "\u2581" if self._add_prefix else ""
        ids = [self.bos_id] if (self.add_bos if bos is None else bos) and self.bos_id is not None else []
        ids += self._table.encode(text, special, lambda part: self._hf.encode_batch([prefix + part.replace(" ", "\u2581")])[0].ids)
        if eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        if self._table is not None:
            return self._table.decode(ids, skip_special)
        return super().decode(ids, skip_special)

    def id_to_piece(self, token_id: int) -> str:
        return self._tokens[token_id]

    def is_special(self, token_id: int) -> bool:
        return self._types[token_id] in (CONTROL, UNKNOWN)

    def _vocab(self) -> dict[str, int]:
        return {token: i for i, token in enumerate(self._tokens)}  # a repeated text: the last id, as in llama.cpp

    def _byte_level(self, md: dict[str, Any], pre: str | None, name: str) -> HFTokenizer:
        merges = md.get("tokenizer.ggml.merges")
        if not merges:
            raise FormatError(f"{name}: a 'gpt2' vocabulary needs tokenizer.ggml.merges")
        if not _all(merges, str):
            raise FormatError(f"{name}: tokenizer.ggml.merges must be a list of strings, got {_show(merges)}")
        pairs = []
        for merge in merges:
            left, sep, right = merge.partition(" ")
            if not sep or not left or not right:
                raise FormatError(f"{name}: merge {merge!r} is not two space-separated tokens")
            pairs.append((left, right))
        if pre not in PRE_TOKENIZERS:
            what = f"tokenizer.ggml.pre {pre!r} is unknown to herd" if pre else "no tokenizer.ggml.pre"
            warnings.warn(f"{name}: {what}; splitting text as GPT-2 does", stacklevel=2)
        rule, pattern, ignore_merges = PRE_TOKENIZERS.get(pre, _GPT2)
        try:
            backend = HFTokenizer(BPE(self._vocab(), pairs, ignore_merges=ignore_merges))
        except Exception as e:  # tokenizers raises a bare Exception, e.g. for a merge of unknown tokens
            raise FormatError(f"{name}: cannot build the BPE vocabulary ({e})") from None
        gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if pattern is not None:
            split = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
            bytes_only = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
            backend.pre_tokenizer = pre_tokenizers.Sequence([split, bytes_only])
        elif rule == "smollm":
            digits = pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated")
            backend.pre_tokenizer = pre_tokenizers.Sequence([digits, gpt2])
        else:
            backend.pre_tokenizer = gpt2
        backend.decoder = decoders.ByteLevel()
        control = [t for t, k in zip(self._tokens, self._types) if k in (CONTROL, UNKNOWN)]
        user = [t for t, k in zip(self._tokens, self._types) if k == USER_DEFINED]
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
        backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
        return backend

    def _sentencepiece(self, md: dict[str, Any], name: str) -> HFTokenizer:
        scores = md.get("tokenizer.ggml.scores")
        if scores is not None and not _all(scores, (int, float)):
            raise FormatError(f"{name}: tokenizer.ggml.scores must be a list of numbers, got {_show(scores)}")
        if scores is None or len(scores) != len(self._tokens):
            raise FormatError(f"{name}: a 'llama' vocabulary needs one tokenizer.ggml.scores entry per token")
        vocab = self._vocab()
        unk = next((t for t, k in zip(self._tokens, self._types) if k == UNKNOWN), None)
        model = BPE(vocab, spm_merges(self._tokens, self._types, scores, vocab), unk_token=unk,
                    fuse_unk=True, byte_fallback=any(k == BYTE for k in self._types))  # fmt: skip
        backend = HFTokenizer(model)  # no normalizer or pre-tokenizer: encode() hands it normalized text
        user = [t for t, k in zip(self._tokens, self._types) if k == USER_DEFINED]
        backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
        return backend

    def _token_id(self, md: dict[str, Any], role: str, name: str) -> int | None:
        value = md.get(f"tokenizer.ggml.{role}_token_id")
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise FormatError(f"{name}: tokenizer.ggml.{role}_token_id must be a token id, got {_show(value)}")
        if not 0 <= value < len(self._tokens):
            raise FormatError(f"{name}: tokenizer.ggml.{role}_token_id {value} is outside the {len(self._tokens)} tokens")
        return int(value)


def _all(values: Any, kind) -> bool:
    """A list whose every element is of `kind` (bools are not numbers here)."""
    return isinstance(values, list) and all(isinstance(v, kind) and not isinstance(v, bool) for v in values)


def _show(value: Any) -> str:
    """A short picture of a metadata value for an error message (a vocabulary list can be 10^5 long)."""
    if isinstance(value, list):
        return f"a list of {len(value)} starting {value[:3]!r}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def spm_merges(tokens: list[str], types: list[int], scores: list[float], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges that reproduce SentencePiece's rule (join the adjacent pair whose joined piece scores
    highest) for a vocabulary that lists only pieces and scores: every split of a normal piece into two
    vocabulary pieces, best joined score first."""
    ranked = []
    for i, (token, kind) in enumerate(zip(tokens, types)):
        if kind != NORMAL or len(token) < 2 or vocab.get(token) != i:
            continue
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                ranked.append((-float(scores[i]), i, vocab[left], (left, right)))
    ranked.sort(key=lambda r: r[:3])
    return [r[3] for r in ranked]
