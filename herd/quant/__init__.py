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

    @property
    def type_name(self) -> str:
        from herd.quant.ggml import GGMLType

        return GGMLType(self.ggml_type).name

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        from herd.quant.ggml import dequantize

        return dequantize(self.data, self.ggml_type, self.shape).to(dtype)

    def select_rows(self, index: torch.Tensor | np.ndarray) -> "GGMLTensor":
        """Reorder or pick rows (the first dim) without dequantizing: blocks never cross rows."""
        from herd.quant.ggml import row_nbytes

        rows = self.data.reshape(-1, row_nbytes(self.ggml_type, self.shape[-1]))
        if self.data.size != rows.shape[0] * rows.shape[1] or rows.shape[0] != int(np.prod(self.shape[:-1])):
            raise ValueError("tensor bytes do not match its shape")
        picked = rows[np.asarray(index)]
        return GGMLTensor(self.ggml_type, (len(picked),) + tuple(self.shape[1:]) if len(self.shape) == 2 else self.shape, picked.reshape(-1))
