"""A SHA-256 that names exact weights, whatever file layout carried them.

Tensors are hashed in sorted canonical-name order (Meta names, interleaved q/k), each as
name, storage type, shape and raw bytes: sharding, file order and format do not change it;
any changed weight, dtype or quantization does. Eval records bind scores to this value.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from herd.formats.checkpoint import TensorLike
from herd.quant import GGMLTensor, Int4Weight, Int8Weight

VERSION = b"herd-fingerprint-v1\0"


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    t = tensor.detach().contiguous().cpu()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.view(torch.int16)
    return memoryview(t.numpy()).cast("B")


def _entry(name: str, t: TensorLike) -> tuple[bytes, memoryview]:
    """The header (name, storage type, shape, length) and raw bytes that stand for one tensor."""
    if hasattr(t, "materialize"):  # a Meta tensor left in its model-parallel shards (herd.formats.slices)
        t = t.materialize()
    if isinstance(t, GGMLTensor):
        kind, shape, data = f"ggml:{t.type_name}", t.shape, memoryview(np.ascontiguousarray(t.data)).cast("B")
    elif isinstance(t, (Int4Weight, Int8Weight)):
        kind, parts = t.parts()
        shape, data = t.shape, memoryview(b"".join(bytes(_tensor_bytes(p)) for p in parts))
    else:
        kind, shape, data = str(t.dtype).removeprefix("torch."), tuple(t.shape), _tensor_bytes(t)
    return f"{name}\0{kind}\0{','.join(map(str, shape))}\0{len(data)}\0".encode(), data


def fingerprint(tensors: dict[str, TensorLike]) -> str:
    h = hashlib.sha256(VERSION)
    for name in sorted(tensors):
        header, data = _entry(name, tensors[name])
        h.update(header)
        h.update(data)
    return h.hexdigest()


def tensor_digests(tensors: dict[str, TensorLike]) -> dict[str, str]:
    """SHA-256 of each tensor's fingerprint entry: says which tensor differs when fingerprints do."""
    out = {}
    for name in sorted(tensors):
        header, data = _entry(name, tensors[name])
        h = hashlib.sha256(header)
        h.update(data)
        out[name] = h.hexdigest()
    return out
