"""Decode steps at a few fixed shapes, captured once as CUDA graphs and replayed (the GPU path).

A decode step of a small model on a GPU is launch-bound: a Llama-3.1-8B layer is a dozen kernels, each
done in microseconds, and Python issuing them one by one leaves the GPU idle between them. A CUDA graph
records the whole step once and replays it with one launch (what vLLM and gpt-fast's
`mode="reduce-overhead"` do). A graph replays fixed shapes on fixed memory, so every step is padded:
- rows up to the next of BATCH_SIZES (padding rows decode token 0 at position 0 into the padding block 0,
  which no sequence reads);
- keys up to the next power of two of blocks (a row's keys past its own position are masked by the
  positions and cleared by PagedKVCache.read, as for any batch of rows at different positions).
Each (rows, key blocks) shape is captured the first time it is needed, into one shared memory pool, from
the plain model's own forward: nothing here knows the model's maths. With `capture=False` the same padded
steps run eagerly (the CPU tests check that padding changes no output).
Forwards that synchronise with the host cannot be captured (Llama 4's MoE picks experts on the host):
`capturable` says whether a model can be.
"""

from __future__ import annotations

import torch

from herd.model import Batch, PagedKVCache, Transformer
from herd.model.model import MoE

BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def capturable(model: Transformer) -> bool:
    return not any(isinstance(m, MoE) for m in model.modules())


def _bucket(n: int, sizes) -> int:
    return next((s for s in sizes if s >= n), n)


class StaticDecode:
    def __init__(self, model: Transformer, cache: PagedKVCache, max_batch: int, max_blocks: int,
                 capture: bool | None = None):
        self.model, self.cache = model, cache
        self.device = cache.k[0].device
        self.capture = self.device.type == "cuda" if capture is None else capture
        self.batch_sizes = tuple(s for s in BATCH_SIZES if s < max_batch) + (max_batch,)
        self.max_blocks = max_blocks
        self.graphs: dict[tuple[int, int], tuple] = {}  # (rows, key blocks) -> (graph, inputs, logits)
        self.pool = None

    def shape(self, rows: int, key_blocks: int) -> tuple[int, int]:
        """The padded (rows, key blocks) a step of this size runs at."""
        blocks = 1 << max(0, (key_blocks - 1).bit_length())
        return _bucket(rows, self.batch_sizes), min(max(blocks, 1), self.max_blocks)

    def _inputs(self, rows: int, blocks: int):
        long = dict(dtype=torch.long, device=self.device)
        return torch.zeros(rows, 1, **long), torch.zeros(rows, 1, **long), torch.zeros(rows, blocks, **long)

    def _forward(self, tokens, positions, tables):
        bs = self.cache.block_size
        batch = Batch(positions, self.cache, tables, tables.shape[1] * bs, None)
        return self.model(tokens, batch, last_only=True)

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, batch: Batch, last_only: bool = True) -> torch.Tensor:
        """Logits [B, 1, V] of one token per row (the runner's decode step)."""
        n, width = tokens.shape[0], batch.block_tables.shape[1]
        used = -(-batch.max_len // self.cache.block_size)
        rows, blocks = self.shape(n, max(used, 1))
        entry = self.graphs.get((rows, blocks))
        inputs = entry[1] if entry else self._inputs(rows, blocks)
        t, p, table = inputs
        t.zero_(), p.zero_(), table.zero_()
        t[:n], p[:n] = tokens, batch.positions
        keep = min(width, blocks)
        table[:n, :keep] = batch.block_tables[:, :keep]
        if not self.capture:
            return self._forward(t, p, table)[:n]
        if entry is None:
            entry = self.graphs[(rows, blocks)] = self._record(inputs)
        entry[0].replay()
        return entry[2][:n]

    def _record(self, inputs):
        """Warm up on a side stream (cuBLAS picks its kernels, allocations settle), then capture."""
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._forward(*inputs)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._forward(*inputs)
        return graph, inputs, logits


__all__ = ["StaticDecode", "capturable", "BATCH_SIZES"]
