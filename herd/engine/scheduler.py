"""Which sequences run in the next step: admission, chunked prefill, decode. No tensors.

vLLM v1's loop at herd's scale: every sequence has `num_computed` tokens in its cache blocks and catches
up to `len(token_ids)`. A step holds (a) prefill chunks for sequences still reading their prompt, under a
token budget so that a long prompt never stalls the running decodes for long, and (b) one decode token
for every sequence whose prompt is in. New requests are admitted, first come first served, whenever
fewer than `max_batch` run and the block manager (herd.engine.blocks) can promise them their blocks,
including while others decode; an admitted sequence starts with the cached blocks of its prompt's
prefix already computed. A finished sequence gives its blocks back at once.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from herd.engine.blocks import BlockManager, Blocks
from herd.engine.request import QueueFull, Request


@dataclass(eq=False)
class Sequence:
    request: Request
    token_ids: list[int]  # prompt then generated tokens
    blocks: Blocks | None = None  # cache blocks while running; None while waiting
    num_computed: int = 0  # tokens whose k/v are in the cache
    num_cached: int = 0  # prompt tokens found in the prefix cache at admission
    output: Any = None  # herd.decoding.TextStream
    generator: Any = None  # torch.Generator for this request's draws
    constraint: Any = None  # constrained-decoding state, or None
    prompt_logprobs: list = field(default_factory=list)  # filled during prefill when asked for
    n_generated: int = 0
    finish_reason: str | None = None
    first_token_at: float | None = None  # time.monotonic() of the first generated token
    added_at: float = 0.0

    @property
    def n_prompt(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def prefilling(self) -> bool:
        return self.num_computed < self.n_prompt


@dataclass
class PrefillChunk:
    seq: Sequence
    start: int  # first prompt position of the chunk
    end: int  # one past the last
    @property
    def completes_prompt(self) -> bool:
        return self.end == self.seq.n_prompt


@dataclass
class SchedulerOutput:
    prefill: list[PrefillChunk]  # run in as few forwards as padding allows (herd.engine.runner)
    decode: list[Sequence]  # run together in one forward, [len(decode), 1]

    @property
    def empty(self) -> bool:
        return not self.prefill and not self.decode


class Scheduler:
    def __init__(self, max_batch: int, max_queue: int, blocks: BlockManager, prefill_budget: int = 256):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.max_batch = max_batch
        self.max_queue = max_queue  # most sequences waiting to run; past it add() raises QueueFull
        self.prefill_budget = prefill_budget  # most prompt tokens prefilled in one step
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        if len(self.waiting) >= self.max_queue:
            raise QueueFull(f"{len(self.waiting)} requests are already waiting (the queue holds {self.max_queue})")
        self.waiting.append(seq)

    def schedule(self) -> SchedulerOutput:
        while self.waiting and len(self.running) < self.max_batch:
            seq = self.waiting[0]
            adapter = seq.request.adapter
            blocks = self.blocks.admit(seq.token_ids, seq.n_prompt + seq.request.max_tokens,
                                       share=seq.request.prompt_logprobs is None,
                                       salt=b"adapter:%d" % adapter if adapter else b"",
                                       images=[(im.positions[0] if im.affects_from is None else im.affects_from,
                                                im.positions[-1], im.digest.encode())
                                               for im in seq.request.images])
            if blocks is None:  # not enough cache now; first come first served, so the rest wait too
                break
            self.waiting.popleft()
            seq.blocks = blocks
            seq.num_computed = seq.num_cached = len(blocks.table) * self.blocks.block_size
            self.running.append(seq)
        budget, prefill, decode = self.prefill_budget, [], []
        for seq in self.running:
            if seq.prefilling:
                if budget > 0:
                    end = min(seq.n_prompt, seq.num_computed + budget)
                    prefill.append(PrefillChunk(seq, seq.num_computed, end))
                    budget -= end - seq.num_computed
            else:
                decode.append(seq)
        return SchedulerOutput(prefill, decode)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a sequence (running or waiting) and free its blocks now."""
        seq.finish_reason = seq.finish_reason or reason
        if seq in self.running:
            self.running.remove(seq)
            self.blocks.release(seq.blocks)
        elif seq in self.waiting:
            self.waiting.remove(seq)

