"""Single-request generation: a batch of one on the serving engine, one GenerationStep a token.

`generate_steps` yields a GenerationStep per token with the text that became final (valid UTF-8,
and not possibly the start of a stop string). The LLM facade (herd.api) builds `generate`,
`stream` and `chat` on it, so a single request and a served one run through the same scheduler,
paged cache, runner, sampling (herd.sampling) and stop handling (herd.decoding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

from herd.decoding import TokenLogprob, check_context
from herd.engine import Engine, ImageFeatures, ImagePlacement, Request
from herd.model import Transformer
from herd.sampling import SamplingParams
from herd.tokenizer import Tokenizer


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
    images: Sequence = (),
    image_features=None,
) -> Iterator[GenerationStep]:
    """Yield one GenerationStep per generated token. `logprobs`: None for none, n ≥ 0 for the chosen
    token's logprob plus the top n alternatives (of the model's own distribution, before sampling
    transforms). Raises ContextOverflow before any work if prompt + max_tokens exceeds `context`.

    One request is a batch of one on the serving engine (herd.engine): its scheduler, paged cache and
    runner, with a cache sized for this request and the whole prompt prefilled in one forward. `images`
    (herd.engine.ImagePlacement) put image features at their prompt positions; `image_features`
    (herd.engine.ImageFeatures) keeps encoder outputs across calls."""
    params = params or SamplingParams()
    context = context or model.args.max_seq_len
    if not prompt_ids:
        raise ValueError("the prompt is empty: give at least one token (most models want BOS first)")
    check_context(len(prompt_ids), max_tokens, context)
    if max_tokens == 0:
        return iter(())
    n = len(prompt_ids)
    engine = Engine(model, tokenizer, max_batch=1, context=n + max_tokens, max_queue=1, prefill_budget=n,
                    prefix_caching=False, image_features=image_features)
    engine.add_request(Request("generate", list(prompt_ids), max_tokens, params, frozenset(stop_ids), tuple(stop),
                               logprobs=logprobs, images=tuple(images)))  # checked here (token ids, logit_bias), not at the first next()
    return _steps(engine)


def _steps(engine: Engine) -> Iterator[GenerationStep]:
    while engine.has_work():
        for out in engine.step():
            if out.error is not None:
                raise RuntimeError(f"generation failed: {out.error}")
            for i, token_id in enumerate(out.token_ids):
                lp = out.logprobs[i] if out.logprobs else None
                yield GenerationStep(token_id, out.text, lp, out.finish_reason)
