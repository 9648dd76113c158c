"""What every path that generates shares: the token-limit check, stop strings and incremental
detokenization (TextStream), and token logprobs. The single-request generator (herd.generate) and the
batching engine (herd.engine) both cut output with these, so both give the same text."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch

from herd.errors import ContextOverflow
from herd.tokenizer import StreamDecoder, Tokenizer


@dataclass
class TokenLogprob:
    token_id: int
    text: str
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)  # (id, text, logprob), best first


def check_context(prompt_tokens: int, max_tokens: int, context: int) -> None:
    """Raise before any work for a token limit that is not a count, or a request that cannot fit."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
        raise ValueError(f"max_tokens must be a whole number >= 0, got {max_tokens!r}")
    if prompt_tokens + max_tokens > context:
        raise ContextOverflow(
            f"the prompt has {prompt_tokens} tokens and {max_tokens} more were asked for: {prompt_tokens + max_tokens} "
            f"do not fit in the context of {context} tokens (shorten the prompt or lower max_tokens)"
        )


class StopStringMatcher:
    """Holds back text that could still become a stop string, so a stop spanning tokens is cut exactly."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Add text; return (text safe to emit, whether a stop string was hit)."""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [(self.pending.find(s), s) for s in self.stops if s in self.pending]
        if hits:
            cut = min(i for i, _ in hits)
            out, self.pending = self.pending[:cut], ""
            return out, True
        hold = 0  # longest tail of pending that is a proper prefix of some stop string
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(s[:n]):
                    hold = n
                    break
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out) :]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def token_logprob(logits: torch.Tensor, token_id: int, top_n: int, tokenizer: Tokenizer,
                  logprobs: torch.Tensor | None = None) -> TokenLogprob:
    """The logprob of `token_id` under logits [V] (the model's own distribution) and the top_n alternatives.
    `logprobs`: log_softmax(logits) when the caller already has it."""
    if logprobs is None:
        logprobs = torch.log_softmax(logits.float(), dim=-1)
    top = []
    if top_n:
        values, ids = logprobs.topk(top_n)
        top = [(int(i), tokenizer.decode([int(i)]), float(v)) for v, i in zip(values.tolist(), ids.tolist())]
    return TokenLogprob(token_id, tokenizer.decode([token_id]), float(logprobs[token_id]), top)


class TextStream:
    """One request's output text: incremental detokenization, stop tokens and stop strings.

    Shared by herd.generate and the batching engine, so both cut output the same way."""

    def __init__(self, tokenizer: Tokenizer, stop_ids: Iterable[int] = (), stop: Sequence[str] = ()):
        self.stop_ids = frozenset(stop_ids)
        self.decoder = StreamDecoder(tokenizer)
        self.matcher = StopStringMatcher(stop)

    def push(self, token_id: int, last: bool = False) -> tuple[str, str | None]:
        """Feed one generated token: (newly final text, finish reason or None). `last`: the token budget
        ends with this token. A stop token adds no text; a stop string is cut with everything after it."""
        if token_id in self.stop_ids:
            return self.finish(), "stop"
        text, hit = self.matcher.feed(self.decoder.push(token_id))
        if hit:
            return text, "stop"
        if last:
            return text + self.finish(), "length"
        return text, None

    def finish(self) -> str:
        """The text still held back when generation ends (a stop string in it still cuts it)."""
        text, hit = self.matcher.feed(self.decoder.flush())
        return text if hit else text + self.matcher.flush()


__all__ = ["TokenLogprob", "check_context", "StopStringMatcher", "token_logprob", "TextStream"]
