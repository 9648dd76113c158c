"""ModelArgs: the architecture facts of one Llama model, whatever file it came from.

Field names follow Meta's reference (`dim`, `n_layers`, `n_heads`, `n_kv_heads`, `norm_eps`,
`rope_theta`) plus an explicit `hidden_dim`. Format readers (herd.formats.*) resolve their own
conventions (Meta's `multiple_of`, HF's `intermediate_size`, GGUF's `feed_forward_length`) into
these fields; nothing here parses files. No torch import: this module is pure data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from herd.errors import ConfigError


def _bad(field: str, message: str) -> ConfigError:
    """A ConfigError that remembers the ModelArgs field, so a reader can name its own key for it."""
    err = ConfigError(message)
    err.field = field
    return err


def _positive_int(field: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _bad(field, f"config field {field} must be a positive integer, got {value!r}")


def _positive_float(field: str, value) -> None:
    # NaN fails every comparison and inf is no scale: both would only surface as garbage logits.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise _bad(field, f"config field {field} must be a finite positive number, got {value!r}")


def _per_channel(field: str, value, channels: int, nonzero: bool = False) -> None:
    """An image normalisation's mean or std: one finite number per colour channel (a std never 0)."""
    if not isinstance(value, tuple) or len(value) != channels or any(
            isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (nonzero and v == 0)
            for v in value):
        raise _bad(field, f"{field} must be {channels} finite numbers{' none of them 0' if nonzero else ''}, "
                          f"got {value!r}")


# Llama 3.2 Vision's normalisation, as its released preprocessor_config.json and Meta's llama-models state it
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _check_image_processing(args) -> None:
    for name in ("image_mean", "image_std"):  # a list (as JSON gives it) is kept as the tuple it stands for
        if isinstance(getattr(args, name), list):
            object.__setattr__(args, name, tuple(getattr(args, name)))
    _per_channel("vision.image_mean", args.image_mean, args.n_channels)
    _per_channel("vision.image_std", args.image_std, args.n_channels, nonzero=True)
    _positive_float("vision.rescale_factor", args.rescale_factor)


@dataclass(frozen=True)
class RopeScaling:
    """How RoPE inverse frequencies are rescaled for long context.

    kind "llama3": Llama 3.1/3.2 and Llama 4 Scout band-wise scaling (factor, low/high freq factors,
    original context). kind "divisors": per-frequency divisors as GGUF stores them in `rope_freqs`.
    kind "linear": positions divided by `factor` (older fine-tunes).
    """

    kind: str
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192
    divisors: tuple[float, ...] | None = None

    def __post_init__(self):
        if self.kind not in ("llama3", "divisors", "linear"):
            raise _bad("rope_scaling", f"unknown RoPE scaling kind {self.kind!r} (herd knows llama3, divisors, linear)")
        if self.kind == "divisors":
            if not self.divisors:
                raise _bad("rope_scaling", "RoPE scaling kind 'divisors' needs the divisor values")
            bad = [d for d in self.divisors if not (isinstance(d, (int, float)) and math.isfinite(d) and d > 0)]
            if bad:
                raise _bad("rope_scaling", f"RoPE frequency divisors must be finite and positive, got {bad[:4]}")
            return
        _positive_float("rope_scaling.factor", self.factor)
        if self.kind == "llama3":
            _positive_float("rope_scaling.low_freq_factor", self.low_freq_factor)
            _positive_float("rope_scaling.high_freq_factor", self.high_freq_factor)
            _positive_int("rope_scaling.original_max_position", self.original_max_position)
            # the blend band runs from low to high; equal is a step (Llama 4 Scout), reversed is no band at all
            if self.high_freq_factor < self.low_freq_factor:
                raise _bad("rope_scaling", f"RoPE high_freq_factor ({self.high_freq_factor}) is below "
                                           f"low_freq_factor ({self.low_freq_factor})")


@dataclass(frozen=True)
class MoEArgs:
    """Llama 4 mixture of experts: sigmoid router over `num_experts`, `top_k` chosen, plus a shared expert."""

    num_experts: int
    top_k: int
    hidden_dim: int  # each routed expert's (and the shared expert's) SwiGLU width
    layers: tuple[int, ...]  # layer ids whose FFN is a MoE; the rest are dense SwiGLU of ModelArgs.hidden_dim

    def __post_init__(self):
        for name in ("num_experts", "top_k", "hidden_dim"):
            _positive_int(f"moe.{name}", getattr(self, name))
        if not 1 <= self.top_k <= self.num_experts:
            raise _bad("moe.top_k", f"top_k {self.top_k} must be within 1..num_experts ({self.num_experts})")


@dataclass(frozen=True)
class VisionArgs:
    """Llama 4's image encoder (llama-models models/llama4/args.py VisionArgs, vision/encoder.py): a ViT over
    square tiles of `image_size` pixels cut in `patch_size` patches, with 2D RoPE (theta `rope_theta`) and a
    class token; its patches pixel-shuffled by `pixel_shuffle_ratio` into a GELU MLP of width `output_dim`
    (the vision adapter), then projected to the text width. `image_token_id` is the token (<|patch|>) whose
    embeddings the image's features replace."""

    dim: int
    n_layers: int
    n_heads: int
    hidden_dim: int  # the encoder MLP's width (Meta: mlp_ratio * dim)
    image_size: int
    patch_size: int
    output_dim: int
    pixel_shuffle_ratio: float = 0.5
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    image_token_id: int = 200092
    n_channels: int = 3
    # preprocessing (herd.images.preprocess_llama4), as the checkpoint's image processor states it:
    max_tiles: int = 16  # most tiles an image is cut into (HF max_patches), the global one aside
    resize_to_max_canvas: bool = False  # the canvas that upscales most, without the one-tile upscaling limit
    rescale_factor: float = 1 / 255  # pixel values x this, then (x - mean) / std
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)

    def __post_init__(self):
        for name in ("dim", "n_layers", "n_heads", "hidden_dim", "image_size", "patch_size", "output_dim",
                     "n_channels", "max_tiles"):
            _positive_int(f"vision.{name}", getattr(self, name))
        if not isinstance(self.resize_to_max_canvas, bool):
            raise _bad("vision.resize_to_max_canvas", f"resize_to_max_canvas must be true or false, got "
                                                      f"{self.resize_to_max_canvas!r}")
        _check_image_processing(self)
        _positive_float("vision.rope_theta", self.rope_theta)
        _positive_float("vision.norm_eps", self.norm_eps)
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 4:
            raise _bad("vision.n_heads", f"vision dim {self.dim} / n_heads {self.n_heads} must be a whole head size "
                                         "divisible by 4 (2D RoPE rotates x and y halves)")
        if self.image_size % self.patch_size:
            raise _bad("vision.patch_size", f"image_size {self.image_size} is not a multiple of patch_size "
                                            f"{self.patch_size}")
        ratio, side = self.pixel_shuffle_ratio, self.image_size // self.patch_size
        if not (isinstance(ratio, (int, float)) and 0 < ratio <= 1) or (side * ratio) % 1 or (1 / ratio**2) % 1 \
                or self.dim % round(1 / ratio**2):
            raise _bad("vision.pixel_shuffle_ratio", f"pixel_shuffle_ratio {ratio!r} must shrink the {side}x{side} "
                                                     f"patch grid and the width {self.dim} by whole factors")

    @property
    def patches_per_tile(self) -> int:
        """Image tokens (<|patch|>) per tile after pixel shuffle."""
        side = self.image_size // self.patch_size
        return round(side * side * self.pixel_shuffle_ratio ** 2)


@dataclass(frozen=True)
class MllamaVisionArgs:
    """Llama 3.2 Vision's image encoder (HF MllamaVisionConfig; llama-models models/llama3/multimodal/model.py):
    a ViT over up to `max_num_tiles` tiles of `image_size` pixels, with aspect-ratio tile embeddings, a gated
    positional embedding, `n_layers` local and `n_global_layers` gated global layers; the outputs of the local
    layers `intermediate_layers` are concatenated to the last, then projected to the text width for the text
    model's cross-attention layers. `aspect_ratios` lists the tile arrangements (rows, columns) in the order
    their embeddings are numbered, from 1."""

    dim: int
    n_layers: int
    n_global_layers: int
    n_heads: int
    hidden_dim: int
    image_size: int
    patch_size: int
    max_num_tiles: int
    intermediate_layers: tuple[int, ...]
    aspect_ratios: tuple[tuple[int, int], ...]
    norm_eps: float = 1e-5
    image_token_id: int = 128256
    n_channels: int = 3
    # preprocessing (herd.images.preprocess_mllama), as the checkpoint's image processor states it
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD

    def __post_init__(self):
        for name in ("dim", "n_layers", "n_global_layers", "n_heads", "hidden_dim", "image_size", "patch_size",
                     "max_num_tiles", "n_channels"):
            _positive_int(f"vision.{name}", getattr(self, name))
        _check_image_processing(self)
        if self.dim % self.n_heads:
            raise _bad("vision.n_heads", f"vision dim {self.dim} is not a multiple of n_heads {self.n_heads}")
        if self.image_size % self.patch_size:
            raise _bad("vision.patch_size", f"image_size {self.image_size} is not a multiple of patch_size "
                                            f"{self.patch_size}")
        bad = [i for i in self.intermediate_layers if not (isinstance(i, int) and 0 <= i < self.n_layers)]
        if bad:
            raise _bad("vision.intermediate_layers", f"intermediate layers {bad} are outside 0..{self.n_layers - 1}")
        if not self.aspect_ratios or any(r * c > self.max_num_tiles for r, c in self.aspect_ratios):
            raise _bad("vision.aspect_ratios", f"tile arrangements {list(self.aspect_ratios)[:6]} must exist and fit "
                                               f"max_num_tiles {self.max_num_tiles}")

    @property
    def n_patches(self) -> int:
        """Positions per tile: the patches and the class token."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @property
    def output_dim(self) -> int:
        return self.dim * (1 + len(self.intermediate_layers))


@dataclass(frozen=True)
class ModelArgs:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    hidden_dim: int  # dense SwiGLU width (Llama 4: the dense layers of Maverick)
    norm_eps: float
    rope_theta: float
    max_seq_len: int  # context length the model was trained for
    head_dim: int | None = None  # None: dim // n_heads
    rope_scaling: RopeScaling | None = None
    tie_embeddings: bool = False  # Llama 3.2 1B/3B: output projection is the embedding matrix
    # Llama 4
    moe: MoEArgs | None = None
    nope_layers: tuple[int, ...] = ()  # layers without RoPE (global attention, temperature tuning)
    attention_chunk_size: int | None = None  # RoPE layers attend within aligned chunks of this many tokens
    use_qk_norm: bool = False  # weightless RMS norm of q and k after RoPE, on RoPE layers
    attn_temperature_tuning: bool = False  # scale q on NoPE layers by 1 + attn_scale*ln(1+floor((pos+1)/floor_scale))
    floor_scale: float = 8192.0
    attn_scale: float = 0.1
    vision: VisionArgs | MllamaVisionArgs | None = None  # the image encoder, when the checkpoint has its weights
    # Llama 3.2 Vision: gated cross-attention layers, each run before the self-attention layer of its index
    # (n_layers: after the last)
    cross_attention_layers: tuple[int, ...] = ()
    extra_embeddings: int = 0  # embedding rows past vocab_size (Llama 3.2 Vision's 8, <|image|> among them)

    def __post_init__(self):
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "max_seq_len"):
            _positive_int(name, getattr(self, name))
        if self.n_heads % self.n_kv_heads:
            raise _bad("n_kv_heads", f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise _bad("n_heads", f"dim ({self.dim}) is not divisible by n_heads ({self.n_heads}); give head_dim")
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        _positive_int("head_dim", self.head_dim)
        if self.head_dim % 2:
            raise _bad("head_dim", f"head_dim must be even for RoPE, got {self.head_dim}")
        _positive_float("norm_eps", self.norm_eps)
        _positive_float("rope_theta", self.rope_theta)
        if self.rope_scaling is not None and self.rope_scaling.kind == "divisors":
            if len(self.rope_scaling.divisors) != self.head_dim // 2:
                raise _bad("rope_scaling", f"{len(self.rope_scaling.divisors)} RoPE frequency divisors for "
                                           f"head_dim/2 = {self.head_dim // 2} frequencies")
        if self.attention_chunk_size is not None:
            _positive_int("attention_chunk_size", self.attention_chunk_size)
        _positive_float("floor_scale", self.floor_scale)
        if isinstance(self.attn_scale, bool) or not isinstance(self.attn_scale, (int, float)) \
                or not math.isfinite(self.attn_scale):
            raise _bad("attn_scale", f"config field attn_scale must be a finite number, got {self.attn_scale!r}")
        if isinstance(self.extra_embeddings, bool) or not isinstance(self.extra_embeddings, int) \
                or self.extra_embeddings < 0:
            raise _bad("extra_embeddings", f"extra_embeddings must be >= 0, got {self.extra_embeddings!r}")
        late = [i for i in self.cross_attention_layers if isinstance(i, bool) or not isinstance(i, int)
                or not 0 <= i <= self.n_layers]
        if late:
            raise _bad("cross_attention_layers", f"cross-attention layers {late[:8]} are outside 0..{self.n_layers}")
        ids = (*self.nope_layers, *(self.moe.layers if self.moe else ()))
        bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.n_layers]
        if bad:
            raise _bad("nope_layers" if set(bad) & set(self.nope_layers) else "moe.layers",
                       f"layer ids {bad[:8]} are outside 0..{self.n_layers - 1}")

    @property
    def is_llama4(self) -> bool:
        return self.moe is not None or bool(self.nope_layers) or self.use_qk_norm or self.attention_chunk_size is not None


@dataclass(frozen=True)
class LayerSpec:
    """What one transformer block does; derived once from ModelArgs so the model never tests layer ids."""

    moe: bool
    rope: bool
    qk_norm: bool
    chunk_size: int | None
    temperature_tuning: bool


def layer_plan(args: ModelArgs) -> list[LayerSpec]:
    moe_layers = set(args.moe.layers) if args.moe else set()
    nope = set(args.nope_layers)
    plan = []
    for i in range(args.n_layers):
        rope = i not in nope
        plan.append(
            LayerSpec(
                moe=i in moe_layers,
                rope=rope,
                qk_norm=args.use_qk_norm and rope,
                chunk_size=args.attention_chunk_size if rope else None,
                temperature_tuning=args.attn_temperature_tuning and not rope,
            )
        )
    return plan


def parameter_counts(args: ModelArgs) -> tuple[int, int]:
    """(total, active per token) parameter counts; they differ only for mixture-of-experts models."""
    d, hd = args.dim, args.head_dim
    attn = d * hd * (2 * args.n_heads + 2 * args.n_kv_heads)
    dense_ffn = 3 * d * args.hidden_dim
    total = active = args.vocab_size * d * (1 if args.tie_embeddings else 2) + d
    for spec in layer_plan(args):
        total += attn + 2 * d
        active += attn + 2 * d
        if spec.moe:
            expert = 3 * d * args.moe.hidden_dim
            total += d * args.moe.num_experts + expert * (args.moe.num_experts + 1)
            active += d * args.moe.num_experts + expert * (args.moe.top_k + 1)
        else:
            total += dense_ffn
            active += dense_ffn
    return total, active


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None, ffn_exp: float = 4.0) -> int:
    """Meta's SwiGLU width rule (FeedForward.__init__): 2/3 of ffn_exp*dim, scaled, rounded up."""
    hidden = int(2 * int(ffn_exp * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


__all__ = ["ModelArgs", "VisionArgs", "MllamaVisionArgs", "CLIP_MEAN", "CLIP_STD", "RopeScaling", "MoEArgs", "LayerSpec",
           "layer_plan", "parameter_counts", "ffn_hidden_dim"]
