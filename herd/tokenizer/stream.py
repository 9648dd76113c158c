"""Incremental detokenization: text as tokens arrive, never half a character.

The window scheme of text-generation servers (TGI, vLLM): decode only the ids since the previous
read point plus one step of context, and emit what the new id added. Decoding with that context
keeps SentencePiece's leading-space rule and merges across tokens right, so the pushes joined with
`flush()` equal `tokenizer.decode(all_ids, skip_special)`. While the text ends in U+FFFD (a character
whose bytes have not all arrived) only the part before it is released.
"""

from __future__ import annotations

from herd.tokenizer.base import Tokenizer

_REPLACEMENT = "\ufffd"


class StreamDecoder:
    # After this many ids with text still ending in U+FFFD, the bytes are taken as invalid and released.
    max_pending = 32

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self._ids: list[int] = []  # the window: ids from the context start on
        self._read = 0  # ids before this index are spoken for in _context_text
        self._context_text = ""  # decode(self._ids[:self._read])
        self._held = 0  # characters past _context_text already released from an unfinished tail

    def push(self, token_id: int) -> str:
        """Feed one id; returns the text that became final (often "", sometimes several characters)."""
        if self.skip_special and self.tokenizer.is_special(token_id):
            return ""
        self._ids.append(token_id)
        text = self.tokenizer.decode(self._ids, skip_special=self.skip_special)
        start = len(self._context_text) + self._held
        if text.endswith(_REPLACEMENT) and len(self._ids) - self._read < self.max_pending:
            stable = len(text.rstrip(_REPLACEMENT))
            if stable <= start:
                return ""
            self._held += stable - start
            return text[start:stable]
        self._advance()
        return text[start:]

    def flush(self) -> str:
        """Whatever is still held back (an unfinished character decodes to U+FFFD, as decode() does)."""
        if self._read == len(self._ids):
            return ""
        text = self.tokenizer.decode(self._ids, skip_special=self.skip_special)
        out = text[len(self._context_text) + self._held :]
        self._advance()
        return out

    def _advance(self) -> None:
        # The ids read so far become the context of the next window; older ids are dropped.
        del self._ids[: self._read]
        self._read = len(self._ids)
        self._context_text = self.tokenizer.decode(self._ids, skip_special=self.skip_special)
        self._held = 0
