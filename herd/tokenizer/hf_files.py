"""A tokenizer as the files transformers reads: tokenizer.json, built and written by the `tokenizers` library
so that it gives herd's token ids, and the tokenizer_config.json facts (special tokens, BOS/EOS).

For the tokenizers that come without a tokenizer.json: a GGUF vocabulary, a tiktoken `tokenizer.model`
(Llama 3/4) and a SentencePiece BPE `tokenizer.model` (Llama 1/2). The pipelines are herd's own
(herd.tokenizer.gguf_vocab, tiktoken_bpe, spm), written out whole:
- byte-level BPE (GGUF "gpt2", tiktoken): the vocabulary in GPT-2's byte spelling, the merges, the split
  rule of `tokenizer.ggml.pre` (or Meta's regex), `ignore_merges` where the reference is tiktoken;
- SentencePiece BPE (GGUF "llama", tokenizer.model): merges ranked by the merged piece's score, byte
  fallback, a normalizer that puts the dummy prefix before every stretch of text between special tokens
  (llama.cpp's rule, and Meta's one call per turn) and spells spaces "▁";
- control (and unknown) tokens as special added tokens, user-defined ones as plain added tokens, and a
  post-processor that adds BOS (and EOS) as the source does.
"""

from __future__ import annotations

from pathlib import Path

import sentencepiece
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE

from herd.errors import FormatError
from herd.tokenizer.gguf_vocab import PRE_TOKENIZERS, GGUFVocabTokenizer, spm_merges
from herd.tokenizer.spm import BYTE, CONTROL, NORMAL, UNKNOWN, USER_DEFINED, read_model_kind, read_model_proto
from herd.tokenizer.tiktoken_bpe import (
    LLAMA3_PATTERN,
    LLAMA4_BASE_TOKENS,
    LLAMA4_PATTERN,
    byte_level_alphabet,
    is_tiktoken_file,
    llama3_special_tokens,
    llama4_special_tokens,
    read_ranks,
)

# transformers loads the pipeline exactly as written under this class (4.x and 5.x alike); a model class such
# as LlamaTokenizer would build its own normalizer and pre-tokenizer over the vocabulary instead
TOKENIZER_CLASS = "PreTrainedTokenizerFast"
_SPM_BPE = 2  # sentencepiece TrainerSpec.model_type (1 unigram, 3 word, 4 char)


def hf_tokenizer_files(source) -> tuple[str, dict] | None:
    """(tokenizer.json text, tokenizer_config.json entries) for a herd.formats TokenizerSource that has no
    tokenizer.json; None for one that is already a tokenizer.json (copy it) or a SentencePiece model this
    cannot state (sentencepiece_tokenizer_files)."""
    if source is None or source.kind == "hf_json":
        return None
    if source.kind == "gguf":
        return gguf_tokenizer_files(source.gguf_metadata or {}, str(source.path or "GGUF file"))
    if source.path is None or not Path(source.path).is_file():
        raise FormatError(f"tokenizer file {source.path} does not exist or is not a file")
    data = Path(source.path).read_bytes()
    if is_tiktoken_file(data[:1024]):
        return tiktoken_tokenizer_files(data, source.path)
    return sentencepiece_tokenizer_files(data, source.path, source.config or {})


def gguf_tokenizer_files(metadata: dict, name: str = "GGUF file") -> tuple[str, dict]:
    """A GGUF vocabulary (`tokenizer.ggml.*`) as tokenizer.json + tokenizer_config.json entries."""
    tok = GGUFVocabTokenizer(metadata, name)  # validates the keys and settles BOS/EOS/add_bos as herd does
    tokens = list(metadata["tokenizer.ggml.tokens"])
    types = list(metadata.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    if tok.kind == "gguf-gpt2":
        merges = [tuple(m.split(" ", 1)) for m in metadata["tokenizer.ggml.merges"]]
        backend = byte_level_bpe(tokens, merges, metadata.get("tokenizer.ggml.pre"))
    else:
        scores = [float(s) for s in metadata["tokenizer.ggml.scores"]]
        add_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
        backend = sentencepiece_bpe(tokens, scores, types, add_prefix)
    _add_tokens(backend, tokens, types, user_normalized=tok.kind == "gguf-llama")
    add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
    ids = {role: metadata.get(f"tokenizer.ggml.{key}_token_id") for role, key in
           (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding"))}
    text, config = _finish(backend, ids, tok.add_bos, add_eos)
    # what the file states beyond that, as llama.cpp's converter reads it back from tokenizer_config.json
    if "tokenizer.ggml.add_eos_token" not in metadata:
        del config["add_eos_token"]
    if isinstance(metadata.get("tokenizer.ggml.add_space_prefix"), bool):
        config["add_prefix_space"] = metadata["tokenizer.ggml.add_space_prefix"]
    return text, config


def tiktoken_tokenizer_files(data: bytes, path) -> tuple[str, dict]:
    """A tiktoken tokenizer.model (Llama 3, or Llama 4 at 200000 ranks) with Meta's special tokens after
    the ranks, as transformers' TikTokenConverter lays it out: BPE over GPT-2's byte spelling, the merges
    recovered from the ranks, ignore_merges (a piece that is itself a token stays one, as in tiktoken)."""
    ranks = read_ranks(data, path)
    llama4 = len(ranks) == LLAMA4_BASE_TOKENS
    alphabet = byte_level_alphabet()

    def spell(token: bytes) -> str:
        return "".join(alphabet[b] for b in token)

    vocab = {spell(token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], spell(left), spell(right)))
    merges.sort()
    backend = HFTokenizer(BPE(vocab, [(m[3], m[4]) for m in merges], ignore_merges=True))
    backend.pre_tokenizer = _split_then_bytes(LLAMA4_PATTERN if llama4 else LLAMA3_PATTERN)
    backend.decoder = decoders.ByteLevel()
    specials = llama4_special_tokens() if llama4 else llama3_special_tokens()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    n = len(ranks)
    ids = {"bos": n, "eos": n + 1, "unk": None, "pad": None}
    return _finish(backend, ids, add_bos=True, add_eos=False)


def sentencepiece_tokenizer_files(data: bytes, path, config: dict) -> tuple[str, dict] | None:
    """A SentencePiece BPE tokenizer.model that leaves text as it is (Llama 1/2: normalizer "identity");
    tokenizer_config.json's added_tokens_decoder entries become added tokens (special or not) at their ids,
    as herd.finetune's GGUF export reads them. None for any other model, or where those ids leave gaps, which
    a tokenizer.json cannot state: transformers then converts the tokenizer.model (kept beside it) itself."""
    model_type, normalizes = read_model_kind(data, path)
    if model_type != _SPM_BPE or normalizes:  # unigram, or text rewritten by a charsmap (NFKC ...) first
        return None
    sp = sentencepiece.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(data)
    except (RuntimeError, OSError) as e:
        raise FormatError(f"{path}: not a SentencePiece model ({e})") from None
    pieces, types, add_dummy_prefix = read_model_proto(data, path)
    scores = [float(sp.GetScore(i)) for i in range(len(pieces))]
    backend = sentencepiece_bpe(pieces, scores, types, add_dummy_prefix)
    tokens = list(pieces)
    _add_tokens(backend, tokens, types, user_normalized=True)
    added = config.get("added_tokens_decoder") or {}
    for key, entry in added.items():
        if not (str(key).isdigit() and isinstance(entry, dict) and isinstance(entry.get("content"), str)):
            raise FormatError(f"tokenizer_config.json: added_tokens_decoder[{key!r}] is not {{id: {{content}}}}")
    for i, entry in sorted(((int(key), entry) for key, entry in added.items()), key=lambda pair: pair[0]):
        text = entry["content"]
        if i < len(tokens) and tokens[i] == text:
            continue  # a piece of the model, already placed
        if i != backend.get_vocab_size(with_added_tokens=True):
            return None  # ids with gaps between them, which added tokens cannot take: transformers converts it
        special = bool(entry.get("special"))
        backend.add_tokens([AddedToken(text, special=special, normalized=not special)])
        tokens.append(text)
    role_ids = {"bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id(), "pad": sp.pad_id()}
    ids = {role: (i if i >= 0 else None) for role, i in role_ids.items()}
    add_bos = bool(config.get("add_bos_token", True)) and ids["bos"] is not None
    return _finish(backend, ids, add_bos, bool(config.get("add_eos_token", False)))


def byte_level_bpe(tokens: list[str], merges: list[tuple[str, str]], pre: str | None) -> HFTokenizer:
    """Byte-level BPE with the split rule llama.cpp uses for `pre` (herd.tokenizer.gguf_vocab.PRE_TOKENIZERS)."""
    rule, pattern, ignore_merges = PRE_TOKENIZERS.get(pre, PRE_TOKENIZERS["gpt-2"])
    vocab = {token: i for i, token in enumerate(tokens)}  # a repeated text: the last id, as in llama.cpp
    backend = HFTokenizer(BPE(vocab, merges, ignore_merges=ignore_merges))
    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pattern is not None:
        backend.pre_tokenizer = _split_then_bytes(pattern)
    elif rule == "smollm":  # every number character alone, then GPT-2's rule
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2])
    else:
        backend.pre_tokenizer = gpt2
    backend.decoder = decoders.ByteLevel()
    return backend


def sentencepiece_bpe(pieces: list[str], scores: list[float], types: list[int], add_prefix: bool) -> HFTokenizer:
    vocab = {piece: i for i, piece in enumerate(pieces)}
    unk = next((p for p, k in zip(pieces, types) if k == UNKNOWN), None)
    backend = HFTokenizer(BPE(vocab, spm_merges(pieces, types, scores, vocab), unk_token=unk, fuse_unk=True,
                              byte_fallback=any(k == BYTE for k in types)))
    spaces = normalizers.Replace(" ", "\u2581")
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), spaces]) if add_prefix else spaces
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if add_prefix else []))
    return backend


def _split_then_bytes(pattern: str):
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _add_tokens(backend: HFTokenizer, tokens: list[str], types: list[int], user_normalized: bool) -> None:
    """Control and unknown tokens special, matched in the raw text; user-defined ones plain, matched in the
    normalized text for SentencePiece (as SentencePiece does) and in the raw text for byte-level BPE."""
    special = [t for t, k in zip(tokens, types) if k in (CONTROL, UNKNOWN)]
    user = [t for t, k in zip(tokens, types) if k == USER_DEFINED]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    backend.add_tokens([AddedToken(t, special=False, normalized=user_normalized) for t in user])


def _finish(backend: HFTokenizer, ids: dict, add_bos: bool, add_eos: bool) -> tuple[str, dict]:
    def text(i):
        if i is None or not 0 <= i < backend.get_vocab_size(with_added_tokens=True):
            return None
        return backend.id_to_token(i)

    bos, eos = text(ids["bos"]), text(ids["eos"])
    add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
    single = ([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else [])
    pair = single + ([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else [])
    used = [(t, ids[r]) for r, t, on in (("bos", bos, add_bos), ("eos", eos, add_eos)) if on]
    backend.post_processor = processors.TemplateProcessing(single=" ".join(single), pair=" ".join(pair),
                                                          special_tokens=used)
    config = {"tokenizer_class": TOKENIZER_CLASS, "bos_token": bos, "eos_token": eos, "unk_token": text(ids["unk"]),
              "pad_token": text(ids["pad"]), "add_bos_token": add_bos, "add_eos_token": add_eos,
              # transformers' default would edit decoded text ("a ." -> "a."); herd never does
              "clean_up_tokenization_spaces": False}
    return backend.to_str(pretty=True), config


__all__ = ["hf_tokenizer_files", "gguf_tokenizer_files", "tiktoken_tokenizer_files", "sentencepiece_tokenizer_files",
           "TOKENIZER_CLASS"]
