"""Log-likelihoods of continuations, each context computed once however many continuations it has.

A multiple-choice question is one context and several continuations. Scoring each (context, choice) as
its own sequence computes the context once per choice; here a batch of distinct contexts is run once,
right-padded, into a paged KV cache of one-token blocks, and every continuation then runs from the end
of its context, reading the context's blocks through its own block table (its own blocks hold only its
own tokens, so choices of one question never see each other). The first continuation token is scored
from the context's last logits, the rest from the continuation's own forward, which is left out when
every continuation is one token long. Causal attention makes this the same computation as scoring each
pair alone, up to the rounding of differently shaped matrix products.

The cache is float32 whatever the model's default (these log-probabilities are what an evaluation
reports), and only for the batch in hand: a few thousand tokens.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from herd.model import Batch, PagedKVCache, Transformer


def continuation_logprobs(model: Transformer, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                          batch_size: int = 16, logits_budget: int = 1 << 27,
                          progress: Callable[[int], None] | None = None) -> list[tuple[list[float], bool]]:
    """For each (context, continuation) of token ids: the log-probability of every continuation token and
    whether each was the most likely token. `batch_size` distinct contexts run per forward; continuation
    forwards hold at most `logits_budget` float32 logits."""
    by_context: dict[tuple, list[int]] = {}
    for i, (context, continuation) in enumerate(pairs):
        if not context or not continuation:
            raise ValueError(f"pair {i}: context and continuation must both hold tokens")
        by_context.setdefault(tuple(context), []).append(i)
    contexts = sorted(by_context, key=len, reverse=True)  # similar lengths share a forward
    results: list[tuple[list[float], bool] | None] = [None] * len(pairs)
    with torch.inference_mode():
        for start in range(0, len(contexts), batch_size):
            group = contexts[start:start + batch_size]
            _score_group(model, group, {c: by_context[c] for c in group}, pairs, results, logits_budget)
            if progress:
                progress(sum(len(by_context[c]) for c in group))
    return results


def _score_group(model, contexts, members, pairs, results, logits_budget) -> None:
    args, device = model.args, model.inv_freq.device
    tails = [(c, i) for c in contexts for i in members[c] if len(pairs[i][1]) > 1]
    blocks = 1 + sum(len(c) for c in contexts) + sum(len(pairs[i][1]) - 1 for _, i in tails)
    cache = PagedKVCache(args.n_layers, args.n_kv_heads, args.head_dim, blocks, 1, torch.float32, device)
    next_block = 1
    tables = {}
    for c in contexts:  # one block per token: a continuation can start anywhere
        tables[c] = list(range(next_block, next_block + len(c)))
        next_block += len(c)
    # every context, right-padded: its last real position's logits score each continuation's first token
    width = len(contexts[0])
    tokens = torch.tensor([list(c) + [0] * (width - len(c)) for c in contexts], device=device)
    batch = Batch.rows(cache, [tables[c] for c in contexts], [0] * len(contexts), width, device,
                       lengths=[len(c) for c in contexts])
    first = torch.log_softmax(model(tokens, batch, last_only=True)[:, 0].float(), dim=-1)  # [C, V]
    row_of = {c: r for r, c in enumerate(contexts)}
    for c in contexts:
        for i in members[c]:
            target = pairs[i][1][0]
            results[i] = ([float(first[row_of[c], target])], bool(first[row_of[c]].argmax() == target))
    # the rest of each longer continuation, from the end of its context
    tail_tables = []
    for c, i in tails:
        n = len(pairs[i][1]) - 1
        tail_tables.append(tables[c] + list(range(next_block, next_block + n)))
        next_block += n
    tails_sorted = sorted(range(len(tails)), key=lambda t: -len(pairs[tails[t][1]][1]))
    at = 0
    while at < len(tails_sorted):
        longest = len(pairs[tails[tails_sorted[at]][1]][1]) - 1
        rows = max(1, min(len(tails_sorted) - at, logits_budget // (longest * args.vocab_size)))
        part = tails_sorted[at:at + rows]
        at += rows
        inputs = [list(pairs[tails[t][1]][1][:-1]) for t in part]
        tokens = torch.tensor([x + [0] * (longest - len(x)) for x in inputs], device=device)
        batch = Batch.rows(cache, [tail_tables[t] for t in part], [len(tails[t][0]) for t in part], longest, device,
                           lengths=[len(x) for x in inputs])
        logprobs = torch.log_softmax(model(tokens, batch).float(), dim=-1)  # [R, T, V]
        for row, t in enumerate(part):
            i = tails[t][1]
            target = torch.tensor(pairs[i][1][1:], device=device)
            lp = logprobs[row, : len(target)]
            chosen = lp.gather(1, target[:, None])[:, 0].tolist()
            head, greedy = results[i]
            results[i] = (head + chosen, greedy and bool((lp.argmax(-1) == target).all()))


__all__ = ["continuation_logprobs"]
