"""Llama 4's image encoder: a ViT over 336-pixel tiles with 2D RoPE and a class token, pixel shuffle, the
vision adapter (a GELU MLP) and, in herd.model.model.Transformer, the projection to the text width.

References: llama-models models/llama4/vision/encoder.py (VisionEncoder, _TransformerBlock) and
vision/embedding.py (VisionEmbeddings, PixelShuffleMLP); HF transformers modeling_llama4.py
(Llama4VisionModel). Parameter names are Meta's: vision_embeddings.vision_encoder.{conv1._linear,
class_embedding, positional_embedding_vlm, ln_pre, ln_post, transformer.resblocks.N.{attn.wq.., ln_1, ln_2,
mlp.c_fc, mlp.c_proj}} and vision_embeddings.vision_adapter.mlp.{c_fc, c_proj}. q and k rotate in
interleaved pairs, as in the text model, in every format.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from herd.config import VisionArgs


def vision_rope_angles(args: VisionArgs) -> torch.Tensor:
    """Rotations for one tile's patches then its class token: complex64 [P + 1, hd/2]. The first quarter of
    the head rotates with the patch's column (x + 1), the second with its row (y + 1); the class token
    does not rotate."""
    side = args.image_size // args.patch_size
    head_dim = args.dim // args.n_heads
    quarter = head_dim // 4
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, head_dim // 2, 2, dtype=torch.float32)[:quarter]
                                          / (head_dim // 2)))
    index = torch.arange(side * side)
    x, y = (index % side + 1).float(), (index // side + 1).float()
    angles = torch.cat([x[:, None] * inv_freq, y[:, None] * inv_freq], dim=-1)  # [P, hd/2]
    angles = torch.cat([angles, torch.zeros(1, angles.shape[1])])  # the class token
    return torch.polar(torch.ones_like(angles), angles)


def rotate_pairs(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """x [N, T, heads, hd] with interleaved pairs (2k, 2k+1) rotated by rot [T, hd/2], in fp32."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rot[:, None, :]).flatten(-2).type_as(x)


class PatchEmbedding(nn.Module):
    """Non-overlapping patches, unfolded channel-major (C, row, column), through one linear map."""

    def __init__(self, n_channels: int, patch_size: int, dim: int):
        super().__init__()
        self.patch_size = patch_size
        self._linear = nn.Linear(n_channels * patch_size ** 2, dim, bias=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = F.unfold(pixels, kernel_size=self.patch_size, stride=self.patch_size)  # [N, C*p*p, P]
        return self._linear(patches.transpose(1, 2))


class VisionAttention(nn.Module):
    """Bidirectional multi-head attention with biases and 2D RoPE."""

    def __init__(self, args: VisionArgs):
        super().__init__()
        self.n_heads, self.head_dim = args.n_heads, args.dim // args.n_heads
        self.wq = nn.Linear(args.dim, args.dim, bias=True)
        self.wk = nn.Linear(args.dim, args.dim, bias=True)
        self.wv = nn.Linear(args.dim, args.dim, bias=True)
        self.wo = nn.Linear(args.dim, args.dim, bias=True)

    def forward(self, x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
        n, steps, _ = x.shape
        shape = (n, steps, self.n_heads, self.head_dim)
        q, k = rotate_pairs(self.wq(x).view(shape), rot), rotate_pairs(self.wk(x).view(shape), rot)
        v = self.wv(x).view(shape)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.wo(out.transpose(1, 2).reshape(n, steps, -1))


class MLP(nn.Module):
    """c_proj(gelu(c_fc x)); the adapter's variant has no biases and a GELU after c_proj too."""

    def __init__(self, dim: int, hidden_dim: int, out_dim: int, bias: bool, gelu_out: bool):
        super().__init__()
        self.c_fc = nn.Linear(dim, hidden_dim, bias=bias)
        self.c_proj = nn.Linear(hidden_dim, out_dim, bias=bias)
        self.gelu_out = gelu_out

    def forward(self, x):
        out = self.c_proj(F.gelu(self.c_fc(x)))
        return F.gelu(out) if self.gelu_out else out


class VisionBlock(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.ln_1 = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.attn = VisionAttention(args)
        self.ln_2 = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.mlp = MLP(args.dim, args.hidden_dim, args.dim, bias=True, gelu_out=False)

    def forward(self, x, rot):
        x = x + self.attn(self.ln_1(x), rot)
        return x + self.mlp(self.ln_2(x))


class VisionTransformer(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.resblocks = nn.ModuleList(VisionBlock(args) for _ in range(args.n_layers))


class VisionEncoder(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        side = args.image_size // args.patch_size
        self.conv1 = PatchEmbedding(args.n_channels, args.patch_size, args.dim)
        self.class_embedding = nn.Parameter(torch.zeros(args.dim))
        self.positional_embedding_vlm = nn.Parameter(torch.zeros(side * side + 1, args.dim))
        self.ln_pre = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.ln_post = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.transformer = VisionTransformer(args)
        self.register_buffer("rot", vision_rope_angles(args), persistent=False)

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        """tiles [N, C, H, W] → patch features [N, P, dim] (the class token, appended last, is dropped)."""
        x = self.conv1(tiles)
        x = torch.cat([x, self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)], dim=1)
        x = self.ln_pre(x + self.positional_embedding_vlm.to(x.dtype))
        rot = self.rot.to(x.device)
        for block in self.transformer.resblocks:
            x = block(x, rot)
        return self.ln_post(x)[:, :-1]


def pixel_shuffle(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """[N, P, C] on a square grid → [N, P·r², C/r²]: neighbouring patches folded into the channels, with
    Meta's (column, row) transpositions."""
    n, patches, channels = x.shape
    side = round(patches ** 0.5)
    grid = x.reshape(n, side, side, channels)
    grid = grid.reshape(n, side, round(side * ratio), round(channels / ratio)).transpose(1, 2)
    grid = grid.reshape(n, round(side * ratio), round(side * ratio), round(channels / ratio ** 2)).transpose(1, 2)
    return grid.reshape(n, -1, grid.shape[-1])


class PixelShuffleMLP(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.ratio = args.pixel_shuffle_ratio
        self.mlp = MLP(round(args.dim / self.ratio ** 2), args.output_dim, args.output_dim, bias=False, gelu_out=True)

    def forward(self, patches):
        return self.mlp(pixel_shuffle(patches, self.ratio))


class VisionEmbeddings(nn.Module):
    """Tiles → one feature row per image token (<|patch|>), before the projection to the text width."""

    def __init__(self, args: VisionArgs):
        super().__init__()
        self.vision_encoder = VisionEncoder(args)
        self.vision_adapter = PixelShuffleMLP(args)

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        """tiles [N, C, H, W] → [N, patches_per_tile, output_dim]."""
        return self.vision_adapter(self.vision_encoder(tiles))
