"""The key/value cache and the batch description handed to the model; the model allocates neither.

PagedKVCache holds, per layer, k and v blocks [num_blocks, n_kv_heads, block_size, head_dim] (vLLM's
PagedAttention layout). A sequence's keys live in the blocks its block table lists, in order: position p
is at offset p % block_size of block table[p // block_size]. Which blocks a sequence gets is decided
outside the model (herd.engine.blocks); block 0 is never handed out, so tables of different lengths
are padded with 0 to one width, and what attention gathers from there is masked. The blocks are allocated with torch.empty, so the
memory of blocks never written is never touched (the OS maps those pages on first write).

Batch says what one forward computes: each row's token positions, and where its keys and values go.
Attention masks are derived from positions only: the key at position j is visible from a query at
position p when j <= p (and, on chunked layers, j // C == p // C), so whatever a block holds past a
sequence's current length is never seen and a freed block needs no clearing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class PagedKVCache:
    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, num_blocks: int, block_size: int = 16,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        if num_blocks < 2 or block_size < 1:
            raise ValueError(f"a paged cache needs at least 2 blocks of at least 1 token, got {num_blocks} x {block_size}")
        shape = (num_blocks, n_kv_heads, block_size, head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.num_blocks, self.block_size = num_blocks, block_size

    @classmethod
    def for_model(cls, args, tokens: int, block_size: int = 16, dtype=torch.float32, device=None) -> "PagedKVCache":
        """Room for `tokens` tokens (in whole blocks) besides the padding block."""
        return cls(args.n_layers, args.n_kv_heads, args.head_dim, 1 + -(-tokens // block_size), block_size,
                   dtype, device)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def block_bytes(self) -> int:
        return self.nbytes() // self.num_blocks

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, batch: "Batch") -> None:
        """k, v [B, n_kv_heads, T, hd] at the batch's positions."""
        blocks, offsets = batch.slots(self.block_size)  # [B, T] each
        self.k[layer][blocks, :, offsets] = k.transpose(1, 2).to(self.k[layer].dtype)  # values [B, T, H, hd]
        self.v[layer][blocks, :, offsets] = v.transpose(1, 2).to(self.v[layer].dtype)

    def read(self, layer: int, batch: "Batch") -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's cached k, v as [B, n_kv_heads, L, hd], L = the batch's longest sequence; a row's keys
        past its own length are other blocks' contents, which the positions mask out."""
        length = batch.max_len
        n = -(-length // self.block_size)
        table = batch.block_tables[:, :n]
        out = []
        for cache in (self.k[layer], self.v[layer]):
            rows = cache[table]  # [B, n, H, bs, hd]
            b, _, h, bs, hd = rows.shape
            out.append(rows.transpose(1, 2).reshape(b, h, n * bs, hd)[:, :, :length])
        k, v = out
        if batch.start is None:  # rows of different lengths: a shorter row's tail is whatever its blocks held
            # masks are added to the scores (NaN + -inf is NaN) and 0 x NaN is NaN: clear the tail
            unwritten = (torch.arange(length, device=v.device) > batch.positions[:, -1:])[:, None, :, None]
            k, v = k.masked_fill(unwritten, 0.0), v.masked_fill(unwritten, 0.0)
        return k, v


@dataclass
class Batch:
    """One forward pass: `positions` [B, T] of its tokens and, with a cache, each row's `block_tables`
    [B, max_blocks] (int64; padded with 0) and `max_len`, the longest row's length after this pass.
    `start` is set when every row's positions are start..start+T-1 (plain causal attention may then need
    no mask). `last` [B], when set, is the index of each row's last real token: rows shorter than T are
    padded at the end (prompts of several requests in one forward), and the padding's keys land past the
    row's length, where no real token looks. A scorer may set it to [B, K]: the K positions per row whose
    logits it wants."""

    positions: torch.Tensor
    cache: PagedKVCache | None = None
    block_tables: torch.Tensor | None = None
    max_len: int = 0
    start: int | None = None
    last: torch.Tensor | None = None
    _slots: tuple | None = field(default=None, repr=False)

    @classmethod
    def prompt(cls, tokens: int, batch: int = 1, device=None) -> "Batch":
        """Positions 0..tokens-1 for every row, no cache (a whole prompt scored at once)."""
        positions = torch.arange(tokens, device=device).expand(batch, tokens)
        return cls(positions, start=0, max_len=tokens)

    @classmethod
    def rows(cls, cache: PagedKVCache, tables: list[list[int]], starts: list[int], steps: int,
             device=None, lengths: list[int] | None = None) -> "Batch":
        """Row i: `steps` tokens at positions starts[i].., its keys in blocks tables[i]; with `lengths`,
        only the first lengths[i] of them are real (the rest is padding)."""
        end = max(starts) + steps
        width = max(max(len(t) for t in tables), -(-end // cache.block_size))
        block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long, device=device)
        positions = torch.tensor(starts, dtype=torch.long, device=device)[:, None] + torch.arange(steps, device=device)
        uniform = all(s == starts[0] for s in starts)
        last = None
        if lengths is not None and any(n != steps for n in lengths):
            last = torch.tensor(lengths, dtype=torch.long, device=device) - 1
        return cls(positions, cache, block_tables, end, starts[0] if uniform else None, last)

    def slots(self, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(block, offset) of every token [B, T]; the same for every layer, so computed once."""
        if self._slots is None:
            self._slots = (self.block_tables.gather(1, self.positions // block_size), self.positions % block_size)
        return self._slots
