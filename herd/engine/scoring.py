"""Log-likelihoods of continuations, the prefixes their inputs share computed once.

To score a continuation after a context, a causal model reads context + continuation less its last token
(its input); the continuation's log-probabilities come from the positions from the context's last token
on. Multiple-choice tasks repeat input prefixes many times over: each choice repeats its question,
choices often begin alike (" 168" and " 161"), and a task's questions often begin alike (a few-shot
header, "Question: What is"). Each group of pairs runs as segments in three waves:

1. the prefix every input of the group shares, once (when it saves more than a pass over the weights);
2. each distinct context, with whatever all of its continuations' inputs begin with, from there;
3. each distinct remainder of a continuation's input, from the end of its context's segment (the
   longest remainder rides on in its context's row instead).

A segment runs as one row of a forward in a paged KV cache of one-token blocks; its block table is its
parent's blocks followed by its own, so it attends to exactly the tokens before it in its inputs, and
logits are computed only at the positions a continuation token is predicted from. Causal attention makes
this the same computation as scoring each pair alone, up to the rounding of differently shaped matrix
products. The cache is float32 whatever the model's default (these log-probabilities are what an
evaluation reports) and holds one group: about `group_tokens` distinct tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from herd.model import Batch, PagedKVCache, Transformer

PAD_WASTE = 0.1  # a forward's padding stays under this share of its real tokens ...
MIN_FORWARD = 256  # ... once it holds this many tokens (smaller products run slower per token)
SHARED_WORTH = 64  # tokens a group-wide prefix must save to earn a forward of its own (a pass over the weights)


@dataclass
class Segment:
    """Tokens at positions start.. after those of `parent`, their cache blocks, and at each offset the
    (pair, continuation index, target token) its logits score."""

    start: int
    parent: "Segment | None"
    tokens: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    targets: dict[int, list[tuple[int, int, int]]] = field(default_factory=dict)  # offset -> scored there

    def table(self) -> list[int]:
        # one-token blocks: a table lists a row's blocks by position, so a child keeps its parent's up to its start
        return (self.parent.table()[:self.start] if self.parent else []) + self.blocks


def continuation_logprobs(model: Transformer, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                          batch_size: int = 16, logits_budget: int = 1 << 27,
                          progress: Callable[[int], None] | None = None, forward_tokens: int = 2048,
                          group_tokens: int = 16384,
                          wanted: set[int] | None = None) -> list[tuple[list[float], bool] | None]:
    """For each (context, continuation) of token ids: the log-probability of every continuation token and
    whether each was the most likely token. A forward holds at least `batch_size` rows, more while they
    fit `forward_tokens` padded tokens and `logits_budget` float32 logits; a group of pairs shares one
    cache of about `group_tokens` distinct tokens. With `wanted` (indices), only the groups holding a
    wanted pair run, exactly as they run when every pair is scored (the groups are cut from all pairs);
    pairs of the groups left out are None."""
    inputs = []
    for i, (context, continuation) in enumerate(pairs):
        if not context or not continuation:
            raise ValueError(f"pair {i}: context and continuation must both hold tokens")
        inputs.append(list(context) + list(continuation)[:-1])
    order = sorted(range(len(pairs)), key=lambda i: inputs[i])  # shared prefixes become neighbours
    results: list[list[tuple[float, bool]]] = [[] for _ in pairs]
    with torch.inference_mode():
        group: list[int] = []
        distinct = 0
        for at, i in enumerate(order):
            previous = inputs[order[at - 1]] if at else []
            distinct += len(inputs[i]) - _common_length(previous, inputs[i])
            group.append(i)
            if distinct >= group_tokens or at == len(order) - 1:
                if wanted is None or any(i in wanted for i in group):
                    _score_group(model, group, pairs, inputs, results, batch_size, forward_tokens, logits_budget)
                    if progress:
                        progress(len(group))
                group, distinct = [], 0
    return [([lp for lp, _ in r], all(g for _, g in r)) if r else None for r in results]


def _common_length(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    return next((k for k in range(n) if a[k] != b[k]), n)


def _common_prefix(sequences: list[list[int]]) -> list[int]:
    first = sequences[0]
    n = len(first)
    for other in sequences[1:]:
        n = _common_length(first[:n], other)
    return first[:n]


def _build_segments(members: list[int], pairs, inputs) -> tuple[list[list[Segment]], int]:
    """The group's segments by wave, and the number of cache blocks they use (block 0 is padding's)."""
    blocks = [1]

    def segment(start, parent, tokens):
        seg = Segment(start, parent, list(tokens), list(range(blocks[0], blocks[0] + len(tokens))))
        blocks[0] += len(tokens)
        return seg

    by_context: dict[tuple, list[int]] = {}
    for i in members:
        by_context.setdefault(tuple(pairs[i][0]), []).append(i)
    group_prefix = _common_prefix([inputs[i] for i in members])
    if len(group_prefix) * (len(by_context) - 1) < SHARED_WORTH:
        group_prefix = []
    root = segment(0, None, group_prefix) if group_prefix else None
    waves: list[list[Segment]] = [[root] if root else [], [], []]
    where: dict[int, list[tuple[Segment, int]]] = {}  # pair -> its input's (segment, offset) by position
    for context, mine in by_context.items():
        shared = _common_prefix([inputs[i] for i in mine])  # the context, and what all its choices begin with
        own = segment(len(group_prefix), root, shared[len(group_prefix):]) if len(shared) > len(group_prefix) else root
        if own is not root:
            waves[1].append(own)
        rests = sorted({tuple(inputs[i][len(shared):]) for i in mine}, key=lambda r: (-len(r), r))
        rider = rests[0] if rests and rests[0] and own is not root else ()
        if rider:  # the longest remainder continues its context's own row: one row fewer in the last wave
            own.tokens += rider
            own.blocks += range(blocks[0], blocks[0] + len(rider))
            blocks[0] += len(rider)
        tails = {rest: segment(len(shared), own, rest) for rest in rests if rest and rest != rider}
        waves[2].extend(tails.values())
        for i in mine:
            rest = tuple(inputs[i][len(shared):])
            if rest == rider:
                where[i] = [(root, p) for p in range(len(group_prefix))] + [
                    (own, p) for p in range(len(shared) + len(rest) - len(group_prefix))]
            else:
                where[i] = ([(root, p) for p in range(len(group_prefix))]
                            + [(own, p) for p in range(len(shared) - len(group_prefix))]
                            + ([(tails[rest], p) for p in range(len(rest))] if rest else []))
    for i in members:
        context, continuation = pairs[i]
        for j, target in enumerate(continuation):
            seg, offset = where[i][len(context) - 1 + j]
            seg.targets.setdefault(offset, []).append((i, j, target))
    return [w for w in waves if w], blocks[0]


def _score_group(model, members, pairs, inputs, results, batch_size, forward_tokens, logits_budget) -> None:
    args, device = model.args, model.inv_freq.device
    waves, n_blocks = _build_segments(members, pairs, inputs)
    cache = PagedKVCache(args.n_layers, args.n_kv_heads, args.head_dim, n_blocks, 1, torch.float32, device)
    scored: dict[tuple[int, int], tuple[float, bool]] = {}
    for wave in waves:
        wave = sorted(wave, key=lambda s: -len(s.tokens))
        at = 0
        while at < len(wave):
            width = len(wave[at].tokens)
            rows, wanted, real = 1, max(1, len(wave[at].targets)), width
            while at + rows < len(wave):
                k = max(wanted, len(wave[at + rows].targets))
                if (rows + 1) * k * args.vocab_size > logits_budget:
                    break
                if rows >= batch_size and (rows + 1) * width > forward_tokens:
                    break
                real += len(wave[at + rows].tokens)
                if (rows + 1) * width > real * (1 + PAD_WASTE) and rows * width >= MIN_FORWARD:
                    break  # the rest of the wave is shorter: a forward of its own pads less
                rows, wanted = rows + 1, k
            _run_rows(model, wave[at:at + rows], width, wanted, cache, device, scored)
            at += rows
    for i in members:
        results[i] = [scored[i, j] for j in range(len(pairs[i][1]))]


def _run_rows(model, rows: list[Segment], width: int, wanted: int, cache, device, scored) -> None:
    tokens = torch.tensor([s.tokens + [0] * (width - len(s.tokens)) for s in rows], device=device)
    batch = Batch.rows(cache, [s.table() for s in rows], [s.start for s in rows], width, device,
                       lengths=[len(s.tokens) for s in rows])
    offsets = [sorted(s.targets) or [len(s.tokens) - 1] for s in rows]  # a row scoring nothing still fills the cache
    batch.last = torch.tensor([o + [o[-1]] * (wanted - len(o)) for o in offsets], device=device)
    logprobs = torch.log_softmax(model(tokens, batch, last_only=True).float(), dim=-1)  # [R, wanted, V]
    best = logprobs.argmax(-1).tolist()
    for r, s in enumerate(rows):
        for k, offset in enumerate(offsets[r]):
            for i, j, target in s.targets.get(offset, ()):
                scored[i, j] = (float(logprobs[r, k, target]), best[r][k] == target)


__all__ = ["continuation_logprobs"]
