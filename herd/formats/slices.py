"""Reading a slice of a stored tensor without reading the rest: what each rank of a tensor-parallel job
loads (herd.transforms.tensor_parallel).

Stored tensors are memory-mapped views (safetensors, GGUF float data, Meta `.pth` through
torch.load(mmap=True)), GGML blocks (herd.quant.GGMLTensor), or what a format reader leaves unarranged when
asked to be lazy: for Meta checkpoints saved as several model-parallel shards, a ShardedTensor (the shards'
own mapped tensors and the dim they join on, never concatenated); for HF q/k, InterleavedRows (permuted
into Meta's row order head by head as they are read). `read_slice` gives a tensor's rows or columns start..stop:
- rows of a row-major view are a view: nothing is read until the model touches them, and then only them;
- columns are copied a band of rows at a time, and the file pages the band touched are handed back to the
  kernel at once (madvise MADV_DONTNEED on the file-backed mapping): the kernel maps up to 16 neighbouring
  pages per fault, so without that a rank reading half of each row would hold the whole tensor's pages;
- GGML blocks run along rows, so rows are whole blocks; columns are whole blocks when the slice starts and
  ends on a block boundary, else whole rows are dequantized a band at a time and cut.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
from dataclasses import dataclass

import numpy as np
import torch

from herd.errors import ShapeMismatch
from herd.quant import GGMLTensor

BAND_BYTES = 8 << 20  # the source bytes one band of a column copy touches


@dataclass
class ShardedTensor:
    """A Meta model-parallel tensor left in its shards: `parts` joined along `dim` is the whole."""

    parts: list[torch.Tensor]
    dim: int

    @property
    def shape(self) -> torch.Size:
        shape = list(self.parts[0].shape)
        shape[self.dim] = sum(p.shape[self.dim] for p in self.parts)
        return torch.Size(shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.parts[0].dtype

    def materialize(self) -> torch.Tensor:
        return torch.cat(self.parts, dim=self.dim)


@dataclass
class InterleavedRows:
    """An HF q or k weight left as stored (rotate_half row order): Meta's interleaved order is made when it is
    read, head by head, so a rank reading its heads permutes only those (herd.formats.hf)."""

    raw: torch.Tensor
    n_heads: int

    @property
    def shape(self) -> torch.Size:
        return self.raw.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.raw.dtype

    def materialize(self) -> torch.Tensor:
        from herd.formats.hf import permute_for_interleaved

        return permute_for_interleaved(self.raw, self.n_heads)


def read_slice(t, dim: int, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
    """t's indices start..stop along `dim` (0 or 1 of a matrix, 0 of a stack) as a tensor of `dtype`."""
    if isinstance(t, ShardedTensor):
        return _sharded_slice(t, dim, start, stop, dtype)
    if isinstance(t, GGMLTensor):
        return _ggml_slice(t, dim, start, stop, dtype)
    if isinstance(t, InterleavedRows):
        from herd.formats.hf import permute_for_interleaved

        head = t.shape[0] // t.n_heads
        if dim == 0 and start % head == 0 and stop % head == 0:
            return permute_for_interleaved(t.raw[start:stop], (stop - start) // head).to(dtype)
        t = t.materialize()
    if not isinstance(t, torch.Tensor):  # herd quantize's int4/int8 weights: whole, then cut
        t = t.dequantize(dtype)
    if not 0 <= start <= stop <= t.shape[dim]:
        raise ShapeMismatch(f"slice {start}..{stop} of dim {dim} of a tensor of shape {tuple(t.shape)}")
    piece = t.narrow(dim, start, stop - start)
    if piece.is_contiguous():
        return piece if piece.dtype == dtype else piece.to(dtype)
    return _copy_by_bands(piece, dtype)


def _sharded_slice(t: ShardedTensor, dim: int, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
    if dim != t.dim:  # every shard holds a piece of the slice: cut each, join along the shards' dim
        return torch.cat([read_slice(p, dim, start, stop, dtype) for p in t.parts], dim=t.dim)
    pieces, offset = [], 0
    for p in t.parts:  # the shards the slice overlaps; one shard when the rank layout is the checkpoint's
        n = p.shape[dim]
        lo, hi = max(start, offset), min(stop, offset + n)
        if lo < hi:
            pieces.append(read_slice(p, dim, lo - offset, hi - offset, dtype))
        offset += n
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)


def _ggml_slice(t: GGMLTensor, dim: int, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
    from herd.quant.ggml import BLOCK_SIZES, GGMLType

    if dim == 0:
        return t.select_rows(np.arange(start, stop)).dequantize(dtype)
    block, nbytes = BLOCK_SIZES[GGMLType(t.ggml_type)]
    rows, cols = t.shape[0], t.shape[-1]
    if len(t.shape) == 2 and start % block == 0 and (stop % block == 0 or stop == cols):
        row_bytes = t.data.reshape(rows, -1)
        begin, end = start // block * nbytes, -(-stop // block) * nbytes
        picked = np.ascontiguousarray(row_bytes[:, begin:end]).reshape(-1)
        return GGMLTensor(t.ggml_type, (rows, stop - start), picked, t.name).dequantize(dtype)
    band = max(1, BAND_BYTES // max(1, t.data.size // rows))
    shape = list(t.shape)
    shape[dim] = stop - start
    out = torch.empty(shape, dtype=dtype)
    for r in range(0, rows, band):
        n = min(band, rows - r)
        out[r:r + n] = t.select_rows(np.arange(r, r + n)).dequantize(dtype).narrow(dim, start, stop - start)
    return out


def _copy_by_bands(piece: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(piece.shape, dtype=dtype)
    rows = piece.shape[0]
    row_bytes = max(1, piece.stride(0) * piece.element_size())
    band = max(1, BAND_BYTES // row_bytes)
    for r in range(0, rows, band):
        n = min(band, rows - r)
        src = piece[r:r + n]
        out[r:r + n] = src
        release_file_pages(src)
    return out


_LIBC = None


def release_file_pages(t: torch.Tensor) -> None:
    """Drop this process's mapping of the file pages under t's bytes (they stay in the page cache and come
    back on the next access), where t is a view of a file-backed mapping; anything else is left alone."""
    global _LIBC
    if not sys.platform.startswith("linux") or t.numel() == 0:
        return
    begin = t.data_ptr()
    end = begin + (1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))) * t.element_size()
    mapping = _file_mapping(begin, end)
    if mapping is None:
        return
    page = mmap.PAGESIZE
    lo, hi = -(-begin // page) * page, end // page * page  # whole pages inside t only
    lo, hi = max(lo, mapping[0]), min(hi, mapping[1])
    if hi <= lo:
        return
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
        _LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    _LIBC.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), 4)  # MADV_DONTNEED


def _file_mapping(begin: int, end: int) -> tuple[int, int] | None:
    """(start, end) of the read-only or private file mapping holding begin..end, from /proc/self/maps."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split()
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                if lo <= begin < hi:
                    perms, path = fields[1], fields[5] if len(fields) > 5 else ""
                    # a file, mapped privately: its unwritten pages can always be read back from the file
                    if path.startswith("/") and perms[3] == "p" and end <= hi and not path.startswith("/dev/"):
                        return lo, hi
                    return None
    except OSError:
        return None
    return None


__all__ = ["ShardedTensor", "InterleavedRows", "read_slice", "release_file_pages"]
