"""The training forward pass: herd's Transformer run layer by layer over packed rows.

Packed rows hold several examples, each at positions 0.. with its own segment id; attention is causal
within a segment and blocked across segments (a block-diagonal causal mask), which the plain model's
ForwardContext cannot express from positions alone, so PackedContext supplies the mask. Running the
layers here (the same steps as Transformer.forward) also lets each block be checkpointed (activations
recomputed in the backward) and the output projection run only where there is a target.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from herd.finetune.data import IGNORE, TensorBatch
from herd.model.cache import Batch
from herd.model.model import ForwardContext
from herd.model.rope import rope_angles


class PackedContext(ForwardContext):
    def __init__(self, positions: torch.Tensor, segments: torch.Tensor, rot: torch.Tensor):
        super().__init__(Batch(positions), rot)
        self.segments = segments
        # Right padding after a single example per row: plain causal attention is exact for every real token.
        self.one_segment_per_row = bool((segments <= 0).all())

    def mask(self, chunk_size: int | None, n_keys: int) -> torch.Tensor | None:
        if self.one_segment_per_row and chunk_size is None:
            return None
        key = (chunk_size, n_keys)
        if key not in self._masks:
            steps = self.segments.shape[1]
            index = torch.arange(steps, device=self.segments.device)
            allowed = (index[None, :] <= index[:, None])[None, None]  # [1, 1, T, T]
            allowed = allowed & (self.segments[:, None, :, None] == self.segments[:, None, None, :])
            if chunk_size is not None:
                q, k = self.positions[:, None, :, None], self.positions[:, None, None, :]
                allowed = allowed & (k // chunk_size == q // chunk_size)
            self._masks[key] = allowed
        return self._masks[key]


def final_hidden(model, batch: TensorBatch, activation_checkpointing: bool = False) -> torch.Tensor:
    """The normed hidden states [B, T, dim] of the rows of `batch`."""
    ctx = PackedContext(batch.positions, batch.segments, rope_angles(model.inv_freq, batch.positions))
    h = model.tok_embeddings(batch.tokens)
    for layer_id, layer in enumerate(model.layers):
        if activation_checkpointing and torch.is_grad_enabled():
            h = checkpoint(layer, h, ctx, layer_id, use_reentrant=False)
        else:
            h = layer(h, ctx, layer_id)
    return model.norm(h)


def logits(model, batch: TensorBatch) -> torch.Tensor:
    """Float32 logits [B, T, vocab] of packed rows (for tests and evaluation)."""
    return model.output(final_hidden(model, batch)).float()


def loss_sum(model, batch: TensorBatch, activation_checkpointing: bool = False) -> torch.Tensor:
    """The summed cross-entropy over every target of the batch (logits computed at targets only)."""
    h = final_hidden(model, batch, activation_checkpointing)
    where = batch.targets != IGNORE
    out = model.output(h[where]).float()
    return F.cross_entropy(out, batch.targets[where], reduction="sum")


def sequence_logprobs(model, batch: TensorBatch, activation_checkpointing: bool = False) -> torch.Tensor:
    """Per row, the summed log-probability of its targets [B] (DPO scores a whole completion)."""
    h = final_hidden(model, batch, activation_checkpointing)
    where = batch.targets != IGNORE
    out = model.output(h[where]).float().log_softmax(-1)
    picked = out.gather(-1, batch.targets[where][:, None])[:, 0]
    rows = torch.nonzero(where, as_tuple=True)[0]
    return torch.zeros(batch.tokens.shape[0], device=picked.device).index_add(0, rows, picked)


__all__ = ["PackedContext", "final_hidden", "logits", "loss_sum", "sequence_logprobs"]
