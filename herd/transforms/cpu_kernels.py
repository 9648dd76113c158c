"""herd's C++ CPU kernels (herd.kernels) swapped into the plain model.

Each replacement is a subclass that takes the kernel where its inputs are what the kernel computes on
(fp32 inference tensors on the CPU) and defers to the plain module otherwise (autograd, other dtypes,
other devices), so a model keeps working whatever it is later asked to do:
- RMSNorm → KernelRMSNorm (herd::rms_norm);
- Attention → KernelAttention: one new token attending to every cached key (herd::decode_attention);
  FusedAttention → KernelFusedAttention, which also rotates q and k in place (herd::rope_);
- FusedFeedForward → KernelFeedForward (herd::silu_mul between the fused gate/up and down);
- TransformerBlock → KernelBlock where all four projections are herd's packed linears and the layer is
  plain Llama (no MoE, QK norm, chunking or temperature tuning): a decode step of one token per row, every
  row at its own position with its own cache blocks, runs the whole block as one op (herd::decode_block),
  the same steps TransformerBlock.forward takes.
"""

from __future__ import annotations

import torch
from torch import nn

from herd import kernels
from herd.model.model import Attention, RMSNorm, TransformerBlock
from herd.transforms import replace_modules, swap_class
from herd.transforms.fuse import FusedAttention, FusedFeedForward

ONE_OP_DECODE = True  # False: decode steps run op by op, as every other forward pass does (tests compare)


def _fp32_inference(x: torch.Tensor) -> bool:
    return (kernels.ops is not None and x.device.type == "cpu" and x.dtype == torch.float32
            and not (torch.is_grad_enabled() and x.requires_grad))


class KernelRMSNorm(RMSNorm):
    def forward(self, x):
        if self.weight.dtype == torch.float32 and _fp32_inference(x):
            return kernels.ops.rms_norm(x, self.weight, self.eps)
        return super().forward(x)


class KernelAttention(Attention):
    def attend(self, q, k, v, mask, causal: bool):
        if q.shape[2] == 1 and mask is None and _fp32_inference(q) and k.dtype == v.dtype == torch.float32:
            return kernels.ops.decode_attention(q, k, v, q.shape[-1] ** -0.5)
        return super().attend(q, k, v, mask, causal)


class KernelFusedAttention(KernelAttention, FusedAttention):
    def project(self, x, ctx):
        batch, steps, _ = x.shape
        qkv = self.wqkv(x).to(x.dtype).view(batch, steps, -1, self.head_dim)
        if not (self.spec.rope and _fp32_inference(qkv) and qkv.is_contiguous()):
            return super().project(x, ctx)
        kernels.ops.rope_(qkv, torch.view_as_real(ctx.rot), self.n_heads + self.n_kv_heads)  # q and k, in place
        return qkv.split([self.n_heads, self.n_kv_heads, self.n_kv_heads], dim=2)


class KernelFeedForward(FusedFeedForward):
    def forward(self, x):
        gate_up = self.w13(x)
        if _fp32_inference(gate_up):
            return self.w2(kernels.ops.silu_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.w2(torch.nn.functional.silu(gate) * up)


class KernelBlock(TransformerBlock):
    """`packed`: the wqkv, wo, w13 and w2 weights in herd's packed layout, set by use_cpu_kernels."""

    packed: list

    def forward(self, x, ctx, layer_id: int):
        cache = ctx.cache
        # One fp32 token per row, each at its own position and blocks (fp32, bf16 or fp16 keys): what decode_block computes.
        if (ONE_OP_DECODE and x.shape[1] == 1 and cache is not None
                and cache.k[layer_id].dtype in (torch.float32, torch.bfloat16, torch.float16) and _fp32_inference(x)):
            rows = ctx.__dict__.get("decode_rows")
            if rows is None:  # once per forward, not per layer: positions [B], (cos, sin) pairs
                rows = ctx.decode_rows = (ctx.positions[:, 0].contiguous(), torch.view_as_real(ctx.rot))
            attn = self.attention
            return kernels.ops.decode_block(
                x, self.attention_norm.weight, self.ffn_norm.weight, self.packed, cache.k[layer_id],
                cache.v[layer_id], rows[1], rows[0], ctx.batch.block_tables, attn.n_heads, attn.n_kv_heads,
                attn.norm_eps, attn.spec.rope)
        return super().forward(x, ctx, layer_id)


def _packed_projections(block: TransformerBlock) -> list | None:
    spec, ffn = block.attention.spec, block.feed_forward
    if spec.moe or spec.qk_norm or spec.temperature_tuning or spec.chunk_size:
        return None
    projections = [getattr(block.attention, "wqkv", None), block.attention.wo, getattr(ffn, "w13", None),
                   getattr(ffn, "w2", None)]
    packed = [p.kernel_weights() if hasattr(p, "kernel_weights") else None for p in projections]
    return packed if all(w is not None for w in packed) else None


_SWAPS = ((KernelRMSNorm, RMSNorm), (KernelFusedAttention, FusedAttention), (KernelAttention, Attention),
          (KernelFeedForward, FusedFeedForward))


def use_cpu_kernels(model: nn.Module) -> nn.Module:
    """Swap in the kernel modules (see the module doc); without herd's kernels the model is unchanged."""
    if not kernels.load():
        return model

    def build(name: str, module: nn.Module):
        for kernel_cls, base in _SWAPS:
            if type(module) is base:
                return swap_class(module, kernel_cls)
        if type(module) is TransformerBlock:
            packed = _packed_projections(module)
            if packed is not None:
                block = swap_class(module, KernelBlock)
                block.packed = packed
                return block
        return None

    # Blocks first (their children are swapped in the same pass, as named_modules lists them after).
    replace_modules(model, build)
    return model


__all__ = ["use_cpu_kernels", "KernelRMSNorm", "KernelAttention", "KernelFusedAttention", "KernelFeedForward",
           "KernelBlock", "ONE_OP_DECODE"]
