"""Fused projections: q, k and v in one matmul (`wqkv`, rows stacked q then k then v) and gate and up in
one (`w13`, gate rows first). One matmul reads the activations once and, for quantized weights, is one
kernel call instead of three; the maths is the plain model's."""

from __future__ import annotations

from typing import Callable

import torch.nn.functional as F
from torch import nn

from herd.model.model import Attention, FeedForward
from herd.model.rope import apply_rope
from herd.transforms import swap_class


class FusedAttention(Attention):
    """Attention with `wqkv` in place of wq, wk, wv; q and k heads rotate in one go."""

    def project(self, x, ctx):
        batch, steps, _ = x.shape
        qkv = self.wqkv(x).to(x.dtype).view(batch, steps, -1, self.head_dim)
        qk, v = qkv.split([self.n_heads + self.n_kv_heads, self.n_kv_heads], dim=2)
        if self.spec.rope:
            qk = apply_rope(qk, ctx.rot)
        q, k = qk.split([self.n_heads, self.n_kv_heads], dim=2)
        return q, k, v


class FusedFeedForward(FeedForward):
    """SwiGLU with `w13` in place of w1 and w3."""

    def forward(self, x):
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


FUSIONS = ((Attention, FusedAttention, "wqkv", ("wq", "wk", "wv")),
           (FeedForward, FusedFeedForward, "w13", ("w1", "w3")))


def fuse_projections(model: nn.Module, build: Callable[[list[str]], nn.Module | None]) -> nn.Module:
    """Swap each Attention and FeedForward (MoE shared experts included) for its fused form where
    `build(weight names)` gives the stacked module (it returns None where the parts cannot share one)."""
    for name, module in list(model.named_modules()):
        for base, fused, slot, parts in FUSIONS:
            if type(module) is not base:
                continue
            linear = build([f"{name}.{p}.weight" for p in parts])
            if linear is None:
                continue
            new = swap_class(module, fused)
            for p in parts:
                delattr(new, p)
            setattr(new, slot, linear)
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, new)
    return model


__all__ = ["FusedAttention", "FusedFeedForward", "fuse_projections"]
