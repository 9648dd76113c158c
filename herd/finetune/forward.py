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


LOSS_CHUNK = 256  # target positions whose logits exist at once


class _LinearCrossEntropy(torch.autograd.Function):
    """sum over rows of cross_entropy(h @ weight.T, targets), a chunk of rows at a time: each chunk's logits
    are made, turned into the loss and into the gradients (softmax - one-hot) @ weight and its transpose @ h,
    and dropped, so the [targets, vocab] logits never exist whole (the same multiplications as the plain
    way, in both passes; columns from `n_valid` on are padding rows of the embedding, never a target)."""

    @staticmethod
    def forward(ctx, h, weight, targets, n_valid: int):
        need_h, need_w = h.requires_grad, weight.requires_grad
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        w = weight if weight.dtype == h.dtype else weight.to(h.dtype)  # bf16 compute: cast once, not per chunk
        for a in range(0, h.shape[0], LOSS_CHUNK):
            rows, t = h[a:a + LOSS_CHUNK], targets[a:a + LOSS_CHUNK]
            logits = (rows @ w.T).float()
            if n_valid < logits.shape[1]:
                logits[:, n_valid:] = float("-inf")
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None])[:, 0]).sum()
            if need_h or need_w:
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in the logits' memory
                probs[torch.arange(len(t), device=t.device), t] -= 1.0
                if need_h:
                    grad_h[a:a + LOSS_CHUNK] = (probs.to(w.dtype) @ w).to(h.dtype)
                if need_w:
                    grad_w += probs.T @ rows.float()
        ctx.save_for_backward(*(g for g in (grad_h, grad_w) if g is not None))
        ctx.need = (need_h, need_w)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        saved = list(ctx.saved_tensors)
        grad_h = saved.pop(0) * grad_total if ctx.need[0] else None
        grad_w = saved.pop(0) * grad_total if ctx.need[1] else None
        return grad_h, grad_w, None, None


def _plain_output(module):
    """(weight, columns that are tokens) when the output is a plain linear (maybe with padding rows masked)."""
    inner, n_valid = module, None
    if hasattr(module, "inner") and hasattr(module, "n_tokens"):  # herd.loader.PaddedVocabLogits
        inner, n_valid = module.inner, module.n_tokens
    if type(inner) is torch.nn.Linear and inner.bias is None:
        return inner.weight, n_valid if n_valid is not None else inner.weight.shape[0]
    return None


def loss_sum(model, batch: TensorBatch, activation_checkpointing: bool = False) -> torch.Tensor:
    """The summed cross-entropy over every target of the batch (logits computed at targets only)."""
    h = final_hidden(model, batch, activation_checkpointing)
    where = batch.targets != IGNORE
    plain = _plain_output(model.output)
    if plain is not None:
        weight, n_valid = plain
        if torch.is_autocast_enabled(h.device.type):
            h = h.to(torch.get_autocast_dtype(h.device.type))
        return _LinearCrossEntropy.apply(h[where], weight, batch.targets[where], n_valid)
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
