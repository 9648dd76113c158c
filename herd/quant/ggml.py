"""ggml tensor types: type numbers, block sizes, and reference dequantizers.

Layouts follow ggml's C structs (ggml-common.h / ggml-quants.c, mirrored by gguf-py `quants.py`);
see docs §7.4. A quantized row is a run of blocks along the last (PyTorch) dim, each block
`type_size` bytes encoding `block_size` weights, so blocks never cross rows.
Dequantizers are vectorised torch over all blocks at once, in chunks to bound temporaries.
"""

from __future__ import annotations

import math
import warnings
from enum import IntEnum

import numpy as np
import torch

from herd.errors import FormatError


class GGMLType(IntEnum):
    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35
    MXFP4 = 39
    NVFP4 = 40
    Q1_0 = 41


QK_K = 256  # k-quant super-block

# (weights per block, bytes per block), as GGML_QUANT_SIZES in gguf-py constants.py
BLOCK_SIZES: dict[GGMLType, tuple[int, int]] = {
    GGMLType.F32: (1, 4),
    GGMLType.F16: (1, 2),
    GGMLType.Q4_0: (32, 18),
    GGMLType.Q4_1: (32, 20),
    GGMLType.Q5_0: (32, 22),
    GGMLType.Q5_1: (32, 24),
    GGMLType.Q8_0: (32, 34),
    GGMLType.Q8_1: (32, 40),
    GGMLType.Q2_K: (QK_K, 84),
    GGMLType.Q3_K: (QK_K, 110),
    GGMLType.Q4_K: (QK_K, 144),
    GGMLType.Q5_K: (QK_K, 176),
    GGMLType.Q6_K: (QK_K, 210),
    GGMLType.Q8_K: (QK_K, 292),
    GGMLType.IQ2_XXS: (QK_K, 66),
    GGMLType.IQ2_XS: (QK_K, 74),
    GGMLType.IQ3_XXS: (QK_K, 98),
    GGMLType.IQ1_S: (QK_K, 50),
    GGMLType.IQ4_NL: (32, 18),
    GGMLType.IQ3_S: (QK_K, 110),
    GGMLType.IQ2_S: (QK_K, 82),
    GGMLType.IQ4_XS: (QK_K, 136),
    GGMLType.I8: (1, 1),
    GGMLType.I16: (1, 2),
    GGMLType.I32: (1, 4),
    GGMLType.I64: (1, 8),
    GGMLType.F64: (1, 8),
    GGMLType.IQ1_M: (QK_K, 56),
    GGMLType.BF16: (1, 2),
    GGMLType.TQ1_0: (QK_K, 54),
    GGMLType.TQ2_0: (QK_K, 66),
    GGMLType.MXFP4: (32, 17),
    GGMLType.NVFP4: (64, 36),
    GGMLType.Q1_0: (128, 18),
}


def ggml_type(value: int, tensor: str = "tensor") -> GGMLType:
    try:
        return GGMLType(value)
    except ValueError:
        raise FormatError(f"{tensor}: unknown ggml type number {value}") from None


def row_nbytes(type_: int, n: int, tensor: str = "tensor") -> int:
    """Bytes of one row of `n` weights; `n` must be whole blocks."""
    block, size = BLOCK_SIZES[ggml_type(type_, tensor)]
    if n % block:
        raise FormatError(f"{tensor}: row length {n} is not a multiple of the {GGMLType(type_).name} block ({block})")
    return n // block * size


def tensor_nbytes(type_: int, shape: tuple[int, ...], tensor: str = "tensor") -> int:
    """Bytes a tensor of this PyTorch-order shape occupies (blocks run along shape[-1])."""
    if not shape:
        return row_nbytes(type_, 1, tensor)
    return math.prod(shape[:-1]) * row_nbytes(type_, shape[-1], tensor)


# ---- dequantizers: uint8 blocks [nb, type_size] -> float32 [nb, block_size] ----------------------


def _f16(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """The fp16 scale stored at byte `at` of every block, as float32 [nb, 1]."""
    return blocks[:, at : at + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[..., n] packed bytes -> [..., 2n]: the n low nibbles, then the n high nibbles (ggml order)."""
    return torch.cat((qs & 0x0F, qs >> 4), dim=-1)


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    return b[:, 2:].view(torch.int8).float() * _f16(b, 0)


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    return _f16(b, 0) * (_nibbles(b[:, 2:]).float() - 8)


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    return _f16(b, 0) * _nibbles(b[:, 4:]).float() + _f16(b, 2)


_BIT32 = torch.arange(32, dtype=torch.int32)


def _q5_values(b: torch.Tensor, at: int) -> torch.Tensor:
    """Q5_0/Q5_1 blocks -> their 32 values (uint8 0..31): qh (a little-endian uint32 at `at`) holds bit 4 of
    element j in bit j; the 16 bytes after it the low 4 bits, elements j and j+16 in byte j."""
    qh = b[:, at : at + 4].contiguous().view(torch.int32)  # [nb, 1]
    return _nibbles(b[:, at + 4 : at + 20]) | (((qh >> _BIT32) & 1).to(torch.uint8) << 4)


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    return _f16(b, 0) * (_q5_values(b, 2).float() - 16)


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    return _f16(b, 0) * _q5_values(b, 4).float() + _f16(b, 2)


def _k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack the 12-byte scales of Q4_K/Q5_K into 8 six-bit scales and 8 six-bit mins per block.

    Bytes 0-3: scales 0-3 (bits 0-5) + high bits of scales 4-7; bytes 4-7: the same for mins;
    bytes 8-11: low 4 bits of scales 4-7 (low nibble) and of mins 4-7 (high nibble).
    """
    a, m, lo = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat((a & 63, (lo & 0x0F) | ((a >> 6) << 4)), dim=1)
    mn = torch.cat((m & 63, (lo >> 4) | ((m >> 6) << 4)), dim=1)
    return sc.float().unsqueeze(-1), mn.float().unsqueeze(-1)  # [nb, 8, 1]


def _k_low4(qs: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K 128 packed bytes -> [nb, 8, 32]: 64-weight chunk c holds sub-blocks 2c (low) and 2c+1 (high)."""
    qs = qs.reshape(-1, 4, 1, 32)
    return torch.cat((qs & 0x0F, qs >> 4), dim=2).reshape(-1, 8, 32)


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    sc, mn = _k_scales(b[:, 4:16])
    q = _k_low4(b[:, 16:144]).float()
    return (_f16(b, 0).unsqueeze(-1) * sc * q - _f16(b, 2).unsqueeze(-1) * mn).reshape(-1, QK_K)


_BIT = torch.arange(8, dtype=torch.uint8).view(1, 8, 1)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    sc, mn = _k_scales(b[:, 4:16])
    high = (b[:, 16:48].unsqueeze(1) >> _BIT) & 1  # sub-block j takes bit j of qh[l] as its 5th bit
    q = (_k_low4(b[:, 48:176]) | (high << 4)).float()
    return (_f16(b, 0).unsqueeze(-1) * sc * q - _f16(b, 2).unsqueeze(-1) * mn).reshape(-1, QK_K)


_Q6_SHIFT = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)


def _q6_k_values(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q6_K blocks -> (q int8 [nb, 256] in -32..31, scales int8 [nb, 16], one per 16 weights)."""
    # Each 128-weight half: y[l], y[l+32], y[l+64], y[l+96] take the low nibble of ql[l], of ql[l+32],
    # the high nibble of ql[l], of ql[l+32], and 2 bits of qh[l] at shifts 0, 2, 4, 6 respectively.
    ql = b[:, :128].reshape(-1, 2, 1, 64)
    low = torch.cat((ql & 0x0F, ql >> 4), dim=2).reshape(-1, 2, 4, 32)
    high = (b[:, 128:192].reshape(-1, 2, 1, 32) >> _Q6_SHIFT) & 3
    q = ((low | (high << 4)).view(torch.int8) - 32).reshape(-1, QK_K)
    return q, b[:, 192:208].view(torch.int8)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    q, scales = _q6_k_values(b)
    return (_f16(b, 208).unsqueeze(-1) * scales.float().unsqueeze(-1) * q.float().reshape(-1, 16, 16)).reshape(-1, QK_K)


_BLOCK_DEQUANT = {
    GGMLType.Q8_0: _q8_0,
    GGMLType.Q4_0: _q4_0,
    GGMLType.Q4_1: _q4_1,
    GGMLType.Q5_0: _q5_0,
    GGMLType.Q5_1: _q5_1,
    GGMLType.Q4_K: _q4_k,
    GGMLType.Q5_K: _q5_k,
    GGMLType.Q6_K: _q6_k,
}
_FLOAT_VIEW = {GGMLType.F32: torch.float32, GGMLType.F16: torch.float16, GGMLType.BF16: torch.bfloat16}
_CHUNK = 1 << 22  # weights per chunk: keeps the float temporaries of one chunk in a few tens of MB

SUPPORTED = frozenset(_BLOCK_DEQUANT) | frozenset(_FLOAT_VIEW)


def _as_torch(data: np.ndarray) -> torch.Tensor:
    data = np.ascontiguousarray(data).reshape(-1)
    with warnings.catch_warnings():  # read-only maps are fine: nothing here writes to the bytes
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(data)


def dequantize(data: np.ndarray | torch.Tensor, ggml_type_: int, shape: tuple[int, ...], name: str = "tensor") -> torch.Tensor:
    """Raw GGUF bytes of one tensor (numpy or torch uint8) -> float32 tensor of `shape` (PyTorch order).

    F32 comes back as a view of `data` (no copy); every other type is a fresh tensor.
    """
    type_ = ggml_type(ggml_type_, name)
    shape = tuple(int(s) for s in shape)
    expected = tensor_nbytes(type_, shape, name)
    if isinstance(data, torch.Tensor):  # bytes already on the torch side (rows picked from a map)
        ok, size, raw = data.dtype == torch.uint8, data.numel(), data.reshape(-1)
    else:
        ok, size, raw = data.dtype == np.uint8, data.size, None
    if not ok or size != expected:
        raise FormatError(f"{name}: {type_.name} {list(shape)} needs {expected} bytes, got {size} ({data.dtype})")
    raw = _as_torch(data) if raw is None else raw
    if type_ in _FLOAT_VIEW:
        # BF16 has no numpy dtype, so the reinterpretation happens on the torch side for all three.
        return raw.view(_FLOAT_VIEW[type_]).float().reshape(shape)
    fn = _BLOCK_DEQUANT.get(type_)
    if fn is None:
        supported = ", ".join(t.name for t in sorted(SUPPORTED))
        raise FormatError(f"{name}: cannot dequantize ggml type {type_.name} (herd supports {supported})")
    block, size = BLOCK_SIZES[type_]
    blocks = raw.view(-1, size)
    out = torch.empty(blocks.shape[0], block, dtype=torch.float32)
    step = max(1, _CHUNK // block)
    for i in range(0, blocks.shape[0], step):
        out[i : i + step] = fn(blocks[i : i + step])
    return out.reshape(shape)


__all__ = ["GGMLType", "BLOCK_SIZES", "QK_K", "SUPPORTED", "ggml_type", "row_nbytes", "tensor_nbytes", "dequantize"]
