"""The continuous-batching engine: schedule → run → update, one step at a time.

    engine = Engine(model, tokenizer, max_batch=8, context=4096)
    engine.add_request(Request("a", prompt_ids, max_tokens=32))
    while engine.has_work():
        for out in engine.step(): ...

Outputs are RequestOutput deltas. Text is cut by herd.decoding.TextStream (the generator's own stop and
detokenization rules), tokens are drawn by herd.sampling, so a request gives the same tokens here as
through LLM.generate up to floating-point differences between batched and single forwards.

A request constrained by a JSON schema needs a token mask before each draw, and a mask can take long to
compute (herd.engine.constrained bounds how long). Masks are computed a slice at a time, MASK_STEPS of
automaton work per engine step shared by the sequences waiting for one, and a sequence samples only once
its mask is ready (it sits out of the decode batch, or its prompt's last token waits): the step never
waits on a mask, so one costly schema slows its own request and adds about MASK_STEPS of work (at least
500 steps per waiting sequence) to the steps of the others.
"""

from __future__ import annotations

import time

import torch

from herd.engine.blocks import BlockManager
from herd.engine.metrics import Metrics
from herd.engine.request import Request, RequestOutput
from herd.engine.runner import Runner
from herd.engine.scheduler import PrefillChunk, Scheduler, SchedulerOutput, Sequence
from herd.decoding import TextStream, check_context
from herd.model import Transformer
from herd.tokenizer import Tokenizer


MASK_STEPS = 5_000  # automaton work per engine step for pending token masks (about 10 ms of CPU)


class Engine:
    """`max_batch` sequences run at once, each of at most `context` tokens (prompt + output). The KV cache
    has room for max_batch x context tokens in blocks of `block_size` (`kv_blocks` to choose another
    size), allocated to sequences as their tokens arrive and shared between sequences with a common
    prefix (`prefix_caching`); `kv_dtype` defaults to herd.engine.runner.default_kv_dtype."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, max_batch: int = 8, context: int | None = None,
                 max_queue: int = 256, prefill_budget: int = 256, metrics: Metrics | None = None,
                 block_size: int = 16, kv_blocks: int | None = None, prefix_caching: bool = True,
                 kv_dtype: torch.dtype | None = None, image_features=None):
        self.context = context or model.args.max_seq_len
        if self.context > model.args.max_seq_len:
            raise ValueError(f"context {self.context} exceeds the model's context of {model.args.max_seq_len} tokens")
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        num_blocks = kv_blocks or 1 + max_batch * -(-self.context // block_size)
        if (num_blocks - 1) * block_size < self.context:
            raise ValueError(f"{num_blocks} KV blocks of {block_size} tokens cannot hold one {self.context}-token sequence")
        self.blocks = BlockManager(num_blocks, block_size, prefix_caching)
        self.scheduler = Scheduler(max_batch, max_queue, self.blocks, prefill_budget)
        self.runner = Runner(model, tokenizer, self.blocks, kv_dtype, max_batch, self.context, image_features)
        self.metrics = metrics or Metrics()
        self.metrics.gauges["herd_kv_cache_bytes"] = self.runner.cache.nbytes()
        self.metrics.live = self.gauges
        self._seqs: dict[str, Sequence] = {}

    @property
    def kv_cache_bytes(self) -> int:
        return self.runner.cache.nbytes()

    def validate(self, request: Request) -> None:
        """Raise ValueError or herd.errors.ContextOverflow for a request that can never run."""
        if not request.prompt_ids:
            raise ValueError("the prompt is empty: give at least one token")
        vocab = self.runner.vocab_size
        rows = vocab + getattr(self.runner.model.args, "extra_embeddings", 0)  # Llama 3.2 Vision's <|image|> rows
        if min(request.prompt_ids) < 0 or max(request.prompt_ids) >= rows:
            raise ValueError(f"prompt token ids must lie in 0..{rows - 1}")
        if request.params.logit_bias and max(int(k) for k in request.params.logit_bias) >= vocab:
            raise ValueError(f"logit_bias names a token past the vocabulary (ids 0..{vocab - 1})")
        if request.images:
            if getattr(self.runner.model.args, "vision", None) is None:
                raise ValueError("this model cannot see images (it has no image encoder)")
            n = len(request.prompt_ids)
            for image in request.images:
                p = image.positions
                if not p or any(b <= a for a, b in zip(p, p[1:])) or p[0] < 0 or p[-1] >= n:
                    raise ValueError("an image's positions must be ascending prompt indices")
        # One position more than prompt + output is never written: the last token is not fed back.
        check_context(len(request.prompt_ids), request.max_tokens, self.context)

    def add_request(self, request: Request) -> None:
        """Queue a request (raises QueueFull past the queue bound, ContextOverflow if it cannot fit)."""
        self.validate(request)
        if request.request_id in self._seqs:
            raise ValueError(f"request id {request.request_id!r} is already running")
        seq = Sequence(request, list(request.prompt_ids), added_at=time.monotonic())
        seq.output = TextStream(self.tokenizer, request.stop_ids, request.stop)
        seq.generator = self.runner.generator(request.params.seed)
        seq.constraint = request.constraint() if request.constraint is not None else None
        self.scheduler.add(seq)
        self._seqs[request.request_id] = seq

    def abort(self, request_id: str) -> bool:
        """Drop a request now (waiting or running); its blocks are free for the next step."""
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.finish(seq, "abort")
        self.metrics.inc("herd_requests_total", finish_reason="abort")
        return True

    def has_work(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running)

    def step(self) -> list[RequestOutput]:
        failed = self._prepare_masks()
        plan = self._hold_unmasked(self.scheduler.schedule())
        if plan.empty:
            return failed
        try:
            ready = self.runner.execute(plan)
            sampled = self.runner.sample(ready)
        except Exception as e:  # the step's sequences fail; the engine and the other requests go on
            seqs = [c.seq for c in plan.prefill] + plan.decode
            return failed + [self._fail(s, f"{type(e).__name__}: {e}") for s in seqs]
        outputs = failed
        for chunk in plan.prefill:
            self.metrics.inc("herd_prompt_tokens_total", chunk.end - chunk.start)
            if chunk.completes_prompt and chunk.seq.request.max_tokens == 0:
                out = self._output(chunk.seq, [], None, "", "length")
                outputs.append(out)
        now = time.monotonic()
        for (seq, _), (token, logprob) in zip(ready, sampled):
            outputs.append(self._advance(seq, token, logprob, now))
        self.metrics.generated(len(sampled))
        self.metrics.inc("herd_generation_tokens_total", len(sampled))
        return outputs

    def _prepare_masks(self) -> list[RequestOutput]:
        """Work on the token masks running sequences wait for, MASK_STEPS shared evenly; a mask that cannot
        be computed (herd.engine.constrained.ConstraintError) ends its request."""
        pending = [s for s in self.scheduler.running if s.constraint is not None and not s.constraint.ready]
        failed = []
        for seq in pending:
            try:
                seq.constraint.prepare(max(MASK_STEPS // len(pending), 500))
            except ValueError as e:
                failed.append(self._fail(seq, str(e)))
        return failed

    @staticmethod
    def _hold_unmasked(plan: SchedulerOutput) -> SchedulerOutput:
        """The plan without the draws of sequences whose mask is not ready: they leave the decode batch, and a
        prompt's last chunk stops one token short (its forward runs once the mask is there)."""
        def waiting(seq: Sequence) -> bool:
            return seq.constraint is not None and not seq.constraint.ready

        decode = [s for s in plan.decode if not waiting(s)]
        prefill = []
        for c in plan.prefill:
            if c.completes_prompt and waiting(c.seq):
                if c.end - 1 > c.start:
                    prefill.append(PrefillChunk(c.seq, c.start, c.end - 1))
            else:
                prefill.append(c)
        return SchedulerOutput(prefill, decode)

    def _advance(self, seq: Sequence, token: int, logprob, now: float) -> RequestOutput:
        seq.token_ids.append(token)
        seq.n_generated += 1
        if seq.first_token_at is None:
            seq.first_token_at = now
            self.metrics.observe_ttft(now - seq.added_at)
        last = seq.n_generated >= seq.request.max_tokens
        text, finish = seq.output.push(token, last=last)
        if finish is None and seq.constraint is not None:
            try:
                seq.constraint.advance(token)
            except ValueError as e:
                return self._fail(seq, str(e))
            if seq.constraint.finished:  # the value is complete and nothing may follow it
                text, finish = text + seq.output.finish(), "stop"
        return self._output(seq, [token], [logprob] if logprob is not None else None, text, finish)

    def _output(self, seq, tokens, logprobs, text, finish) -> RequestOutput:
        req = seq.request
        out = RequestOutput(req.request_id, text, tokens, logprobs, None, finish, seq.n_prompt, seq.n_generated,
                            cached_tokens=seq.num_cached)
        if req.prompt_logprobs is not None and seq.n_generated <= 1:
            out.prompt_logprobs = seq.prompt_logprobs
        if finish is not None:
            self._seqs.pop(req.request_id, None)
            self.scheduler.finish(seq, finish)
            self.metrics.inc("herd_requests_total", finish_reason=finish)
        return out

    def _fail(self, seq: Sequence, message: str) -> RequestOutput:
        out = self._output(seq, [], None, "", "error")
        out.error = message
        return out

    def fail_all(self, message: str) -> list[RequestOutput]:
        """End every queued and running request with an error (after an unexpected exception)."""
        return [self._fail(s, message) for s in list(self._seqs.values())]

    def gauges(self) -> dict[str, float]:
        """Queue length, running requests, KV-cache blocks and prefix-cache hits now (read from any thread)."""
        s, b = self.scheduler, self.blocks
        usable = b.num_blocks - 1
        in_use = b.in_use
        return {"herd_queue_length": len(s.waiting), "herd_running_requests": len(s.running),
                "herd_kv_cache_usage_ratio": in_use / usable, "herd_kv_blocks_in_use": in_use,
                "herd_kv_blocks_free": usable - in_use, "herd_kv_blocks_cached_idle": len(b.idle),
                "herd_kv_block_bytes": self.runner.cache.block_bytes(),
                "herd_prefix_cache_queries_total": b.queries, "herd_prefix_cache_hits_total": b.hits}
