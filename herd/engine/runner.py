"""SchedulerOutput → model forwards → sampled tokens: the only engine file that touches tensors.

The KV cache has one slot per running sequence (`max_batch` slots of `context` tokens each). Every
prefill chunk is its own forward [1, T] into its sequence's slot; all decoding sequences share one
forward [B, 1] with per-row positions and slots, so rows at different lengths run together (the
model derives masks from positions, see herd.model.cache). Sampling, penalties and logprobs are
herd.sampling's and herd.generate's, the same code the single-request generator uses.
"""

from __future__ import annotations

import torch

from herd.engine.scheduler import SchedulerOutput, Sequence
from herd.generate import TokenLogprob, token_logprob
from herd.model import KVCache, Transformer
from herd.sampling import apply_penalties, sample
from herd.tokenizer import Tokenizer


class Runner:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, max_batch: int, context: int):
        self.model = model
        self.tokenizer = tokenizer
        weight = model.tok_embeddings.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.vocab_size = model.args.vocab_size
        self.cache = KVCache.for_model(model.args, context, slots=max_batch, dtype=self.dtype, device=self.device)

    def generator(self, seed: int | None) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))
        return g

    def _tensor(self, rows) -> torch.Tensor:
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    @torch.inference_mode()
    def execute(self, step: SchedulerOutput) -> list[tuple[Sequence, torch.Tensor]]:
        """Run the step's forwards; return (sequence, logits [V]) for every sequence that samples now
        (its prompt just completed, or it is decoding). Prompt logprobs are filled in on the way."""
        ready: list[tuple[Sequence, torch.Tensor]] = []
        for chunk in step.prefill:
            seq, start, end = chunk.seq, chunk.start, chunk.end
            want = seq.request.prompt_logprobs is not None
            logits = self.model(self._tensor([seq.token_ids[start:end]]), cache=self.cache,
                                positions=torch.arange(start, end, device=self.device)[None],
                                slot_ids=self._tensor([seq.slot]), last_only=not want)[0]  # [T or 1, V]
            if want:
                self._prompt_logprobs(seq, start, end, logits)
            seq.num_computed = end
            if chunk.completes_prompt and seq.request.max_tokens > 0:
                ready.append((seq, logits[-1]))
        if step.decode:
            seqs = step.decode
            logits = self.model(self._tensor([[s.token_ids[-1]] for s in seqs]), cache=self.cache,
                                positions=self._tensor([[len(s.token_ids) - 1] for s in seqs]),
                                slot_ids=self._tensor([s.slot for s in seqs]), last_only=True)[:, -1]  # [B, V]
            for s, row in zip(seqs, logits):
                s.num_computed = len(s.token_ids)
                ready.append((s, row))
        return ready

    def _prompt_logprobs(self, seq: Sequence, start: int, end: int, logits: torch.Tensor) -> None:
        """Logprob of prompt token i+1 from the logits at position i, for the positions of this chunk."""
        if start == 0:
            seq.prompt_logprobs.append(None)  # the first token has no context to be predicted from
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        top_n = seq.request.prompt_logprobs
        for i in range(start, min(end, seq.n_prompt - 1)):
            row = logprobs[i - start]
            seq.prompt_logprobs.append(token_logprob(row, seq.token_ids[i + 1], top_n, self.tokenizer, row))

    @torch.inference_mode()
    def sample(self, ready: list[tuple[Sequence, torch.Tensor]]) -> list[tuple[int, TokenLogprob | None]]:
        """One token per ready sequence: penalties, constraint masks, then per-request seeded draws."""
        if not ready:
            return []
        seqs = [s for s, _ in ready]
        logits = torch.stack([row for _, row in ready])  # [N, V]
        params = [s.request.params for s in seqs]
        shaped = apply_penalties(logits, [s.token_ids for s in seqs], params, n_prompt=[s.n_prompt for s in seqs])
        for i, s in enumerate(seqs):
            if s.constraint is not None:
                allowed = s.constraint.allowed(self.vocab_size).to(shaped.device)
                shaped[i] = shaped[i].masked_fill(~allowed, float("-inf"))
        tokens = sample(shaped, params, [s.generator for s in seqs]).tolist()
        out = []
        for i, (s, token) in enumerate(zip(seqs, tokens)):
            n = s.request.logprobs
            out.append((token, token_logprob(logits[i], token, n, self.tokenizer) if n is not None else None))
        return out
