"""Single-request generation: prefill once into a paged KV cache sized for the request, then one token a step.

`generate_steps` yields a GenerationStep per token with the text that became final (valid UTF-8,
and not possibly the start of a stop string). The LLM facade (herd.api) builds `generate`,
`stream` and `chat` on it; the batching engine shares sampling and stop handling with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import torch

from herd.errors import ContextOverflow
from herd.model import Batch, PagedKVCache, Transformer
from herd.sampling import SamplingParams, apply_penalties, sample
from herd.tokenizer import StreamDecoder, Tokenizer


@dataclass
class TokenLogprob:
    token_id: int
    text: str
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)  # (id, text, logprob), best first


@dataclass
class GenerationStep:
    token_id: int
    text: str  # newly final text (may be "" while bytes or a possible stop string are held back)
    logprob: TokenLogprob | None
    finish_reason: str | None  # None while running; "stop" (stop token or string) or "length"


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprob] | None = None


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

    Shared by `generate_steps` and the batching engine, so both cut output the same way."""

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


@torch.inference_mode()
def generate_steps(
    model: Transformer,
    tokenizer: Tokenizer,
    prompt_ids: Sequence[int],
    max_tokens: int,
    params: SamplingParams | None = None,
    stop_ids: Sequence[int] = (),
    stop: Sequence[str] = (),
    logprobs: int | None = None,
    context: int | None = None,
) -> Iterator[GenerationStep]:
    """Yield one GenerationStep per generated token. `logprobs`: None for none, n ≥ 0 for the chosen
    token's logprob plus the top n alternatives (of the model's own distribution, before sampling
    transforms). Raises ContextOverflow before any work if prompt + max_tokens exceeds `context`."""
    params = params or SamplingParams()
    context = context or model.args.max_seq_len
    if not prompt_ids:
        raise ValueError("the prompt is empty: give at least one token (most models want BOS first)")
    check_context(len(prompt_ids), max_tokens, context)
    if max_tokens <= 0:
        return
    device = model.tok_embeddings.weight.device
    cache = PagedKVCache.for_model(model.args, len(prompt_ids) + max_tokens, dtype=model.tok_embeddings.weight.dtype,
                                   device=device)
    table = [list(range(1, cache.num_blocks))]  # one sequence: every block but the padding block, in order
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item()))
    output = TextStream(tokenizer, stop_ids, stop)
    history = torch.tensor(list(prompt_ids), dtype=torch.long, device=device)
    n_prompt = len(prompt_ids)
    tokens = history[None]
    start = 0
    decode_step = getattr(model, "decode_step", None) or model  # a compiled forward, where one is attached
    for step in range(max_tokens):
        forward = model if step == 0 else decode_step
        batch = Batch.rows(cache, table, [start], [tokens.shape[1]], device)
        logits = forward(tokens, batch, last_only=True)[:, -1]  # [1, V]
        start += tokens.shape[1]
        shaped = apply_penalties(logits, history[None], params, n_prompt=n_prompt)
        token = sample(shaped, params, generator)  # [1]
        token_id = int(token[0])
        history = torch.cat([history, token])
        lp = token_logprob(logits[0], token_id, logprobs, tokenizer) if logprobs is not None else None
        text, finish = output.push(token_id, last=step == max_tokens - 1)
        yield GenerationStep(token_id, text, lp, finish)
        if finish:
            return
        tokens = token[None]
