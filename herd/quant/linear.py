"""Linear and embedding modules whose weights stay quantized, and the repacking that feeds them.

With herd's own kernels built (herd.kernels; ./setup.sh builds them):

- `Q4Linear`: blocks of 32 with w = d*q + m, q in 0..15, d and m fp32: GGML Q4_0, Q4_1 and Q4_K exactly,
  and herd's own int4. Integer dot products against int16 activations for a few tokens; a float GEMM of
  the dequantized weight for a prompt.
- `Q8Linear`: int8 blocks of 32 with one scale each: GGML Q8_0 and Q5_0 exactly, and herd's own int8 per
  channel; with an offset per 32 and a scale per 16: GGML Q5_1, Q5_K and Q6_K exactly, and weights of
  mixed 4/5/6/8-bit types fused into one module.

Otherwise PyTorch's own CPU weight-only ops, vectorised (AVX2/AVX-512/NEON) for bf16 activations:

- `Int4Linear`: `aten._weight_int4pack_mm_for_cpu`. Group-wise int4 along the input dim (group 32..256),
  w = (q - 8) * scale + zero with q in 0..15 and scale/zero in bf16 — the gpt-fast convention. GGML Q4_0,
  Q4_1 and Q4_K are this format exactly (only their fp16/6-bit scales are rounded to bf16). Q8_0 is two of
  them side by side along the input dim (high and low nibble of q + 128), also exact, but measured slower
  than bf16 (see INT4_TYPES).
- `Int8Linear`: `aten._weight_int8pack_mm`, int8 per output channel, w = q * scale.

Either way:

- `BF16Linear`: types with no exact form above (F16, BF16; without herd's kernels also Q8_0, Q5_0, Q5_1,
  Q5_K, Q6_K): dequantized to bf16.
- `QuantEmbedding`: an embedding table kept as stored GGML blocks (or looked up in the output's packed
  weight it is tied to); only looked-up rows are dequantized.

Packed int4 weights depend on the CPU's vector width (PyTorch packs differently for AVX-512 and AVX2), so
they are packed at load time, never stored. No model knowledge lives here: herd.loader decides what to swap.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from herd.quant import GGMLTensor, Int4Weight, Int8Weight
from herd.quant.ggml import (BLOCK_SIZES, QK_K, GGMLType, _BIT, _k_low4, _k_scales, _nibbles, _q5_values, _q6_k_values,
                             dequantize)

COMPUTE_DTYPE = torch.bfloat16  # the only activation dtype the CPU weight-only kernels vectorise everywhere
_PACK_ROWS = 1024  # rows packed per call: bounds the int32 temporary the packing op wants (a multiple of 64)

# The 4-bit GGML types with one scale and offset per 32: exact in Q4Linear (herd's kernels) and Int4Linear
# (PyTorch's). Without herd's kernels everything else is dequantized to bf16 at load: Q8_0 also has an exact int4 form (two nibble planes, see ggml_int4_planes), but on a 2-core AVX2 EPYC it
# measured 1.3-1.6x slower than a bf16 matmul of the dequantized weight at every shape tried (576x3072 to
# 2048x8192, and the 49152x576 output), so Q8_0 takes the bf16 path.
INT4_TYPES = frozenset({GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q4_K})


class Int4Linear(nn.Module):
    """y = x W^T with W in PyTorch's packed CPU int4 layout. `split` > 1: the weight is `split` int4 planes
    side by side along the input dim (Q8_0 as two nibble planes), so x is repeated `split` times."""

    def __init__(self, in_features: int, out_features: int, group_size: int, packed: torch.Tensor,
                 scales_and_zeros: torch.Tensor, split: int = 1):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.group_size, self.split = group_size, split
        self.register_buffer("weight", packed)  # uint8 [N16, split*K/2], CPU-specific packing, N16 = N rounded up to 16
        self.register_buffer("scales_and_zeros", scales_and_zeros)  # bf16 [split*K/group, N16, 2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1]).to(COMPUTE_DTYPE)
        if self.split > 1:
            x = x.repeat(1, self.split)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.weight, self.group_size, self.scales_and_zeros)
        if y.shape[-1] != self.out_features:  # rows padded to a multiple of 16
            y = y[:, : self.out_features]
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        planes = f", {self.split} planes" if self.split > 1 else ""
        return f"in={self.in_features}, out={self.out_features}, int4 group {self.group_size}{planes}"


HALF_SCALE_ERROR = 2.0**-11  # fp16's relative rounding, for values in its normal range


def compact_scales(d: torch.Tensor, m: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales and offsets in fp16 (records a sixth smaller: a decode step reads every weight once, so
    fewer bytes are a faster step) where fp16 holds each within HALF_SCALE_ERROR of its value: exactly for
    GGML Q4_0, Q4_1 and Q5_1 (their scales are fp16), to 2^-11 for Q4_K, Q5_K and Q6_K (whose scale is an
    fp16 times a 6-bit sub-scale), a twentieth of the 1/255 rounding of llama.cpp's own 8-bit activations.
    Kept fp32 otherwise (values fp16 cannot represent to that precision), and for plain q8 records."""
    if m is None:
        return d, m
    d32, m32 = d.float(), m.float()
    dh, mh = d32.half(), m32.half()
    for exact, half in ((d32, dh), (m32, mh)):
        err = (half.float() - exact).abs()
        if not (torch.isfinite(half).all() and (err <= HALF_SCALE_ERROR * exact.abs()).all()):
            return d, m
    return dh, mh


class PackedLinear(nn.Module):
    """y = x W^T with W in herd's packed layout (herd/kernels/cpu.cpp: groups of 8 rows, one record per
    group and block of 32; `herd.pack` builds it from values, scales and offsets). Few tokens: integer dot
    products against activations quantized to int16 per block (llama.cpp uses int8, which measured 96.7%
    greedy agreement with the fp32 path on SmolLM2; int16 100%); 512 tokens or more: the weight dequantized
    to fp32 for a float GEMM (only then faster per token than the dot products). `int8_tokens` > 0 (set by
    herd.transforms.prompt_int8) sends calls of that many tokens or more on q4 weights through int8
    activations, as llama.cpp computes prompts."""

    int8_tokens = 0

    def __init__(self, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = q.shape
        d, m = compact_scales(d, m)
        self.register_buffer("packed", torch.ops.herd.pack(q, d, m))  # uint8 [ceil(N/8), K/32, record]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # fp32 [..., N]; the op picks dot products or GEMM
        return torch.ops.herd.linear(x, self.packed, self.out_features, self.int8_tokens)

    def dequantize(self) -> torch.Tensor:
        return torch.ops.herd.dequantize(self.packed, self.out_features)

    def kernel_weights(self) -> torch.Tensor | None:
        """What herd::decode_block takes (whole groups of 8 rows only)."""
        return self.packed if self.out_features % 8 == 0 else None

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, q4 blocks of 32 (herd kernels)"


class Q4Linear(PackedLinear):
    """W = d*q + m, q uint8 [N, K] in 0..15, one d and one m per 32 inputs (24 bytes per 32 weights): every
    4-bit GGML type with a scale and offset per 32 (Q4_0, Q4_1, Q4_K) and herd's own int4, exactly."""

    def __init__(self, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor):
        super().__init__(q, d, m)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, q4 blocks of 32 (herd kernels)"


class Q8Linear(PackedLinear):
    """W = d*q, q int8 [N, K], one scale per 32 inputs (36 bytes per 32 weights): GGML Q8_0 and Q5_0
    exactly, herd int8 per channel with the channel's scale repeated. With offsets m [N, K/32] the scales
    are one per 16 inputs, d [N, K/16], and w = d*q + m (44 bytes per 32 weights): GGML Q5_1, Q5_K and Q6_K
    exactly, and weights of mixed types fused into one."""

    def __init__(self, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None = None):
        super().__init__(q, d, m)

    def extra_repr(self) -> str:
        kind = ("q8 blocks of 32" if self.packed.shape[-1] == 288 else "q8 blocks of 32 with offsets, scales per 16"
                + (" in fp16" if self.packed.shape[-1] == 304 else ""))
        return f"in={self.in_features}, out={self.out_features}, {kind} (herd kernels)"


class Int8Linear(nn.Module):
    """y = x W^T with W int8 per output channel: w = q * scale."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)  # int8 [N, K]
        self.register_buffer("scales", scales.to(COMPUTE_DTYPE))  # [N]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, shape[-1]).to(COMPUTE_DTYPE), self.weight, self.scales)
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int8 per channel"


class BF16Linear(nn.Module):
    """A dequantized weight (GGML types without an exact int4 form: Q5_K, Q6_K, ...) in bf16."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.to(COMPUTE_DTYPE))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(COMPUTE_DTYPE), self.weight)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bf16"


class FloatLinear(nn.Module):
    """y = x W^T + b in fp32 over a weight kept in the float dtype its file stores (F32, F16, BF16): an image
    encoder's unquantized linears on the quantized path. Rounding their weights and activations to bf16 cost
    0.8% relative error in Llama 4's image features (tests/test_vision_gguf.py's tiny model, Q8_0 mmproj with
    its F32/F16 patch embedding and projector); in fp32 the features were within 0.006% of the dequantized
    path. The encoder runs once per image, not per token, so the wider matmul costs little."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.clone())
        self.register_buffer("bias", None if bias is None else bias.to(torch.float32, copy=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight.float(), self.bias)

    def extra_repr(self) -> str:
        stored = str(self.weight.dtype).removeprefix("torch.")
        return f"in={self.in_features}, out={self.out_features}, {stored} weights, fp32"


class BiasedLinear(nn.Module):
    """A quantized (or bf16) linear and its bias, added in fp32: the image encoders' linears have biases,
    herd's packed kernels and bf16 matmuls none."""

    def __init__(self, linear: nn.Module, bias: torch.Tensor):
        super().__init__()
        self.linear = linear
        self.out_features, self.in_features = linear.out_features, linear.in_features
        self.register_buffer("bias", bias.to(torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).float() + self.bias


class QuantEmbedding(nn.Module):
    """Embedding rows kept quantized (GGML blocks, usually a slice of the file's memory map, a herd
    int4/int8 weight, or the packed weight of the output projection it is tied to); a lookup dequantizes
    only the rows it needs. `weight` is an empty tensor that carries the activation dtype and device, for
    code that asks the embedding which KV cache to allocate."""

    def __init__(self, source: GGMLTensor | Int4Weight | Int8Weight | PackedLinear | torch.Tensor,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.ggml_type = self.group_size = None
        self.dense = isinstance(source, torch.Tensor)
        self.packed_rows = isinstance(source, PackedLinear)  # an output projection it is tied to
        shape = (source.out_features, source.in_features) if self.packed_rows else source.shape
        self.num_embeddings, self.embedding_dim = shape
        if self.packed_rows:  # the same buffer: a lookup dequantizes its rows in C++, no second copy
            parts = {"packed": source.packed}
        elif self.dense:  # a float table in a quantized file: kept in bf16, looked up in `dtype`
            parts = {"q": source.to(COMPUTE_DTYPE)}
        elif isinstance(source, GGMLTensor):
            self.ggml_type = GGMLType(source.ggml_type)
            with warnings.catch_warnings():  # read-only maps are fine: lookups copy the rows they pick
                warnings.simplefilter("ignore", UserWarning)
                rows = torch.from_numpy(np.ascontiguousarray(source.data)).view(self.num_embeddings, -1)
            parts = {"q": rows}  # uint8 [vocab, bytes per row]
        elif isinstance(source, Int4Weight):
            self.group_size = source.group_size
            parts = {"q": source.q, "scales": source.scales, "zeros": source.zeros}
        else:
            parts = {"q": source.q, "scales": source.scales}
        for name, t in parts.items():
            self.register_buffer(name, t, persistent=False)
        self.register_buffer("weight", torch.empty(0, dtype=dtype), persistent=False)

    eager_methods = ("forward",)  # row lookups into a file map: herd.runtime keeps them out of torch.compile

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        idx = tokens.reshape(-1)
        if self.packed_rows:
            out = torch.ops.herd.dequantize_rows(self.packed, idx, self.num_embeddings)
        elif self.dense:
            out = self.q[idx]
        elif self.ggml_type is not None:
            picked = self.q[idx]
            out = dequantize(picked.reshape(-1), self.ggml_type, (picked.shape[0], self.embedding_dim))
        elif self.group_size is not None:
            out = Int4Weight(self.q, self.scales, self.zeros, self.group_size).dequantize(rows=idx)
        else:
            out = Int8Weight(self.q, self.scales).dequantize(rows=idx)
        return out.to(self.weight.dtype).view(*tokens.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        kind = ("packed q4/q8 (the output's)" if self.packed_rows else self.ggml_type.name if self.ggml_type is not None
                else f"int4 g{self.group_size}" if self.group_size else "int8")
        return f"{self.num_embeddings}, {self.embedding_dim}, {kind} rows"


class RefinedLogits(nn.Module):
    """The output projection: the bf16 kernel's logits (rounded: 0.125 apart near |20|), with every logit
    within `margin` of its row's best recomputed in fp32 from the exactly dequantized rows, so the top of
    the distribution (and greedy near-ties) ranks as the fp32 path ranks it."""

    def __init__(self, linear: nn.Module, rows: QuantEmbedding, margin: float = 0.5, most: int = 64):
        super().__init__()
        self.linear, self.rows, self.margin, self.most = linear, rows, margin, most

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._refine(self.linear(x).float(), x)

    eager_methods = ("_refine",)  # data-dependent indexing: herd.runtime keeps it out of torch.compile

    def _refine(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        flat, xs = logits.view(-1, logits.shape[-1]), x.reshape(-1, x.shape[-1]).float()
        best = flat.max(dim=-1, keepdim=True).values
        row, col = torch.nonzero(flat >= best - self.margin - best.abs() / 128, as_tuple=True)
        if row.numel() > self.most * flat.shape[0]:  # a flat distribution: refine the top few per row only
            col = flat.topk(8, dim=-1).indices.reshape(-1)
            row = torch.arange(flat.shape[0], device=flat.device).repeat_interleave(8)
        flat[row, col] = (self.rows(col).float() * xs[row]).sum(-1)
        return logits


# ---- GGML blocks -> int4 planes (q in 0..15, scale, zero) with w = (q - 8) * scale + zero -------------


def _blocks(t: GGMLTensor) -> torch.Tensor:
    block, size = BLOCK_SIZES[GGMLType(t.ggml_type)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.ascontiguousarray(t.data)).view(-1, size)


def _f16(b: torch.Tensor, at: int) -> torch.Tensor:
    return b[:, at : at + 2].contiguous().view(torch.float16).float()


def ggml_q4(t: GGMLTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q uint8 [N, K] in 0..15, d fp32 [N, K/32], m fp32 [N, K/32]) with w = d*q + m exactly, for the 4-bit
    GGML types whose blocks of 32 have one scale and one offset: Q4_0, Q4_1 and Q4_K (sub-blocks)."""
    type_ = GGMLType(t.ggml_type)
    n, k = t.shape
    b = _blocks(t)
    if type_ == GGMLType.Q4_0:  # w = d*(q - 8)
        d = _f16(b, 0)
        return _nibbles(b[:, 2:]).reshape(n, k), d.view(n, -1), (-8 * d).view(n, -1)
    if type_ == GGMLType.Q4_1:
        return _nibbles(b[:, 4:]).reshape(n, k), _f16(b, 0).view(n, -1), _f16(b, 2).view(n, -1)
    if type_ == GGMLType.Q4_K:  # 8 sub-blocks of 32: w = d*sc*q - dmin*m
        sc, mn = _k_scales(b[:, 4:16])  # [nb, 8, 1]
        scale = _f16(b, 0).unsqueeze(-1) * sc
        return _k_low4(b[:, 16:144]).reshape(n, k), scale.view(n, -1), (-(_f16(b, 2).unsqueeze(-1) * mn)).view(n, -1)
    raise ValueError(f"{t.name}: {type_.name} is not a 4-bit type with one scale and offset per 32")


def ggml_int4_planes(t: GGMLTensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """[(q uint8 [N, K], scale fp32 [N, K/32], zero fp32 [N, K/32])] such that the sum over planes of
    (q - 8) * scale + zero, group by group, is exactly the GGML dequantization (before bf16 rounding)."""
    type_ = GGMLType(t.ggml_type)
    n, k = t.shape
    if type_ in (GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q4_K):
        q, d, m = ggml_q4(t)
        return [(q, d, m + 8 * d)]
    if type_ == GGMLType.Q8_0:  # q + 128 = 16*hi + lo: w = d*q = (hi - 8) * 16d + (lo - 8) * d + 8d
        b = _blocks(t)
        d = _f16(b, 0)
        u = (b[:, 2:].view(torch.int8).to(torch.int16) + 128).to(torch.uint8)
        hi, lo = (u >> 4).reshape(n, k), (u & 0x0F).reshape(n, k)
        return [(hi, (16 * d).view(n, -1), torch.zeros_like(d).view(n, -1)), (lo, d.view(n, -1), (8 * d).view(n, -1))]
    raise ValueError(f"{t.name}: {type_.name} has no exact int4 form")


def pack_int4(planes: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], group_size: int = 32) -> Int4Linear:
    """Int4Linear from int4 planes [(q uint8 [N, K] 0..15, scale [N, K/g], zero [N, K/g])]."""
    n, k = planes[0][0].shape
    return _pack_rows(n, k, len(planes), group_size, lambda a, b: [tuple(x[a:b] for x in p) for p in planes])


def _pack_rows(n: int, k: int, split: int, group_size: int, rows) -> Int4Linear:
    """Pack `rows(a, b)` -> planes of rows a..b-1, _PACK_ROWS at a time, so temporaries stay small.
    The op wants a multiple of 16 rows: padding rows are zero weights, cut from the output."""
    n_pad = -(-n // 16) * 16
    packed = torch.empty(n_pad, split * k // 2, dtype=torch.uint8)
    scales_and_zeros = torch.zeros(split * k // group_size, n_pad, 2, dtype=COMPUTE_DTYPE)
    for a in range(0, n_pad, _PACK_ROWS):  # PyTorch packs blocks of 32/64 rows independently: chunks concatenate
        b = min(n_pad, a + _PACK_ROWS)
        planes = rows(a, min(b, n))
        q = torch.cat([p[0] for p in planes], dim=1).to(torch.int32)
        if q.shape[0] < b - a:
            q = torch.cat([q, q.new_full((b - a - q.shape[0], q.shape[1]), 8)])
        packed[a:b] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)
        m = min(b, n)
        scales_and_zeros[:, a:m, 0] = torch.cat([p[1] for p in planes], dim=1).T
        scales_and_zeros[:, a:m, 1] = torch.cat([p[2] for p in planes], dim=1).T
    return Int4Linear(k, n, group_size, packed, scales_and_zeros, split=split)


def _ggml_rows(t: GGMLTensor, a: int, b: int) -> GGMLTensor:
    data = t.data.reshape(t.shape[0], -1)[a:b].reshape(-1)
    return GGMLTensor(t.ggml_type, (b - a, *t.shape[1:]), data, t.name)


def dequantize_bf16(tensors: list) -> torch.Tensor:
    """GGML (or float) weights stacked along the output dim as one bf16 matrix, dequantized a few rows at a
    time so no full fp32 copy ever exists."""
    n, k = sum(t.shape[0] for t in tensors), tensors[0].shape[1]
    out = torch.empty(n, k, dtype=COMPUTE_DTYPE)
    row = 0
    for t in tensors:
        for a in range(0, t.shape[0], _PACK_ROWS):
            b = min(t.shape[0], a + _PACK_ROWS)
            part = _ggml_rows(t, a, b).dequantize() if isinstance(t, GGMLTensor) else t[a:b]
            out[row + a : row + b] = part
        row += t.shape[0]
    return out


def int4_from_ggml(tensors: list[GGMLTensor]) -> Int4Linear:
    """One Int4Linear for one or more GGML weights of the same type stacked along the output dim
    (fused q/k/v or gate/up)."""
    starts = np.cumsum([0] + [t.shape[0] for t in tensors])
    k, split = tensors[0].shape[1], 2 if tensors[0].ggml_type == GGMLType.Q8_0 else 1

    def rows(a: int, b: int):
        parts = []
        for t, s, e in zip(tensors, starts[:-1], starts[1:]):
            lo, hi = max(a, s), min(b, e)
            if lo < hi:
                parts.append(ggml_int4_planes(_ggml_rows(t, lo - s, hi - s)))
        return [tuple(torch.cat([p[i][j] for p in parts]) for j in range(3)) for i in range(split)]

    return _pack_rows(int(starts[-1]), k, split, 32, rows)


# ---- GGML blocks and herd weights -> herd's q4 / q8 block layouts ----------------------------------------

# Exact in Q8Linear: 8-bit, or 5/6-bit values held as int8 (with offsets and a scale per 16 where needed)
Q8_TYPES = frozenset({GGMLType.Q8_0, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q5_K, GGMLType.Q6_K})


def ggml_q8(t: GGMLTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(q int8 [N, K], d fp32, m fp32 [N, K/32] or None) with w = d*q (+ m) exactly: Q8_0 and Q5_0 (q - 16)
    with d [N, K/32] and no m; Q5_1 (w = d*q + m), Q5_K (w = d*sc*q - dmin*min per 32, q 0..31) and Q6_K
    (w = d*sc*q per 16, q -32..31) with d [N, K/16], one per 16 inputs."""
    type_ = GGMLType(t.ggml_type)
    n, k = t.shape
    b = _blocks(t)
    if type_ == GGMLType.Q8_0:
        return b[:, 2:].contiguous().view(torch.int8).reshape(n, k), _f16(b, 0).view(n, -1), None
    if type_ == GGMLType.Q5_0:  # w = d*(q - 16)
        return (_q5_values(b, 2).view(torch.int8) - 16).reshape(n, k), _f16(b, 0).view(n, -1), None
    if type_ == GGMLType.Q5_1:  # w = d*q + m
        d = _f16(b, 0).repeat_interleave(2, dim=1)
        return _q5_values(b, 4).view(torch.int8).reshape(n, k), d.view(n, -1), _f16(b, 2).view(n, -1)
    if type_ == GGMLType.Q5_K:  # 8 sub-blocks of 32 per block of 256
        sc, mn = _k_scales(b[:, 4:16])  # [nb, 8, 1]
        high = (b[:, 16:48].unsqueeze(1) >> _BIT) & 1  # sub-block j takes bit j of qh[l] as its 5th bit
        q = (_k_low4(b[:, 48:176]) | (high << 4)).view(torch.int8).reshape(n, k)
        d = (_f16(b, 0).unsqueeze(-1) * sc).repeat_interleave(2, dim=1)  # the same scale for both halves
        return q, d.view(n, -1), (-(_f16(b, 2).unsqueeze(-1) * mn)).view(n, -1)
    if type_ == GGMLType.Q6_K:  # 16 sub-blocks of 16, no offset
        q, scales = _q6_k_values(b)
        d = _f16(b, 208) * scales.float()  # [nb, 16]
        return q.reshape(n, k), d.view(n, -1), torch.zeros(n, k // 32)
    raise ValueError(f"{t.name}: {type_.name} has no exact 8-bit block form")


def q4_from_ggml(tensors: list[GGMLTensor]) -> Q4Linear:
    """One Q4Linear for GGML weights of one Q4 type stacked along the output dim (fused q/k/v, gate/up)."""
    parts = [ggml_q4(_ggml_rows(t, a, min(t.shape[0], a + _PACK_ROWS)))
             for t in tensors for a in range(0, t.shape[0], _PACK_ROWS)]
    return Q4Linear(*(torch.cat([p[i] for p in parts]) for i in range(3)))


def ggml_q8x(t: GGMLTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q int8 [N, K], d [N, K/16], m [N, K/32]) with w = d*q + m exactly, for any type in INT4_TYPES or
    Q8_TYPES: the one form that holds them all, so weights of different types can share one module."""
    if GGMLType(t.ggml_type) in INT4_TYPES:
        q, d, m = ggml_q4(t)
        return q.view(torch.int8), d.repeat_interleave(2, dim=1), m
    q, d, m = ggml_q8(t)
    return (q, d, m) if m is not None else (q, d.repeat_interleave(2, dim=1), torch.zeros_like(d))


def q8_from_ggml(tensors: list[GGMLTensor]) -> Q8Linear:
    """One Q8Linear for GGML weights stacked along the output dim: of one type in Q8_TYPES, or of a mix of
    types in INT4_TYPES and Q8_TYPES (a Q4_K_M file's Q4_K q and k with its Q6_K v), then all in the form
    with offsets and a scale per 16 (ggml_q8x)."""
    mixed = len({t.ggml_type for t in tensors}) > 1 or tensors[0].ggml_type not in Q8_TYPES
    convert = ggml_q8x if mixed else ggml_q8
    parts = [convert(_ggml_rows(t, a, min(t.shape[0], a + _PACK_ROWS)))
             for t in tensors for a in range(0, t.shape[0], _PACK_ROWS)]
    m = None if parts[0][2] is None else torch.cat([p[2] for p in parts])
    return Q8Linear(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), m)


def q4_from_int4(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> Q4Linear:
    """herd int4 (q uint8 [N, K] in 0..15, w = (q - 8)*scale + zero per group) as a Q4Linear: d = scale,
    m = zero - 8*scale, repeated over the group's blocks of 32."""
    if group_size % 32:
        raise ValueError(f"group size {group_size} is not a multiple of 32")
    scale = scales.float().repeat_interleave(group_size // 32, dim=1)
    zero = zeros.float().repeat_interleave(group_size // 32, dim=1)
    return Q4Linear(q, scale, zero - 8 * scale)


def q8_from_int8(q: torch.Tensor, scales: torch.Tensor) -> Q8Linear:
    """herd int8 per channel as a Q8Linear: the channel's scale for each of its blocks."""
    return Q8Linear(q.contiguous(), scales.float()[:, None].expand(-1, q.shape[1] // 32).contiguous())


# ---- float weights -> int4 / int8 (herd quantize) -------------------------------------------------------


def quantize_int4(w: torch.Tensor, group_size: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric round-to-nearest, per group of `group_size` along the input dim:
    returns q uint8 [N, K] in 0..15, scale and zero bf16 [N, K/g] with w ≈ (q - 8) * scale + zero."""
    n, k = w.shape
    g = w.float().reshape(n, k // group_size, group_size)
    lo, hi = g.amin(-1, keepdim=True).clamp(max=0), g.amax(-1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / 15).clamp(min=1e-8).to(COMPUTE_DTYPE).float()
    zero = (lo + 8 * scale).to(COMPUTE_DTYPE).float()  # the kernel's zero, rounded as it will be used
    q = torch.round((g - zero) / scale + 8).clamp(0, 15).to(torch.uint8)
    return q.reshape(n, k), scale.squeeze(-1).to(COMPUTE_DTYPE), zero.squeeze(-1).to(COMPUTE_DTYPE)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: q int8 [N, K], scale bf16 [N] with w ≈ q * scale."""
    scale = (w.float().abs().amax(dim=1) / 127).clamp(min=1e-8).to(COMPUTE_DTYPE)
    q = torch.round(w.float() / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] values 0..15 -> [N, K/2]: element 2i in the low nibble of byte i, 2i+1 in the high."""
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


__all__ = [
    "COMPUTE_DTYPE", "INT4_TYPES", "Q8_TYPES", "BiasedLinear", "FloatLinear", "PackedLinear", "Q4Linear", "Q8Linear", "Int4Linear", "Int8Linear", "BF16Linear",
    "QuantEmbedding", "RefinedLogits", "ggml_q4", "ggml_q8", "ggml_q8x", "q4_from_ggml", "q8_from_ggml", "q4_from_int4",
    "q8_from_int8", "ggml_int4_planes", "pack_int4", "dequantize_bf16",
    "int4_from_ggml", "quantize_int4", "quantize_int8", "pack_nibbles", "unpack_nibbles", "QK_K",
]
