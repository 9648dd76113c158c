"""HF `tokenizer.json` through the `tokenizers` library.

Special tokens are the `added_tokens` marked special. BOS/EOS and whether plain prompts start with BOS
come from tokenizer_config.json facts when given (`bos_token`, `eos_token`, `add_bos_token`), else from
what the file itself does (its post-processor adding BOS) and well-known token texts.
`clean_up_tokenization_spaces` is ignored on purpose: it edits text ("a ." -> "a.") and is lossy.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

from herd.errors import FormatError
from herd.tokenizer.base import Tokenizer, stop_ids_for

_BOS_TEXTS = ("<|begin_of_text|>", "<s>", "<|startoftext|>", "<bos>")
_EOS_TEXTS = ("<|end_of_text|>", "</s>", "<|endoftext|>", "<eos>")


class TokenizersBackedTokenizer(Tokenizer):
    """Shared by HF tokenizer.json and GGUF vocabularies: both end up as a `tokenizers.Tokenizer`."""

    def _init_backend(self, backend: HFTokenizer) -> None:
        self._hf = backend
        # encode_batch_fast (tokenizers 0.20+) keeps no offsets: the same ids for a third less memory, and a
        # result freed in 0.04 s instead of 0.4 s (2 MB of text), time the GIL is held and the server's loop waits
        self._encode_batch = getattr(backend, "encode_batch_fast", backend.encode_batch)
        self._lock = threading.Lock()  # guards the backend's encode_special_tokens switch
        added = backend.get_added_tokens_decoder()
        self._added = {t.content: i for i, t in sorted(added.items(), reverse=True)}  # lowest id wins
        self._special_ids = frozenset(i for i, t in added.items() if t.special)
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, bos: bool | None = None, eos: bool = False, special: bool = False) -> list[int]:
        with self._lock:  # special=False: special-token text is encoded as the plain text it is
            self._hf.encode_special_tokens = not special
            # encode_batch releases the GIL (encode holds it throughout: a 10 MB prompt froze the server's loop)
            ids = self._encode_batch([text], add_special_tokens=False)[0].ids
        if (self.add_bos if bos is None else bos) and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        if eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise ValueError(f"token id {bad} is outside this vocabulary of {self.vocab_size}")
        return self._hf.decode(ids, skip_special_tokens=skip_special)

    def special_id(self, text: str) -> int | None:
        return self._added.get(text)

    def id_to_piece(self, token_id: int) -> str:
        piece = self._hf.id_to_token(token_id)
        if piece is None:
            raise ValueError(f"token id {token_id} is outside this vocabulary of {self.vocab_size}")
        return piece

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids


class HFJsonTokenizer(TokenizersBackedTokenizer):
    kind = "hf_json"

    def __init__(self, path: Path, config: dict[str, Any] | None = None):
        try:
            backend = HFTokenizer.from_file(str(path))
        except Exception as e:  # the library raises a bare Exception for any parse error
            raise FormatError(f"{path}: not a readable HF tokenizer.json ({e})") from None
        self._init_backend(backend)
        config = config or {}
        self.bos_id = self._config_token(config, "bos_token", path) if "bos_token" in config else self._first(_BOS_TEXTS)
        self.eos_id = self._config_token(config, "eos_token", path) if "eos_token" in config else self._first(_EOS_TEXTS)
        if "add_bos_token" in config:
            self.add_bos = bool(config["add_bos_token"]) and self.bos_id is not None
        elif self.bos_id is None:
            self.add_bos = False
        else:  # the file's own post-processor puts BOS first, or BOS is a well-known text found without a config
            with_specials = backend.encode("a", add_special_tokens=True).ids
            self.add_bos = with_specials[:1] == [self.bos_id] or "bos_token" not in config
        self.stop_ids = stop_ids_for(self, self.eos_id)

    def _first(self, texts: tuple[str, ...]) -> int | None:
        return next((self._hf.token_to_id(t) for t in texts if self._hf.token_to_id(t) is not None), None)

    def _config_token(self, config: dict[str, Any], key: str, path: Path) -> int | None:
        value = config[key]
        if isinstance(value, dict):  # {"content": "<s>", "__type": "AddedToken", ...}
            value = value.get("content")
        if value is None:
            return None
        token_id = self._hf.token_to_id(value) if isinstance(value, str) else None
        if token_id is None:
            raise FormatError(f"{path}: tokenizer config {key}={json.dumps(value)} is not in the vocabulary")
        return token_id
