"""Rotary position embeddings in Meta's interleaved layout: dims (2i, 2i+1) of each head rotate together.

Every format is converted to this layout at load time (HF Llama 1-3 q/k rows are un-permuted),
so the model knows one convention. Angles are computed from positions on the fly, so a 10M-token
Llama 4 context needs no table.
"""

from __future__ import annotations

import math

import torch

from herd.config import ModelArgs


def inverse_frequencies(args: ModelArgs) -> torch.Tensor:
    """θ_i = theta^(-2i/hd), rescaled for long context as the model's RoPE scaling says (fp32, [hd/2]).
    Computed on the CPU whatever the default device (the loader builds the model on "meta")."""
    with torch.device("cpu"):
        return _inverse_frequencies(args)


def _inverse_frequencies(args: ModelArgs) -> torch.Tensor:
    hd = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    scaling = args.rope_scaling
    if scaling is None:
        return inv_freq.float()
    if scaling.kind == "linear":
        return (inv_freq / scaling.factor).float()
    if scaling.kind == "divisors":
        # GGUF's rope_freqs tensor: llama.cpp divides each frequency by its entry.
        divisors = torch.tensor(scaling.divisors, dtype=torch.float64)
        if divisors.numel() != inv_freq.numel():
            raise ValueError(f"rope_freqs has {divisors.numel()} entries, head_dim/2 is {inv_freq.numel()}")
        return (inv_freq / divisors).float()
    # "llama3" (Llama 3.1/3.2, Llama 4 Scout): keep high frequencies, divide low ones by `factor`,
    # blend smoothly in between. With low == high (Scout) the blend band is empty: a step.
    low_wavelen = scaling.original_max_position / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    if scaling.high_freq_factor != scaling.low_freq_factor:
        smooth = (scaling.original_max_position / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        blended = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
        in_band = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        scaled = torch.where(in_band, blended, scaled)
    return scaled.float()


def rope_angles(inv_freq: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The rotations e^(i·pos·θ_k) for positions [B, T] → complex64 [B, T, 1, hd/2]."""
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq.to(positions.device)
    return torch.polar(torch.ones_like(angles), angles).unsqueeze(2)


def apply_rope(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, T, heads, hd] in fp32 (as Meta's reference does) and cast back: each interleaved pair
    (2k, 2k+1) is one complex number, multiplied by its rotation."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # [B, T, heads, hd/2]
    return torch.view_as_real(pairs * rot).flatten(-2).type_as(x)
