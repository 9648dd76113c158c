"""Checkpoint → Transformer: build on the meta device, check every tensor, assign it once.

Parameters are assigned (not copied) where dtype and device already match, so a memory-mapped
checkpoint does not need a second full copy. Quantized GGML tensors are dequantized here for now.
"""

from __future__ import annotations

from typing import Callable

import torch

from herd.errors import MissingTensor, ShapeMismatch, UnexpectedTensor
from herd.formats.checkpoint import Checkpoint
from herd.model import Transformer
from herd.model.rope import inverse_frequencies
from herd.quant import GGMLTensor


def default_dtype(checkpoint: Checkpoint, device: torch.device) -> torch.dtype:
    """The compute dtype when the caller names none: what the file stores, where the device runs it well."""
    stored = {t.dtype for t in checkpoint.tensors.values() if isinstance(t, torch.Tensor) and t.dim() > 1}
    if device.type == "cpu":
        return torch.bfloat16 if stored == {torch.bfloat16} else torch.float32
    return torch.float32 if stored == {torch.float32} else torch.bfloat16


def load_model(
    checkpoint: Checkpoint,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Transformer:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or default_dtype(checkpoint, device)
    with torch.device("meta"):
        model = Transformer(checkpoint.args)
    expected = {name: p for name, p in model.named_parameters()}  # a tied output appears once, as tok_embeddings
    tensors = checkpoint.tensors
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise MissingTensor(f"{checkpoint.path}: missing {len(missing)} tensor(s), e.g. {missing[:4]}")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise UnexpectedTensor(f"{checkpoint.path}: tensor(s) with no place in this architecture: {unexpected[:4]}")
    state = {}
    for i, (name, param) in enumerate(expected.items()):
        source = tensors[name]
        shape = tuple(source.shape)
        if shape != tuple(param.shape):
            raise ShapeMismatch(f"{checkpoint.path}: {name} has shape {shape}, the config implies {tuple(param.shape)}")
        tensor = source.dequantize(dtype) if isinstance(source, GGMLTensor) else source
        state[name] = tensor.to(device=device, dtype=dtype)
        if progress:
            progress(i + 1, len(expected))
    # Every name was checked above; strict=False only because a tied output.weight shares tok_embeddings.
    model.load_state_dict(state, strict=False, assign=True)
    if checkpoint.args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.inv_freq = inverse_frequencies(checkpoint.args).to(device)  # buffers built on "meta" hold no values
    return model.eval().requires_grad_(False)
