"""Tensors that can stay in their stored (possibly block-quantized) form until the loader decides.

GGMLTensor wraps the raw bytes of one GGUF tensor; Int4Weight and Int8Weight are what `herd quantize`
writes. The loader either dequantizes them (the exact float path) or repacks them for the weight-only
kernels of herd.quant.linear. Block layouts and dequantizers live in herd.quant.ggml.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class GGMLTensor:
    ggml_type: int  # herd.quant.ggml.GGMLType value (F32=0, F16=1, Q4_0=2, ...)
    shape: tuple[int, ...]  # PyTorch order: the reverse of GGUF's ne[]; blocks run along the last dim
    data: np.ndarray  # uint8 view of the stored bytes (usually a slice of a memory map)
    name: str = ""  # the tensor's name in its file, for error messages

    @property
    def type_name(self) -> str:
        from herd.quant.ggml import GGMLType

        return GGMLType(self.ggml_type).name

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        from herd.quant.ggml import dequantize

        return dequantize(self.data, self.ggml_type, self.shape, self.name or "tensor").to(dtype)

    def select_rows(self, index: torch.Tensor | np.ndarray) -> "GGMLTensor":
        """Pick or reorder slices along the first dim (rows of a matrix, experts of a stack) without
        dequantizing: blocks run along the last dim, so whole first-dim slices are whole blocks."""
        from herd.errors import FormatError
        from herd.quant.ggml import BLOCK_SIZES, GGMLType, tensor_nbytes

        name = self.name or "tensor"
        if len(self.shape) < 2 and BLOCK_SIZES[GGMLType(self.ggml_type)][0] != 1:
            raise ValueError(f"{name}: cannot pick single elements out of {self.type_name} blocks")
        if self.data.size != tensor_nbytes(self.ggml_type, self.shape, name):
            raise FormatError(f"{name}: {self.data.size} bytes do not match {self.type_name} {list(self.shape)}")
        index = np.asarray(index.cpu() if isinstance(index, torch.Tensor) else index, dtype=np.int64).reshape(-1)
        slices = self.data.reshape(self.shape[0], -1)  # one row of bytes per first-dim slice
        picked = slices[index]  # fancy indexing copies; IndexError for out-of-range ids
        return GGMLTensor(self.ggml_type, (len(index), *self.shape[1:]), picked.reshape(-1), self.name)


@dataclass
class Int4Weight:
    """A weight quantized by `herd quantize --to q4`: group-wise int4 along the input (last) dim,
    w = (q - 8) * scale + zero, q in 0..15 (PyTorch's CPU int4 convention, so it packs without rounding)."""

    q: torch.Tensor  # uint8 [N, K/2]: element 2i in the low nibble of byte i, 2i+1 in the high nibble
    scales: torch.Tensor  # bf16 [N, K/group]
    zeros: torch.Tensor  # bf16 [N, K/group]
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.q.shape[0], self.q.shape[1] * 2)

    def values(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """q as uint8 [N, K] (or the picked rows)."""
        packed = self.q if rows is None else self.q[rows]
        return torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(packed.shape[0], -1)

    def dequantize(self, dtype: torch.dtype = torch.float32, rows: torch.Tensor | None = None) -> torch.Tensor:
        q = self.values(rows).float()
        s, z = (self.scales, self.zeros) if rows is None else (self.scales[rows], self.zeros[rows])
        g = q.view(q.shape[0], -1, self.group_size)
        return ((g - 8) * s.float()[..., None] + z.float()[..., None]).reshape(q.shape).to(dtype)

    def parts(self) -> tuple[str, list[torch.Tensor]]:
        """(kind, tensors) that identify the stored values exactly, for fingerprints."""
        return f"herd:int4g{self.group_size}", [self.q, self.scales, self.zeros]


@dataclass
class Int8Weight:
    """A weight quantized by `herd quantize --to q8`: int8 per output channel (row), w = q * scale."""

    q: torch.Tensor  # int8 [N, K]
    scales: torch.Tensor  # bf16 [N]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32, rows: torch.Tensor | None = None) -> torch.Tensor:
        q, s = (self.q, self.scales) if rows is None else (self.q[rows], self.scales[rows])
        return (q.float() * s.float()[:, None]).to(dtype)

    def parts(self) -> tuple[str, list[torch.Tensor]]:
        return "herd:int8", [self.q, self.scales]


QuantizedWeight = (GGMLTensor, Int4Weight, Int8Weight)  # what a Checkpoint may hold besides plain tensors


def release_pages(data: np.ndarray) -> None:
    """Tell the OS the memory-mapped pages under `data` are not needed now (Linux MADV_DONTNEED).

    For a file mapping that nothing wrote to, this only drops pages from this process's resident set:
    the next read faults them back in from the file. The loader calls it once a tensor has been packed,
    so a file's pages are not all resident at once. Anywhere else (or on failure) it does nothing."""
    import ctypes
    import mmap
    import sys

    base = data  # only file mappings: on anonymous memory MADV_DONTNEED would zero the values
    while isinstance(base, np.ndarray) and not isinstance(base, np.memmap):
        base = base.base
    if not sys.platform.startswith("linux") or data.size == 0 or not isinstance(base, (np.memmap, mmap.mmap)):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        page = mmap.PAGESIZE
        start = data.ctypes.data
        lo, hi = start // page * page, -(-(start + data.nbytes) // page) * page
        libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), 4)  # MADV_DONTNEED
    except (OSError, AttributeError):
        pass
