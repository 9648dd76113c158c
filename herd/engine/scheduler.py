"""Which sequences run in the next step: admission into KV slots, chunked prefill, decode. No tensors.

vLLM v1's loop at herd's scale: every sequence has `num_computed` tokens in its KV slot and catches up
to `len(token_ids)`. A step holds (a) prefill chunks for sequences still reading their prompt, under a
token budget so that a long prompt never stalls the running decodes for long, and (b) one decode token
for every sequence whose prompt is in. New requests are admitted, first come first served, whenever a
slot is free, including while others decode; a finished sequence gives its slot back at once.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from herd.engine.request import QueueFull, Request


@dataclass(eq=False)
class Sequence:
    request: Request
    token_ids: list[int]  # prompt then generated tokens
    slot: int = -1  # KV cache row while running; -1 while waiting
    num_computed: int = 0  # tokens whose k/v are in the slot
    output: Any = None  # herd.generate.TextStream
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
    prefill: list[PrefillChunk]  # run one forward each, [1, end - start]
    decode: list[Sequence]  # run together in one forward, [len(decode), 1]

    @property
    def empty(self) -> bool:
        return not self.prefill and not self.decode


class Scheduler:
    def __init__(self, max_batch: int, max_queue: int, prefill_budget: int = 256):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.max_batch = max_batch
        self.max_queue = max_queue  # most sequences waiting for a slot; past it add() raises QueueFull
        self.prefill_budget = prefill_budget  # most prompt tokens prefilled in one step
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.free_slots = list(range(max_batch - 1, -1, -1))  # pop() hands out slot 0 first

    def add(self, seq: Sequence) -> None:
        if len(self.waiting) >= self.max_queue:
            raise QueueFull(f"{len(self.waiting)} requests are already waiting (the queue holds {self.max_queue})")
        self.waiting.append(seq)

    def schedule(self) -> SchedulerOutput:
        while self.waiting and self.free_slots:
            seq = self.waiting.popleft()
            seq.slot = self.free_slots.pop()
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
        """End a sequence (running or waiting) and free its slot now."""
        seq.finish_reason = seq.finish_reason or reason
        if seq in self.running:
            self.running.remove(seq)
            self.free_slots.append(seq.slot)
        elif seq in self.waiting:
            self.waiting.remove(seq)

