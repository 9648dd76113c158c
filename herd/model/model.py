"""One decoder for every Llama generation: Llama 1, 2, 3, 3.1, 3.2 and Llama 4 (Scout, Maverick).

References: Meta's llama/model.py (Llama 1/2), llama-models models/llama3/model.py and
models/llama4/{model,moe,ffn}.py, HF transformers modeling_llama.py / modeling_llama4.py.
Per-layer variation (MoE or dense, RoPE or NoPE, chunked attention, QK norm) comes from
herd.config.layer_plan, so Llama 1 and Llama 4 share one TransformerBlock.
Parameter names are Meta's; q/k rows are in Meta's interleaved RoPE order (see rope.py).

This file is the maths and nothing else: fused projections, quantized weights and herd's CPU kernels are
load-time transforms that swap these modules for subclasses (herd/transforms), as gpt-fast's quantize.py
does. `Attention.project` and `Attention.attend` are the seams such subclasses override.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from herd.config import LayerSpec, ModelArgs, layer_plan
from herd.model.cache import Batch
from herd.model.rope import apply_rope, inverse_frequencies, rope_angles
from herd.model.vision import VisionEmbeddings


def rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x²) + eps), computed in fp32 and cast back."""
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).type_as(x)


class RMSNorm(nn.Module):
    """Every generation; the weight multiplies after the cast back, as Meta and HF both do."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if x.dtype == self.weight.dtype == torch.float32:  # the same maths in one kernel
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return rms_norm(x, self.eps) * self.weight


class Attention(nn.Module):
    """Grouped-query attention; Llama 4 adds QK norm (RoPE layers), NoPE layers and temperature tuning."""

    def __init__(self, args: ModelArgs, spec: LayerSpec):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.spec = spec
        self.norm_eps = args.norm_eps
        self.floor_scale, self.attn_scale = args.floor_scale, args.attn_scale
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def project(self, x, ctx: "ForwardContext"):
        """q [B, T, heads, hd], k and v [B, T, kv_heads, hd], RoPE applied. Projections may compute in a
        narrower dtype (quantized CPU linears take bf16); attention runs in x's."""
        batch, steps, _ = x.shape
        q = self.wq(x).to(x.dtype).view(batch, steps, self.n_heads, self.head_dim)
        k = self.wk(x).to(x.dtype).view(batch, steps, self.n_kv_heads, self.head_dim)
        v = self.wv(x).to(x.dtype).view(batch, steps, self.n_kv_heads, self.head_dim)
        if self.spec.rope:
            q, k = apply_rope(q, ctx.rot), apply_rope(k, ctx.rot)
        return q, k, v

    def attend(self, q, k, v, mask, causal: bool):
        """Scaled dot-product attention, q [B, H, T, hd], k/v [B, Hkv, L, hd]."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                              enable_gqa=self.n_heads != self.n_kv_heads)

    def forward(self, x, ctx: "ForwardContext", layer_id: int):
        batch, steps, _ = x.shape
        q, k, v = self.project(x, ctx)
        if self.spec.qk_norm:
            q, k = rms_norm(q, self.norm_eps), rms_norm(k, self.norm_eps)
        if self.spec.temperature_tuning:
            # Llama 4 NoPE layers sharpen attention at long range: 1.0 below floor_scale tokens.
            scale = torch.log1p(torch.floor((ctx.positions.float() + 1) / self.floor_scale)) * self.attn_scale + 1
            q = (q * scale[..., None, None]).type_as(q)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, hd]
        if ctx.cache is not None:
            ctx.cache.write(layer_id, k, v, ctx.batch)
            k, v = ctx.cache.read(layer_id, ctx.batch)
            k, v = k.to(q.dtype), v.to(q.dtype)  # no-op unless the cache was allocated in another dtype
        mask = ctx.mask(self.spec.chunk_size, k.shape[2])
        out = self.attend(q, k, v, mask, causal=mask is None and steps > 1)
        return self.wo(out.transpose(1, 2).reshape(batch, steps, -1))


class FeedForward(nn.Module):
    """SwiGLU, every generation: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Experts(nn.Module):
    """Llama 4 routed experts, stacked: w1, w3 [E, F, D] and w2 [E, D, F] (Linear layout per expert)."""

    def __init__(self, num_experts: int, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.w3 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))

    def forward(self, x, expert: int):
        x = x.to(self.w1.dtype)
        return F.linear(F.silu(F.linear(x, self.w1[expert])) * F.linear(x, self.w3[expert]), self.w2[expert])


class MoE(nn.Module):
    """Llama 4: sigmoid router over raw top-k logits, score scales the expert *input*, plus a shared expert."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k = args.moe.top_k
        self.router = nn.Linear(args.dim, args.moe.num_experts, bias=False)
        self.experts = Experts(args.moe.num_experts, args.dim, args.moe.hidden_dim)
        self.shared_expert = FeedForward(args.dim, args.moe.hidden_dim)

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        top_logits, top_experts = self.router(x).topk(self.top_k, dim=-1)  # [N, k]
        scores = torch.sigmoid(top_logits.float()).to(x.dtype)
        out = self.shared_expert(x)
        # Only the chosen experts run, each on its own tokens (the references run all experts densely).
        for expert in top_experts.unique().tolist():
            token, slot = torch.nonzero(top_experts == expert, as_tuple=True)
            routed = self.experts(x[token] * scores[token, slot, None], expert)
            out.index_add_(0, token, routed.to(out.dtype))
        return out.view(shape)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, spec: LayerSpec):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args, spec)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = MoE(args) if spec.moe else FeedForward(args.dim, args.hidden_dim)

    def forward(self, x, ctx: "ForwardContext", layer_id: int):
        h = x + self.attention(self.attention_norm(x), ctx, layer_id)
        return h + self.feed_forward(self.ffn_norm(h))


class ForwardContext:
    """What every layer of one forward pass shares: the batch, RoPE angles and the mask rules."""

    def __init__(self, batch: Batch, rot: torch.Tensor):
        self.batch, self.positions, self.cache, self.rot = batch, batch.positions, batch.cache, rot
        self._masks: dict = {}

    def mask(self, chunk_size: int | None, n_keys: int) -> torch.Tensor | None:
        """Boolean [B, 1, T, n_keys] mask (True = attend), or None when plain causal attention is exact."""
        steps, start = self.positions.shape[1], self.batch.start
        if start is not None:  # every row at start..start+T-1
            if self.cache is None:  # keys are this pass's own tokens
                first_key, causal_exact = start, True
            else:  # keys are positions 0..n_keys-1; SDPA's is_causal aligns top-left
                first_key, causal_exact = 0, start + steps == n_keys and (steps == 1 or start == 0)
            one_chunk = chunk_size is None or first_key // chunk_size == (start + steps - 1) // chunk_size
            if causal_exact and one_chunk:
                return None
        key = (chunk_size, n_keys)
        if key not in self._masks:
            q_pos = self.positions[:, None, :, None]  # [B, 1, T, 1]
            if self.cache is None:
                k_pos = self.positions[:, None, None, :]  # keys are this pass's own tokens
            else:
                k_pos = torch.arange(n_keys, device=q_pos.device)[None, None, None, :]
            allowed = k_pos <= q_pos
            if chunk_size is not None:
                allowed = allowed & (k_pos // chunk_size == q_pos // chunk_size)
            self._masks[key] = allowed
        return self._masks[key]


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size + args.extra_embeddings, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args, spec) for spec in layer_plan(args))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        if args.cross_attention_layers:  # Llama 3.2 Vision (a module that builds on this one's pieces)
            from herd.model.mllama import CrossAttentionBlock, VisionModel

            self.cross_attention_layers = nn.ModuleList(CrossAttentionBlock(args) for _ in args.cross_attention_layers)
            if args.vision is not None:
                self.vision_model = VisionModel(args.vision, args.dim)
        elif args.vision is not None:  # Llama 4: image features take the place of <|patch|> embeddings
            self.vision_embeddings = VisionEmbeddings(args.vision)
            self.vision_projection = nn.Linear(args.vision.output_dim, args.dim, bias=False)
        self.register_buffer("inv_freq", inverse_frequencies(args), persistent=False)

    def encode_images(self, tiles: torch.Tensor) -> torch.Tensor:
        """Image tiles [N, C, H, W] (preprocessed, herd.images) → [N, patches_per_tile, dim]: the embeddings of
        the tiles' <|patch|> tokens, in order."""
        if self.args.vision is None:
            raise ValueError("this model has no image encoder")
        # the encoder computes in the dtype of its own tensors (its linears may be quantized modules)
        dtype = self.vision_embeddings.vision_encoder.class_embedding.dtype
        return self.vision_projection(self.vision_embeddings(tiles.to(dtype))).to(dtype)

    def cross_attention_states(self, tiles, ratio_ids, tile_mask) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Llama 3.2 Vision: one image's tiles [1, tiles, C, H, W] -> each cross-attention layer's keys and values
        [kv_heads, tiles * n_patches, hd]; computed once per image, read by every token after it."""
        dtype = self.vision_model.vision_encoder.class_embedding.dtype
        states = self.vision_model(tiles.to(dtype), ratio_ids, tile_mask).to(dtype)
        return [layer.attention.keys_values(states.flatten(0, 1)) for layer in self.cross_attention_layers]

    def _cross_attend(self, h, cross, index: int):
        """One cross-attention layer, on the rows that have images (the others pass unchanged)."""
        k, v = cross.kv[index]
        layer = self.cross_attention_layers[index]
        if cross.rows is None or len(cross.rows) == h.shape[0]:
            return layer(h, k, v, cross.mask, cross.text_on)
        out = h.clone()
        out[cross.rows] = layer(h[cross.rows], k, v, cross.mask, cross.text_on)
        return out

    def forward(self, tokens: torch.Tensor, batch: Batch | None = None, last_only: bool = False,
                image_embeds: tuple[torch.Tensor, torch.Tensor] | None = None, cross=None) -> torch.Tensor:
        """Logits (float32) for tokens [B, T].

        `batch` (herd.model.cache.Batch) gives each token's position and each row's cache blocks; without
        one, the rows are whole sequences at positions 0..T-1 and nothing is cached. `last_only` computes
        logits only where generation needs them: each row's last token (or, where `batch.last` is [B, K], the
        K positions it names in each row). `image_embeds` (mask [B, T], rows [mask.sum(), dim]) replaces the
        embeddings of the masked tokens, in row-major order (encode_images). `cross`
        (herd.model.mllama.CrossInputs) feeds Llama 3.2 Vision's cross-attention layers; without it they are
        skipped, so a text-only prompt runs exactly as Llama 3.1."""
        if batch is None:
            batch = Batch.prompt(tokens.shape[1], tokens.shape[0], tokens.device)
        ctx = ForwardContext(batch, rope_angles(self.inv_freq, batch.positions))
        h = self.tok_embeddings(tokens)
        if image_embeds is not None:
            mask, rows = image_embeds
            h = h.masked_scatter(mask[..., None].to(h.device), rows.to(h.dtype))
        fused = dict(zip(self.args.cross_attention_layers, range(len(self.args.cross_attention_layers))))
        for layer_id, layer in enumerate(self.layers):
            if cross is not None and layer_id in fused:
                h = self._cross_attend(h, cross, fused[layer_id])
            h = layer(h, ctx, layer_id)
        if cross is not None and len(self.layers) in fused:
            h = self._cross_attend(h, cross, fused[len(self.layers)])
        if last_only:
            at = batch.last.view(h.shape[0], -1, 1).expand(-1, -1, h.shape[-1]) if batch.last is not None else None
            h = h[:, -1:] if at is None else h.gather(1, at)
        return self.output(self.norm(h)).float()
