"""The key/value cache handed to the model; the model never allocates one itself.

KVCache holds, per layer, k and v buffers [slots, n_kv_heads, capacity, head_dim]. Every row of a
forward batch names its slot, and every token its absolute position, so the same object serves the
single-request generator (one slot) and a continuous-batching engine (one slot per running request,
each at its own length). Attention masks are derived from positions only: a key at position j is
visible from a query at position p when j <= p (and, on chunked layers, j // C == p // C), so stale
entries past a sequence's current length are never seen and a freed slot needs no clearing.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        capacity: int,
        slots: int = 1,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        shape = (slots, n_kv_heads, capacity, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.capacity = capacity
        self.slots = slots

    @classmethod
    def for_model(cls, args, capacity: int, slots: int = 1, dtype=torch.float32, device=None) -> "KVCache":
        return cls(args.n_layers, args.n_kv_heads, args.head_dim, capacity, slots, dtype, device)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def update(
        self,
        layer: int,
        k: torch.Tensor,
        v: torch.Tensor,
        positions: torch.Tensor,
        slot_ids: torch.Tensor | None = None,
        start: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, n_kv_heads, T, hd] at `positions` [B, T] of cache rows `slot_ids` [B]
        (None: rows 0..B-1); return the cached k, v [B, n_kv_heads, L, hd], L = max(positions) + 1.

        `start` says every row's positions are start..start+T-1 (the generator's case): the write is
        then a slice and the result a view, with no gather copy of the cache."""
        ck, cv = self.k[layer], self.v[layer]
        batch, steps = positions.shape
        if start is not None and slot_ids is None:
            length = start + steps
            self._check(length)
            ck[:batch, :, start:length] = k
            cv[:batch, :, start:length] = v
            return ck[:batch, :, :length], cv[:batch, :, :length]
        length = int(positions.max()) + 1
        self._check(length)
        if slot_ids is None:
            slot_ids = torch.arange(batch, device=positions.device)
        rows = slot_ids[:, None].expand_as(positions)
        ck[rows, :, positions] = k.transpose(1, 2).to(ck.dtype)  # [B, T] index → values [B, T, H, hd]
        cv[rows, :, positions] = v.transpose(1, 2).to(cv.dtype)
        return ck[slot_ids, :, :length], cv[slot_ids, :, :length]

    def _check(self, length: int):
        if length > self.capacity:
            raise ValueError(f"position {length - 1} is past the KV cache capacity of {self.capacity} tokens")
