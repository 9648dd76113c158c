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


LOSS_CHUNK = 512  # target positions per pass over the vocabulary
VOCAB_CHUNK = 1024  # output columns per product: a [LOSS_CHUNK, VOCAB_CHUNK] block of logits stays in cache
WHOLE_ROWS_CHUNK = 256  # target positions whose whole rows of logits exist at once (when the weight trains)


class _LinearCrossEntropy(torch.autograd.Function):
    """sum over rows of cross_entropy(h @ weight.T, targets), computed so that the [targets, vocab] logits
    never exist whole. When only h needs a gradient (LoRA: the output projection is frozen), one pass over
    vocabulary blocks does it all, as flash attention does for attention: each block's logits give a running
    max and sum of exponentials, and softmax @ weight accumulates unnormalised, rescaled when the max moves
    and divided by the sum at the end; the logits are made once and never leave the cache. The blocks come
    from `rows_of(a, b, dtype)`, so a quantized output projection (QLoRA) dequantizes one block at a time.
    When the weight needs a gradient too, its (softmax - one-hot)^T @ h needs each row chunk's finished
    softmax, made whole. The multiplications are the plain way's, in both passes; columns from `n_valid` on
    are padding rows of the embedding, never a target."""

    @staticmethod
    def forward(ctx, h, weight, targets, n_valid: int, rows_of):
        need_h = h.requires_grad
        need_w = weight is not None and weight.requires_grad
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        if need_w:
            w = (weight if weight.dtype == h.dtype else weight.to(h.dtype))[:n_valid]  # cast once, not per chunk
            for a in range(0, h.shape[0], WHOLE_ROWS_CHUNK):
                rows, t = h[a:a + WHOLE_ROWS_CHUNK], targets[a:a + WHOLE_ROWS_CHUNK]
                logits = (rows @ w.T).float()
                lse = torch.logsumexp(logits, dim=-1)
                total += (lse - logits.gather(1, t[:, None])[:, 0]).sum()
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in the logits' memory
                probs[torch.arange(len(t), device=t.device), t] -= 1.0
                grad_h[a:a + WHOLE_ROWS_CHUNK] = (probs.to(w.dtype) @ w).to(h.dtype)
                grad_w[:n_valid] += probs.T @ rows.float()
        else:
            for a in range(0, h.shape[0], LOSS_CHUNK):
                rows, t = h[a:a + LOSS_CHUNK], targets[a:a + LOSS_CHUNK]
                lse, picked, softmax_w, target_rows = _blockwise_softmax_product(rows, t, n_valid, rows_of, need_h)
                total += (lse - picked).sum()
                if need_h:
                    grad_h[a:a + LOSS_CHUNK] = (softmax_w - target_rows).to(h.dtype)
        ctx.save_for_backward(*(g for g in (grad_h, grad_w) if g is not None))
        ctx.need = (need_h, need_w)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        saved = list(ctx.saved_tensors)
        grad_h = saved.pop(0) * grad_total if ctx.need[0] else None
        grad_w = saved.pop(0) * grad_total if ctx.need[1] else None
        return grad_h, grad_w, None, None, None


def _blockwise_softmax_product(rows, targets, n_valid: int, rows_of, with_product: bool):
    """Per row: logsumexp of its logits, its target's logit, and (when `with_product`) softmax @ w and
    w[target], one block of vocabulary columns at a time. The product accumulates exp(logits - running
    max) @ block, rescaled whenever the max moves, and is divided by the sum of exponentials at the end."""
    n = rows.shape[0]
    running_max = torch.full((n,), float("-inf"), device=rows.device)
    running_sum = torch.zeros(n, device=rows.device)
    picked = torch.zeros(n, device=rows.device)
    product = torch.zeros(n, rows.shape[1], device=rows.device) if with_product else None
    target_rows = torch.zeros(n, rows.shape[1], device=rows.device) if with_product else None
    for b in range(0, n_valid, VOCAB_CHUNK):
        block = rows_of(b, min(b + VOCAB_CHUNK, n_valid), rows.dtype)
        logits = (rows @ block.T).float()
        inside = ((targets >= b) & (targets < b + block.shape[0])).nonzero()[:, 0]
        if len(inside):
            local = targets[inside] - b
            picked[inside] = logits[inside, local]
            if with_product:
                target_rows[inside] = block[local].float()
        new_max = torch.maximum(running_max, logits.amax(-1))
        rescale = torch.exp(running_max - new_max)
        p = logits.sub_(new_max[:, None]).exp_()
        running_sum.mul_(rescale).add_(p.sum(-1))
        running_max = new_max
        if with_product:
            product.mul_(rescale[:, None])
            if block.dtype == torch.float32:
                product.addmm_(p, block)
            else:
                product.add_((p.to(block.dtype) @ block).float())
    lse = running_max + torch.log(running_sum)
    return lse, picked, product / running_sum[:, None] if with_product else None, target_rows


def _output_blocks(module):
    """(trainable weight or None, columns in the softmax, rows_of(a, b, dtype)) when the output projection
    is a plain or a block-dequantized linear; None otherwise. Every row counts, padding rows of an embedding
    larger than the tokenizer too, as in transformers' loss."""
    from herd.transforms.qlora import BlockDequantLinear

    if type(module) is torch.nn.Linear and module.bias is None:
        weight = module.weight
        return weight, weight.shape[0], lambda a, b, dtype: weight[a:b].to(dtype)
    if isinstance(module, BlockDequantLinear):
        return None, module.out_features, module.weight_rows
    return None


def loss_sum(model, batch: TensorBatch, activation_checkpointing: bool = False) -> torch.Tensor:
    """The summed cross-entropy over every target of the batch (logits computed at targets only)."""
    h = final_hidden(model, batch, activation_checkpointing)
    where = batch.targets != IGNORE
    output = _output_blocks(model.output)
    if output is not None:
        weight, n_valid, rows_of = output
        if torch.is_autocast_enabled(h.device.type):
            h = h.to(torch.get_autocast_dtype(h.device.type))
        return _LinearCrossEntropy.apply(h[where], weight, batch.targets[where], n_valid, rows_of)
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
