"""Single-request generation: prefill once into a paged KV cache sized for the request, then one token a step.

`generate_steps` yields a GenerationStep per token with the text that became final (valid UTF-8,
and not possibly the start of a stop string). The LLM facade (herd.api) builds `generate`,
`stream` and `chat` on it; the batching engine shares sampling (herd.sampling) and stop handling and
detokenization (herd.decoding) with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from herd.decoding import TextStream, TokenLogprob, check_context, token_logprob
from herd.model import Batch, PagedKVCache, Transformer
from herd.sampling import SamplingParams, apply_penalties, sample
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
