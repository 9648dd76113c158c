"""Tensors that can stay in their stored (possibly block-quantized) form until the loader decides.

GGMLTensor wraps the raw bytes of one GGUF tensor: the loader may dequantize it, or hand it as is
to a quantized Linear (issue 5). Block layouts and dequantizers live in herd.quant.ggml.
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
