"""Frozen linears that keep their stored quantized weights and still backpropagate: the base of QLoRA.

BlockDequantLinear holds the weight as stored (GGML blocks from a GGUF file, or herd's int4/int8 from
`herd quantize`) and, in the forward and in the backward alike, dequantizes a band of output rows at a time,
multiplies, and drops the band: no full-precision copy of the matrix, let alone of the model, ever exists.
The gradient flows to the input only (the weight is frozen), which is all LoRA above it needs.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from herd.quant import GGMLTensor, Int4Weight, Int8Weight

BAND_WEIGHTS = 1 << 20  # weights dequantized at once: a few MB of temporaries


def _rows(source, a: int, b: int, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(source, GGMLTensor):
        data = np.asarray(source.data).reshape(source.shape[0], -1)[a:b].reshape(-1)
        return GGMLTensor(source.ggml_type, (b - a, *source.shape[1:]), data, source.name).dequantize(dtype)
    if isinstance(source, (Int4Weight, Int8Weight)):
        return source.dequantize(dtype, rows=torch.arange(a, b))
    return source[a:b].to(dtype)


class _BandedMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, module: "BlockDequantLinear") -> torch.Tensor:
        ctx.module = module
        flat = x.reshape(-1, module.in_features)
        out = flat.new_empty(flat.shape[0], module.out_features)
        for a, b in module.bands():
            out[:, a:b] = flat @ module.weight_rows(a, b, flat.dtype).T
        return out.view(*x.shape[:-1], module.out_features)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        module = ctx.module
        if not ctx.needs_input_grad[0]:
            return None, None
        g = grad_out.reshape(-1, module.out_features)
        grad = g.new_zeros(g.shape[0], module.in_features)
        for a, b in module.bands():
            grad += g[:, a:b] @ module.weight_rows(a, b, g.dtype)
        return grad.view(*grad_out.shape[:-1], module.in_features), None


class BlockDequantLinear(nn.Module):
    """`bias` (the image encoders' linears have them) is kept frozen, in float32 beside the stored weight."""

    def __init__(self, source, dtype: torch.dtype = torch.float32, bias: torch.Tensor | None = None):
        super().__init__()
        self.source = source  # not a buffer: the stored blocks, usually pages of the file's memory map
        self.out_features, self.in_features = source.shape
        self.band = max(1, BAND_WEIGHTS // self.in_features)
        self.register_buffer("weight_dtype", torch.empty(0, dtype=dtype), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone(), persistent=False)

    def bands(self):
        return ((a, min(a + self.band, self.out_features)) for a in range(0, self.out_features, self.band))

    def weight_rows(self, a: int, b: int, dtype: torch.dtype) -> torch.Tensor:
        return _rows(self.source, a, b, dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The whole weight (for merging an adapter or exporting), band by band into one tensor."""
        return torch.cat([self.weight_rows(a, b, dtype) for a, b in self.bands()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        y = _BandedMatmul.apply(x, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        kind = getattr(self.source, "type_name", type(self.source).__name__)
        return f"in={self.in_features}, out={self.out_features}, {kind} dequantized in bands of {self.band} rows"


__all__ = ["BlockDequantLinear"]
