"""Llama 3.2 Vision: the tiled image encoder, its projection, and the gated cross-attention layers of the text model.

References: HF transformers modeling_mllama.py (MllamaVisionModel, MllamaTextCrossAttention,
MllamaCrossAttentionDecoderLayer, the aspect-ratio and cross-attention masks) and llama-models
models/llama3/multimodal/model.py (VisionEncoder, CrossAttentionTransformerBlock). Module names are Meta's
(vision_model.vision_encoder.{conv1, class_embedding, positional_embedding, gated_positional_embedding(_gate),
pre_tile_pos_embed, post_tile_pos_embed, ln_pre, ln_post, transformer, global_transformer},
vision_model.vision_projection, cross_attention_layers.N.{attention.{wq,wk,wv,wo,q_norm,k_norm},
attention_norm, gate_attn, feed_forward, ffn_norm, gate_ffwd}); the aspect-ratio tables are indexed by
arrangement id (0: none, i: aspect_ratios[i-1]) as HF stores them, which every Meta table can be written as.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from herd.config import ModelArgs, MllamaVisionArgs
from herd.model.model import FeedForward, RMSNorm
from herd.model.vision import PatchEmbedding


class TileEmbedding(nn.Module):
    """One embedding per tile for each arrangement id, optionally scaled by tanh(gate)."""

    def __init__(self, args: MllamaVisionArgs, positions: int, gated: bool = True):
        super().__init__()
        self.tiles, self.positions = args.max_num_tiles, positions
        self.embedding = nn.Parameter(torch.zeros(len(args.aspect_ratios) + 1, args.max_num_tiles * positions * args.dim))
        self.gate = nn.Parameter(torch.zeros(1)) if gated else None

    def table(self, ratio_ids: torch.Tensor) -> torch.Tensor:
        """[I] ids -> [I, tiles, positions, dim]."""
        return self.embedding[ratio_ids].view(len(ratio_ids), self.tiles, self.positions, -1)

    def forward(self, x, ratio_ids):
        return x + self.table(ratio_ids) * self.gate.tanh()


class ImageAttention(nn.Module):
    def __init__(self, args: MllamaVisionArgs):
        super().__init__()
        self.n_heads, self.head_dim = args.n_heads, args.dim // args.n_heads
        self.wq = nn.Linear(args.dim, args.dim, bias=False)
        self.wk = nn.Linear(args.dim, args.dim, bias=False)
        self.wv = nn.Linear(args.dim, args.dim, bias=False)
        self.wo = nn.Linear(args.dim, args.dim, bias=False)

    def forward(self, x, mask):
        n, steps, _ = x.shape
        q, k, v = (w(x).view(n, steps, self.n_heads, self.head_dim).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.wo(out.transpose(1, 2).reshape(n, steps, -1))


class ImageBlock(nn.Module):
    """Pre-norm ViT block; the global encoder's blocks scale both branches by tanh of their gates."""

    def __init__(self, args: MllamaVisionArgs, gated: bool):
        super().__init__()
        self.ln_1 = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.attn = ImageAttention(args)
        self.ln_2 = nn.LayerNorm(args.dim, eps=args.norm_eps)
        from herd.model.vision import MLP

        self.mlp = MLP(args.dim, args.hidden_dim, args.dim, bias=True, gelu_out=False)
        if gated:
            self.gate_attn = nn.Parameter(torch.zeros(1))
            self.gate_ffn = nn.Parameter(torch.zeros(1))
        self.gated = gated

    def forward(self, x, mask):
        attn, ffn = (self.gate_attn.tanh(), self.gate_ffn.tanh()) if self.gated else (1.0, 1.0)
        x = x + attn * self.attn(self.ln_1(x), mask)
        return x + ffn * self.mlp(self.ln_2(x))


class ImageTransformer(nn.Module):
    def __init__(self, args: MllamaVisionArgs, layers: int, gated: bool):
        super().__init__()
        self.resblocks = nn.ModuleList(ImageBlock(args, gated) for _ in range(layers))


def tile_padding_mask(tile_mask: torch.Tensor, real_positions: int, positions: int, dtype) -> torch.Tensor:
    """The encoders' additive mask [I, 1, L, L] over tiles x positions: a query and a key that are both padding
    (a tile the image does not fill, or a position past the real ones) never meet; everything else does, as
    in Meta's and HF's encoders. With no padded positions HF's slice [-0:] marks every position padding;
    that is reproduced, since its outputs are the reference."""
    pad = (1 - tile_mask.to(dtype))[:, :, None].repeat(1, 1, positions)  # [I, tiles, positions]
    pad[:, :, real_positions - positions if positions > real_positions else 0:] = 1
    pad = pad.flatten(1)[..., None]  # [I, L, 1]
    return (pad @ pad.transpose(1, 2) * torch.finfo(dtype).min)[:, None]


class VisionEncoder(nn.Module):
    def __init__(self, args: MllamaVisionArgs):
        super().__init__()
        self.args = args
        self.conv1 = PatchEmbedding(args.n_channels, args.patch_size, args.dim)
        self.class_embedding = nn.Parameter(torch.zeros(args.dim))
        self.positional_embedding = nn.Parameter(torch.zeros(args.n_patches, args.dim))
        self.gated_positional_embedding = TileEmbedding(args, args.n_patches, gated=False)
        self.gated_positional_embedding_gate = nn.Parameter(torch.zeros(1))
        self.pre_tile_pos_embed = TileEmbedding(args, 1)
        self.post_tile_pos_embed = TileEmbedding(args, 1)
        self.ln_pre = nn.LayerNorm(args.dim)
        self.ln_post = nn.LayerNorm(args.dim)
        self.transformer = ImageTransformer(args, args.n_layers, gated=False)
        self.global_transformer = ImageTransformer(args, args.n_global_layers, gated=True)

    def forward(self, tiles: torch.Tensor, ratio_ids: torch.Tensor, tile_mask: torch.Tensor) -> torch.Tensor:
        """tiles [I, tiles, C, H, W], ratio_ids [I], tile_mask [I, tiles] -> [I, tiles, n_patches, output_dim]."""
        a = self.args
        images, n_tiles = tiles.shape[:2]
        x = self.conv1(tiles.flatten(0, 1)).view(images, n_tiles, -1, a.dim)
        x = self.pre_tile_pos_embed(x, ratio_ids).flatten(0, 1)
        x = torch.cat([self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1), x], dim=1)
        x = x.view(images, n_tiles, a.n_patches, a.dim)
        gate = self.gated_positional_embedding_gate.tanh()
        x = x + (1 - gate) * self.positional_embedding + gate * self.gated_positional_embedding.table(ratio_ids)
        x = self.ln_pre(x)
        positions = -(-a.n_patches // 8) * 8  # padded to a multiple of 8, as the references do
        x = F.pad(x, (0, 0, 0, positions - a.n_patches)).view(images, n_tiles * positions, a.dim)
        mask = tile_padding_mask(tile_mask, a.n_patches, positions, x.dtype)
        kept = []
        for i, block in enumerate(self.transformer.resblocks):
            x = block(x, mask)
            if i in a.intermediate_layers:
                kept.append((a.intermediate_layers.index(i), x))
        x = self.ln_post(x).view(images, n_tiles, positions, a.dim)
        x = self.post_tile_pos_embed(x, ratio_ids).view(images, n_tiles * positions, a.dim)
        for block in self.global_transformer.resblocks:
            x = block(x, mask)
        layers = torch.stack([t for _, t in sorted(kept, key=lambda e: e[0])], dim=-1)  # [I, L, dim, k]
        layers = layers.reshape(images, n_tiles, positions, -1)[:, :, :a.n_patches]
        return torch.cat([x.view(images, n_tiles, positions, a.dim)[:, :, :a.n_patches], layers], dim=-1)


class VisionModel(nn.Module):
    def __init__(self, args: MllamaVisionArgs, text_dim: int):
        super().__init__()
        self.vision_encoder = VisionEncoder(args)
        self.vision_projection = nn.Linear(args.output_dim, text_dim, bias=True)

    def forward(self, tiles, ratio_ids, tile_mask) -> torch.Tensor:
        """-> [I, tiles * n_patches, text dim]: the states the text model's cross-attention reads."""
        out = self.vision_projection(self.vision_encoder(tiles, ratio_ids, tile_mask))
        return out.flatten(1, 2)


@dataclass
class CrossInputs:
    """What the cross-attention layers read in one forward: per layer keys and values [B, kv_heads, S, hd]
    (rows padded to the longest), `mask` [B, 1, T, S] (True: attend) and `text_on` [B, T, 1] (0 for a token
    no image precedes: its feed-forward branch is dropped, as the references do; transformers keeps its
    cross-attention branch, which Meta's code also zeroes, and herd computes what transformers does)."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    mask: torch.Tensor
    text_on: torch.Tensor
    rows: torch.Tensor | None = None  # the forward's rows these are for (the others skip the layers)


class CrossAttention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.q_norm = RMSNorm(args.head_dim, args.norm_eps)
        self.k_norm = RMSNorm(args.head_dim, args.norm_eps)

    def keys_values(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """states [S, dim] -> k, v [kv_heads, S, hd]."""
        k = self.k_norm(self.wk(states).view(-1, self.n_kv_heads, self.head_dim)).transpose(0, 1)
        v = self.wv(states).view(-1, self.n_kv_heads, self.head_dim).transpose(0, 1)
        return k, v

    def forward(self, x, k, v, mask):
        batch, steps, _ = x.shape
        q = self.q_norm(self.wq(x).view(batch, steps, self.n_heads, self.head_dim)).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask,
                                             enable_gqa=self.n_heads != self.n_kv_heads)
        return self.wo(out.transpose(1, 2).reshape(batch, steps, -1))


class CrossAttentionBlock(nn.Module):
    """h + tanh(gate_attn)·xattn(norm h); then + tanh(gate_ffwd)·ffn(norm h), the latter only for tokens some
    image precedes."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = CrossAttention(args)
        self.gate_attn = nn.Parameter(torch.zeros(1))
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)
        self.gate_ffwd = nn.Parameter(torch.zeros(1))

    def forward(self, h, k, v, mask, text_on):
        h = h + self.gate_attn.tanh() * self.attention(self.attention_norm(h), k, v, mask)
        return h + self.gate_ffwd.tanh() * (self.feed_forward(self.ffn_norm(h)) * text_on.to(h.dtype))


def image_ranges(locations: list[int]) -> list[tuple[int, float]]:
    """The query positions [start, end) each image (at these <|image|> positions, ascending) is seen from:
    from its token to the next image's; consecutive image tokens are seen together from the first to the
    group's end; the last group stays in view for every later token (HF processing_mllama's
    get_cross_attention_token_mask, and generation repeating the last row)."""
    ends: list[float] = [*locations[1:], float("inf")]
    last = ends[-1]
    for i in range(len(locations) - 1, -1, -1):
        if locations[i] == ends[i] - 1:
            ends[i] = last
        last = ends[i]
    return list(zip(locations, ends))


def cross_inputs(rows: list[list[tuple[int, int, list]]], positions: torch.Tensor, tile_positions: int,
                 max_tiles: int) -> CrossInputs:
    """CrossInputs for the rows of a forward that have images (CrossInputs.rows).

    rows[b]: row b's images as (<|image|> position, real tiles, per-layer (k, v) [kv_heads, max_tiles *
    tile_positions, hd]); positions [B, T]: each query's position. A query no image is in view for still
    attends to every image position of its row (uniformly: nothing is masked), its feed-forward branch
    dropped, which is what transformers computes (Meta's CrossAttention also zeroes the attention output of such
    a query: its full_text_row_masked_out_mask)."""
    with_images = [b for b, images in enumerate(rows) if images]
    per_image = max_tiles * tile_positions
    longest = max(len(rows[b]) for b in with_images) * per_image
    steps = positions.shape[1]
    n_layers = len(rows[with_images[0]][0][2])
    mask = torch.zeros(len(with_images), 1, steps, longest, dtype=torch.bool, device=positions.device)
    kv = [([], []) for _ in range(n_layers)]
    for r, b in enumerate(with_images):
        images = sorted(rows[b], key=lambda im: im[0])
        query = positions[b]
        for i, ((start, end), (_, tiles, _)) in enumerate(zip(image_ranges([im[0] for im in images]), images)):
            seen = (query >= start) & (query < end)
            mask[r, 0, seen, i * per_image: i * per_image + tiles * tile_positions] = True
        unseen = ~mask[r, 0].any(-1)
        mask[r, 0, unseen, : len(images) * per_image] = True
        for layer in range(n_layers):
            k = torch.cat([im[2][layer][0] for im in images], dim=1)
            v = torch.cat([im[2][layer][1] for im in images], dim=1)
            pad = longest - k.shape[1]
            kv[layer][0].append(F.pad(k, (0, 0, 0, pad)))
            kv[layer][1].append(F.pad(v, (0, 0, 0, pad)))
    on = torch.stack([_text_on(rows[b], positions[b]) for b in with_images])[..., None]
    stacked = [(torch.stack(k), torch.stack(v)) for k, v in kv]
    return CrossInputs(stacked, mask, on, torch.tensor(with_images, device=positions.device))


def _text_on(images: list, query: torch.Tensor) -> torch.Tensor:
    """Which queries some image is in view for."""
    on = torch.zeros_like(query, dtype=torch.bool)
    for start, end in image_ranges(sorted(im[0] for im in images)):
        on |= (query >= start) & (query < end)
    return on.float()
