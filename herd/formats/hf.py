"""Hugging Face directories: config.json + safetensors (sharded through model.safetensors.index.json).

Covers LlamaForCausalLM (Llama 1-3.3) and Llama4ForCausalLM / Llama4ForConditionalGeneration (the
text model). Tensors stay memory-mapped by safetensors until the loader copies them into the model.
HF Llama 1-3 store q/k rows permuted for rotate_half RoPE; they are put back in Meta's interleaved
order here. Llama 4 is interleaved in every format.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import torch

from herd.config import MllamaVisionArgs, ModelArgs, MoEArgs, RopeScaling, VisionArgs
from herd.errors import (
    ConfigError,
    FormatError,
    MissingTensor,
    ShapeMismatch,
    TruncatedFile,
    UnexpectedTensor,
    UnsupportedArchitecture,
)
from herd.formats.checkpoint import Checkpoint, TokenizerSource
from herd.formats.fields import Fields, check_layer_count, naming, read_json

LLAMA_ARCHS = {"LlamaForCausalLM"}
LLAMA4_ARCHS = {"Llama4ForCausalLM", "Llama4ForConditionalGeneration"}
MLLAMA_ARCHS = {"MllamaForConditionalGeneration"}

# Settings that change the maths and that herd does not implement: (key, value herd accepts).
UNSUPPORTED_IF_NOT = {
    "attention_bias": False,
    "mlp_bias": False,
    "hidden_act": "silu",
    "router_jitter_noise": 0.0,
}


def is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def _rope(cfg: Fields) -> tuple[float, RopeScaling | None]:
    # transformers 4.x: rope_theta + rope_scaling; 5.x: rope_parameters holds both.
    where = cfg.where
    params = {}
    for key in ("rope_scaling", "rope_parameters"):
        part = cfg.object(key, None)
        if part is not None:
            params.update(part.data)
            where = part.where
    p = Fields(params, where)
    theta = p.float("rope_theta", cfg.float("rope_theta", 10000.0))
    kind = p.str("rope_type", p.str("type", "default"))
    if kind == "default":
        return theta, None
    if kind == "llama3":
        return theta, RopeScaling(
            "llama3",
            factor=p.float("factor"),
            low_freq_factor=p.float("low_freq_factor", 1.0),
            high_freq_factor=p.float("high_freq_factor", 4.0),
            original_max_position=p.int("original_max_position_embeddings", 8192),
        )
    if kind == "linear":
        return theta, RopeScaling("linear", factor=p.float("factor"))
    raise UnsupportedArchitecture(f"{where}: rope type {kind!r} is not supported (herd has default, llama3, linear)")


# ModelArgs field -> the config.json key it comes from, for messages about impossible values
_HF_NAMES = {
    "dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads", "vocab_size": "vocab_size", "hidden_dim": "intermediate_size",
    "norm_eps": "rms_norm_eps", "rope_theta": "rope_theta", "max_seq_len": "max_position_embeddings",
    "head_dim": "head_dim", "rope_scaling": "rope_scaling", "moe": "num_local_experts",
    "attention_chunk_size": "attention_chunk_size", "floor_scale": "floor_scale", "attn_scale": "attn_scale",
    "nope_layers": "no_rope_layers",
}
_HF_LAYER = r"(?:language_model\.|model\.)*layers\.(\d+)\."


def args_from_hf_config(config: dict, path: Path | str = "config.json",
                        tensor_names: list[str] | None = None) -> ModelArgs:
    """config.json -> ModelArgs. With `tensor_names` (the checkpoint's), the layer count is checked against
    them before anything sized by it is built."""
    top = Fields(config, str(path))
    archs = config.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise top.fail("architectures", "a list of class names", archs)
    model_type = top.str("model_type", None)
    if not (set(archs) & (LLAMA_ARCHS | LLAMA4_ARCHS | MLLAMA_ARCHS)) and model_type not in (
            "llama", "llama4", "llama4_text", "mllama"):
        raise UnsupportedArchitecture(
            f"{path}: architectures={archs} model_type={model_type!r}; herd runs "
            f"{sorted(LLAMA_ARCHS | LLAMA4_ARCHS | MLLAMA_ARCHS)}"
        )
    mllama = model_type == "mllama" or bool(set(archs) & MLLAMA_ARCHS)
    cfg = top.object("text_config") if model_type == "llama4" or "text_config" in config else top
    for key, accepted in UNSUPPORTED_IF_NOT.items():
        if key in cfg and cfg.data[key] not in (accepted, None):
            raise UnsupportedArchitecture(f"{path}: {key}={cfg.data[key]!r} is not supported (herd needs {accepted!r})")
    n_layers = cfg.int("num_hidden_layers")
    if tensor_names is not None:
        text = [n for n in tensor_names if not n.startswith(SKIPPED_PREFIXES)]
        check_layer_count(n_layers, text, _HF_LAYER, Path(path), "num_hidden_layers")
    with naming(path, _HF_NAMES):
        theta, scaling = _rope(cfg)
        common = dict(
            dim=cfg.int("hidden_size"),
            n_layers=n_layers,
            n_heads=cfg.int("num_attention_heads"),
            n_kv_heads=cfg.int("num_key_value_heads", None) or cfg.int("num_attention_heads"),
            vocab_size=cfg.int("vocab_size"),
            norm_eps=cfg.float("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            max_seq_len=cfg.int("max_position_embeddings", 2048),
            head_dim=cfg.int("head_dim", None),
            tie_embeddings=bool(cfg.bool("tie_word_embeddings", False)),
        )
        if mllama:
            return _mllama_args(cfg, top, path, tensor_names, common)
        if model_type not in ("llama4", "llama4_text") and not set(archs) & LLAMA4_ARCHS:
            return ModelArgs(hidden_dim=cfg.int("intermediate_size"), **common)
        step = cfg.int("interleave_moe_layer_step", 1)
        if step < 0:
            raise cfg.fail("interleave_moe_layer_step", "a positive integer", step)
        moe_layers = cfg.int_list("moe_layers", None)
        moe_layers = tuple(moe_layers) if moe_layers is not None else tuple(range(step - 1, n_layers, step)) if step else ()
        interval = cfg.int("no_rope_layer_interval", 4)
        if interval <= 0:
            raise cfg.fail("no_rope_layer_interval", "a positive integer", interval)
        rope_flags = cfg.int_list("no_rope_layers", None) or [int((i + 1) % interval != 0) for i in range(n_layers)]
        if len(rope_flags) != n_layers:
            raise ConfigError(f"{path}: no_rope_layers has {len(rope_flags)} entries for {n_layers} layers")
        vision = None
        if "vision_config" in config and tensor_names is not None and any(
                n.startswith(VISION_PREFIXES) for n in tensor_names):
            try:
                vision = _llama4_vision(top.object("vision_config"), top, path)
            except (UnsupportedArchitecture, ConfigError):
                vision = None  # the text model still runs; read_hf's note says why images do not
        return ModelArgs(
            hidden_dim=cfg.int("intermediate_size_mlp", None) or cfg.int("intermediate_size"),
            moe=MoEArgs(
                num_experts=cfg.int("num_local_experts"),
                top_k=cfg.int("num_experts_per_tok", 1),
                hidden_dim=cfg.int("intermediate_size"),
                layers=moe_layers,
            )
            if moe_layers
            else None,
            nope_layers=tuple(i for i in range(n_layers) if not rope_flags[i]),
            attention_chunk_size=cfg.int("attention_chunk_size", None),
            use_qk_norm=cfg.bool("use_qk_norm", True),
            attn_temperature_tuning=cfg.bool("attn_temperature_tuning", True),
            floor_scale=cfg.float("floor_scale", 8192.0),
            attn_scale=cfg.float("attn_scale", 0.1),
            vision=vision,
            **common,
        )


def _mllama_args(cfg: Fields, top: Fields, path, tensor_names, common: dict) -> ModelArgs:
    """MllamaTextConfig counts its cross-attention layers among num_hidden_layers; herd's layers are the
    self-attention ones, and each cross-attention layer runs before the self-attention layer that followed it."""
    cross = sorted(cfg.int_list("cross_attention_layers", []))
    total = common["n_layers"]
    if any(not 0 <= c < total for c in cross):
        raise ConfigError(f"{path}: text_config.cross_attention_layers {cross} are outside 0..{total - 1}")
    fusion = tuple(c - k for k, c in enumerate(cross))
    vision = None
    if tensor_names is not None and any(n.startswith(VISION_PREFIXES) for n in tensor_names):
        try:
            vision = _mllama_vision(top.object("vision_config"), top, path)
        except (UnsupportedArchitecture, ConfigError):
            vision = None  # read_hf's note says why
    return ModelArgs(hidden_dim=cfg.int("intermediate_size"), **{**common, "n_layers": total - len(cross)},
                     cross_attention_layers=fusion, extra_embeddings=8, vision=vision)


def _mllama_vision(cfg: Fields, top: Fields, path) -> MllamaVisionArgs:
    if cfg.str("hidden_act", "gelu") != "gelu":
        raise UnsupportedArchitecture(f"{path}: vision_config.hidden_act {cfg.str('hidden_act')!r} (herd has gelu)")
    ratios = cfg.data.get("supported_aspect_ratios")
    if not isinstance(ratios, list) or not all(isinstance(r, list) and len(r) == 2 for r in ratios):
        raise ConfigError(f"{path}: vision_config.supported_aspect_ratios must be a list of [rows, columns]")
    image_size, max_tiles, channels = cfg.int("image_size"), cfg.int("max_num_tiles"), cfg.int("num_channels", 3)
    processing = image_processing(Path(path).parent, "mllama", image_size, channels)
    # the processor pads every image to its tile count and numbers the arrangements of that many tiles; the
    # encoder's tile embeddings are sized by the config's: they must agree (transformers fails otherwise)
    saved_tiles = processing.pop("max_image_tiles", max_tiles)
    if saved_tiles != max_tiles:
        where = saved_image_processor(Path(path).parent).where
        raise UnsupportedArchitecture(f"{where}: max_image_tiles is {saved_tiles}, but the image encoder takes "
                                      f"{max_tiles} tiles (vision_config.max_num_tiles)")
    args = MllamaVisionArgs(
        dim=cfg.int("hidden_size"), n_layers=cfg.int("num_hidden_layers"), n_global_layers=cfg.int("num_global_layers"),
        n_heads=cfg.int("attention_heads"), hidden_dim=cfg.int("intermediate_size"), image_size=image_size,
        patch_size=cfg.int("patch_size"), max_num_tiles=max_tiles,
        intermediate_layers=tuple(cfg.int_list("intermediate_layers_indices")),
        aspect_ratios=tuple((int(r), int(c)) for r, c in ratios), norm_eps=cfg.float("norm_eps", 1e-5),
        image_token_id=top.int("image_token_index", 128256), n_channels=channels, **processing)
    if cfg.int("vision_output_dim", args.output_dim) != args.output_dim:
        raise UnsupportedArchitecture(f"{path}: vision_config.vision_output_dim {cfg.int('vision_output_dim')} is not "
                                      f"hidden_size x (1 + intermediate layers) = {args.output_dim}")
    return args


def _llama4_vision(cfg: Fields, top: Fields, path) -> VisionArgs:
    """Llama4VisionConfig -> VisionArgs. HF names one width, intermediate_size, for both the encoder MLP
    and the pixel-shuffled adapter input; Meta's layout needs them equal, and the adapter square."""
    dim, ratio = cfg.int("hidden_size"), cfg.float("pixel_shuffle_ratio", 0.5)
    hidden = cfg.int("intermediate_size")
    out = cfg.int("projector_output_dim")
    if round(dim / ratio ** 2) != hidden:
        raise UnsupportedArchitecture(f"{path}: vision_config.intermediate_size {hidden} is not hidden_size / "
                                      f"pixel_shuffle_ratio^2 = {dim / ratio ** 2:g} (Meta's vision adapter)")
    for key in ("projector_input_dim", "vision_output_dim"):
        if cfg.int(key, out) != out:
            raise UnsupportedArchitecture(f"{path}: vision_config.{key} {cfg.int(key)} differs from "
                                          f"projector_output_dim {out}")
    if cfg.bool("multi_modal_projector_bias", False):
        raise UnsupportedArchitecture(f"{path}: vision_config.multi_modal_projector_bias is not supported")
    if cfg.str("hidden_act", "gelu") != "gelu":
        raise UnsupportedArchitecture(f"{path}: vision_config.hidden_act {cfg.str('hidden_act')!r} (herd has gelu)")
    theta = 10000.0
    for key in ("rope_parameters", "rope_scaling"):
        part = cfg.object(key, None)
        if part is not None:
            theta = part.float("rope_theta", theta)
    image_size, channels = cfg.int("image_size"), cfg.int("num_channels", 3)
    return VisionArgs(
        dim=dim, n_layers=cfg.int("num_hidden_layers"), n_heads=cfg.int("num_attention_heads"), hidden_dim=hidden,
        image_size=image_size, patch_size=cfg.int("patch_size"), output_dim=out,
        pixel_shuffle_ratio=ratio, rope_theta=theta, n_channels=channels,
        image_token_id=top.int("image_token_index", None) or top.int("image_token_id", 200092),
        **image_processing(Path(path).parent, "llama4", image_size, channels),
    )


# What transformers 5.23's image processors of the two families do with a key a saved processor leaves out
# (the class attributes of Llama4ImageProcessor and MllamaImageProcessor): AutoImageProcessor builds the
# processor from the saved keys over these, and so does herd.
_PROCESSOR_DEFAULTS = {
    "llama4": {"size": 336, "max_patches": 16, "resize_to_max_canvas": False, "image_mean": 0.5, "image_std": 0.5},
    "mllama": {"size": 224, "max_image_tiles": 4, "do_pad": True, "image_mean": 0.5, "image_std": 0.5},
}
_PROCESSOR_CLASSES = {
    "llama4": ("Llama4ImageProcessor", "Llama4ImageProcessorFast"),
    "mllama": ("MllamaImageProcessor", "MllamaImageProcessorFast", "MllamaImageProcessorPil"),
}
_PIL_FILTERS = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def saved_image_processor(directory: Path) -> Fields | None:
    """The settings of the image processor saved beside a checkpoint, where transformers' AutoImageProcessor
    finds them: nested under "image_processor" in processor_config.json (what transformers 5's
    ProcessorMixin.save_pretrained writes), else preprocessor_config.json (transformers 4's layout, and an
    image processor saved alone); one or the other, never merged. None when neither file holds them."""
    nested, flat = directory / "processor_config.json", directory / "preprocessor_config.json"
    try:
        if nested.is_file():
            part = Fields(read_json(nested, ConfigError), str(nested)).object("image_processor", None)
            if part is not None:
                return part
        if flat.is_file():
            return Fields(read_json(flat, ConfigError), str(flat))
    except FormatError as e:  # not JSON: the images cannot be prepared as the checkpoint says
        raise ConfigError(str(e)) from None
    return None


def _per_channel(p: Fields, key: str, default: float, channels: int, nonzero: bool = False) -> tuple[float, ...]:
    """image_mean / image_std: one number per channel, or one number for all (transformers broadcasts it)."""
    value = p.data.get(key, default)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value] * channels
    if not isinstance(value, list) or len(value) != channels or any(
            isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (nonzero and v == 0)
            for v in value):
        raise p.fail(key, f"{channels} finite numbers{', none of them 0' if nonzero else ''}", value)
    return tuple(float(v) for v in value)


def image_processing(directory: Path, family: str, image_size: int, channels: int = 3) -> dict:
    """The preprocessing the checkpoint's saved image processor (family "llama4" or "mllama") states, as
    keyword arguments of VisionArgs / MllamaVisionArgs: every setting that changes pixels or tile counts
    (size, max_patches / max_image_tiles, resize_to_max_canvas, resample, do_resize / do_rescale /
    do_normalize / do_pad, rescale_factor, image_mean, image_std), transformers' class defaults for the keys
    it leaves out. With no processor saved, {}: the released models' settings (the dataclasses' defaults).
    A value herd does not implement raises UnsupportedArchitecture naming the file and the key (and a
    malformed one ConfigError): herd prepares images as transformers would, or not at all. do_convert_rgb
    changes no RGB image; herd always converts (and composites transparency on white, as HF does)."""
    p = saved_image_processor(directory)
    if p is None:
        return {}
    defaults = _PROCESSOR_DEFAULTS[family]
    kind = p.str("image_processor_type", None)
    if kind is not None and kind not in _PROCESSOR_CLASSES[family]:
        raise UnsupportedArchitecture(f"{p.where}: image_processor_type {kind!r} is another model's; herd prepares "
                                      f"images as {' / '.join(_PROCESSOR_CLASSES[family])} does")
    for key in ("do_resize", "do_rescale", "do_normalize") + (("do_pad",) if family == "mllama" else ()):
        if p.bool(key, True) is not True:
            raise UnsupportedArchitecture(f"{p.where}: {key} is false; herd implements {family} preprocessing with "
                                          f"{key} true only (the model's tiles are always resized, rescaled, "
                                          "normalised and padded)")
    resample = p.int("resample", 2)
    if resample != 2:
        raise UnsupportedArchitecture(f"{p.where}: resample is {resample} ({_PIL_FILTERS.get(resample, 'unknown')}); "
                                      "herd resizes with bilinear filtering (2) only")
    size = p.data.get("size", defaults["size"])
    side = size if isinstance(size, int) and not isinstance(size, bool) else None
    if isinstance(size, dict) and size.keys() == {"height", "width"}:
        side = size["height"] if size["height"] == size["width"] else None
    if side != image_size:
        raise UnsupportedArchitecture(f"{p.where}: size is {json.dumps(size)}, but the image encoder takes tiles of "
                                      f"{image_size}x{image_size} pixels (vision_config.image_size)")
    rescale = p.float("rescale_factor", 1 / 255)
    if not (math.isfinite(rescale) and rescale > 0):
        raise p.fail("rescale_factor", "a finite positive number", rescale)
    out = {"rescale_factor": rescale,
           "image_mean": _per_channel(p, "image_mean", defaults["image_mean"], channels),
           "image_std": _per_channel(p, "image_std", defaults["image_std"], channels, nonzero=True)}
    tiles_key = "max_patches" if family == "llama4" else "max_image_tiles"
    tiles = p.int(tiles_key, defaults[tiles_key])
    if tiles <= 0:
        raise p.fail(tiles_key, "a positive integer", tiles)
    if family == "llama4":
        out.update(max_tiles=tiles, resize_to_max_canvas=p.bool("resize_to_max_canvas", False))
    else:
        out["max_image_tiles"] = tiles
    return out


def permute_for_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF rotate_half row order → Meta interleaved: row h·hd + c·hd/2 + i goes to h·hd + 2i + c."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def permute_for_rotate_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of permute_for_interleaved: Meta interleaved row order → HF rotate_half (for writing HF)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


LAYER_MAP = {
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    # Llama 4: dense layers, router and shared expert
    "feed_forward.gate_proj.weight": "feed_forward.w1.weight",
    "feed_forward.down_proj.weight": "feed_forward.w2.weight",
    "feed_forward.up_proj.weight": "feed_forward.w3.weight",
    "feed_forward.router.weight": "feed_forward.router.weight",
    "feed_forward.shared_expert.gate_proj.weight": "feed_forward.shared_expert.w1.weight",
    "feed_forward.shared_expert.down_proj.weight": "feed_forward.shared_expert.w2.weight",
    "feed_forward.shared_expert.up_proj.weight": "feed_forward.shared_expert.w3.weight",
}
VISION_PREFIXES = ("vision_model.", "multi_modal_projector.", "model.vision_model.", "model.multi_modal_projector.")
SKIPPED_PREFIXES = VISION_PREFIXES
# Llama4VisionModel names -> Meta's (llama-models vision/encoder.py, embedding.py), below vision_embeddings.
VISION_MAP = {
    "patch_embedding.linear.weight": "vision_encoder.conv1._linear.weight",
    "class_embedding": "vision_encoder.class_embedding",
    "positional_embedding_vlm": "vision_encoder.positional_embedding_vlm",
    "layernorm_pre.weight": "vision_encoder.ln_pre.weight", "layernorm_pre.bias": "vision_encoder.ln_pre.bias",
    "layernorm_post.weight": "vision_encoder.ln_post.weight", "layernorm_post.bias": "vision_encoder.ln_post.bias",
    "vision_adapter.mlp.fc1.weight": "vision_adapter.mlp.c_fc.weight",
    "vision_adapter.mlp.fc2.weight": "vision_adapter.mlp.c_proj.weight",
}
VISION_LAYER_MAP = {
    "self_attn.q_proj": "attn.wq", "self_attn.k_proj": "attn.wk", "self_attn.v_proj": "attn.wv",
    "self_attn.o_proj": "attn.wo", "input_layernorm": "ln_1", "post_attention_layernorm": "ln_2",
    "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
}


def vision_tensor_name(name: str) -> str | None:
    """An HF Llama 4 vision-tower tensor name -> herd's (Meta's), or None when it has no place."""
    key = name.removeprefix("model.")
    if key == "multi_modal_projector.linear_1.weight":
        return "vision_projection.weight"
    if not key.startswith("vision_model."):
        return None
    key = key.removeprefix("vision_model.")
    if key in VISION_MAP:
        return "vision_embeddings." + VISION_MAP[key]
    parts = key.split(".")
    if len(parts) in (5, 6) and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        module = VISION_LAYER_MAP.get(".".join(parts[3:-1]))
        if module is not None:
            return f"vision_embeddings.vision_encoder.transformer.resblocks.{int(parts[2])}.{module}.{parts[-1]}"
    return None


MLLAMA_VISION_MAP = {
    "class_embedding": "class_embedding",
    "gated_positional_embedding.embedding": "positional_embedding",
    "gated_positional_embedding.gate": "gated_positional_embedding_gate",
    "gated_positional_embedding.tile_embedding.weight": "gated_positional_embedding.embedding",
    "pre_tile_positional_embedding.embedding.weight": "pre_tile_pos_embed.embedding",
    "pre_tile_positional_embedding.gate": "pre_tile_pos_embed.gate",
    "post_tile_positional_embedding.embedding.weight": "post_tile_pos_embed.embedding",
    "post_tile_positional_embedding.gate": "post_tile_pos_embed.gate",
    "layernorm_pre.weight": "ln_pre.weight", "layernorm_pre.bias": "ln_pre.bias",
    "layernorm_post.weight": "ln_post.weight", "layernorm_post.bias": "ln_post.bias",
}
MLLAMA_VISION_LAYER_MAP = {**VISION_LAYER_MAP, "gate_attn": "gate_attn", "gate_ffn": "gate_ffn"}
MLLAMA_CROSS_MAP = {
    "cross_attn.q_proj.weight": "attention.wq.weight", "cross_attn.k_proj.weight": "attention.wk.weight",
    "cross_attn.v_proj.weight": "attention.wv.weight", "cross_attn.o_proj.weight": "attention.wo.weight",
    "cross_attn.q_norm.weight": "attention.q_norm.weight", "cross_attn.k_norm.weight": "attention.k_norm.weight",
    "cross_attn_attn_gate": "gate_attn", "cross_attn_mlp_gate": "gate_ffwd",
    "input_layernorm.weight": "attention_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight", "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
}


def _vision_layer_name(rest: str) -> str | None:
    """An HF vision encoder layer's tensor (below layers.N.) -> Meta's, or None."""
    if rest in MLLAMA_VISION_LAYER_MAP:  # the global layers' gates
        return MLLAMA_VISION_LAYER_MAP[rest]
    module, _, leaf = rest.rpartition(".")
    return f"{MLLAMA_VISION_LAYER_MAP[module]}.{leaf}" if module in MLLAMA_VISION_LAYER_MAP else None


TEXT_GLOBALS = {"embed_tokens.weight": "tok_embeddings.weight", "norm.weight": "norm.weight",
                "lm_head.weight": "output.weight"}


def text_model_key(key: str) -> str:
    """A text-model tensor's name without the wrappers of the *ForConditionalGeneration classes, which nest
    the text model as language_model.model.* (hub files) or model.language_model.* (transformers 5 in memory)."""
    while key.startswith(("language_model.", "model.")):
        key = key.split(".", 1)[1]
    return key


def mllama_tensors(raw: dict[str, Any], args: ModelArgs, hf_cross: list[int],
                   sources: dict[str, Path] | None = None) -> dict[str, Any]:
    """MllamaForConditionalGeneration names and layouts -> herd's (see herd.model.mllama): the self-attention
    layers renumbered without the cross-attention ones, q/k put in interleaved RoPE order, the patch
    convolution as Meta's unfold-linear."""
    def where(name: str) -> str:
        return f"{sources[name]}: tensor {name}" if sources and name in sources else f"tensor {name}"

    cross_index = {c: k for k, c in enumerate(sorted(hf_cross))}
    out: dict[str, Any] = {}
    for name, tensor in raw.items():
        key = name.removeprefix("model.")
        if key.startswith(("vision_model.", "multi_modal_projector.")):
            if args.vision is None:
                continue
            if key.startswith("multi_modal_projector."):
                out["vision_model.vision_projection." + key.split(".", 1)[1]] = tensor
                continue
            key = key.removeprefix("vision_model.")
            base = "vision_model.vision_encoder."
            parts = key.split(".")
            if key == "patch_embedding.weight":
                out[base + "conv1._linear.weight"] = tensor.reshape(tensor.shape[0], -1)
            elif key in MLLAMA_VISION_MAP:
                out[base + MLLAMA_VISION_MAP[key]] = tensor
            elif len(parts) >= 4 and parts[0] in ("transformer", "global_transformer") and parts[1] == "layers" \
                    and parts[2].isdigit() and _vision_layer_name(".".join(parts[3:])) is not None:
                rest = _vision_layer_name(".".join(parts[3:]))
                out[f"{base}{parts[0]}.resblocks.{int(parts[2])}.{rest}"] = tensor
            else:
                raise UnexpectedTensor(f"{where(name)}: no place for this tensor in Llama 3.2 Vision's image encoder")
            continue
        key = text_model_key(key)
        if key in TEXT_GLOBALS:
            out[TEXT_GLOBALS[key]] = tensor
        elif key.startswith("layers.") and key.split(".")[1].isdigit():
            _, index, rest = key.split(".", 2)
            index = int(index)
            if index in cross_index:
                if rest not in MLLAMA_CROSS_MAP:
                    raise UnexpectedTensor(f"{where(name)}: no place for this tensor in a cross-attention layer")
                out[f"cross_attention_layers.{cross_index[index]}.{MLLAMA_CROSS_MAP[rest]}"] = tensor
                continue
            if rest not in LAYER_MAP:
                raise UnexpectedTensor(f"{where(name)}: no place for this tensor in a Llama model")
            if rest in ("self_attn.q_proj.weight", "self_attn.k_proj.weight"):
                heads = args.n_heads if rest.startswith("self_attn.q") else args.n_kv_heads
                if tuple(tensor.shape) != (heads * args.head_dim, args.dim):
                    raise ShapeMismatch(f"{where(name)} has shape {tuple(tensor.shape)}, the config implies "
                                        f"{(heads * args.head_dim, args.dim)}")
                tensor = permute_for_interleaved(tensor, heads)
            out[f"layers.{index - sum(c < index for c in cross_index)}.{LAYER_MAP[rest]}"] = tensor
        elif not key.endswith("rotary_emb.inv_freq"):
            raise UnexpectedTensor(f"{where(name)}: no place for this tensor in a Llama model")
    return out


def canonical_tensors(raw: dict[str, Any], args: ModelArgs, sources: dict[str, Path] | None = None,
                      lazy: bool = False) -> dict[str, torch.Tensor]:
    """HF names and layouts -> herd's. `sources` (tensor name -> shard file) names the file in errors. `lazy`
    leaves q/k in their stored row order, permuted when read (herd.formats.slices.InterleavedRows)."""
    out: dict[str, torch.Tensor] = {}

    def where(name: str) -> str:
        return f"{sources[name]}: tensor {name}" if sources and name in sources else f"tensor {name}"

    def expect(name: str, tensor, shape: tuple[int, ...]) -> None:
        # checked before any reshape, which would otherwise fail with a bare RuntimeError
        if tuple(tensor.shape) != shape:
            raise ShapeMismatch(f"{where(name)} has shape {tuple(tensor.shape)}, the config implies {shape}")

    hd = args.head_dim
    for name, tensor in raw.items():
        if name.startswith(VISION_PREFIXES):
            if args.vision is None:
                continue  # loaded as text only (args_from_hf_config decided)
            herd_name = vision_tensor_name(name)
            if herd_name is None:
                raise UnexpectedTensor(f"{where(name)}: no place for this tensor in Llama 4's vision encoder")
            out[herd_name] = tensor
            continue
        if name.endswith("rotary_emb.inv_freq"):
            continue
        key = name
        key = text_model_key(key)
        if key in TEXT_GLOBALS:
            out[TEXT_GLOBALS[key]] = tensor
        elif key.startswith("layers.") and key.count(".") >= 2 and key.split(".")[1].isdigit():
            _, index, rest = key.split(".", 2)
            prefix = f"layers.{int(index)}."
            if rest == "feed_forward.experts.gate_up_proj":  # [E, D, 2F], x @ W, gate first
                if tensor.dim() != 3 or tensor.shape[-1] % 2:
                    raise ShapeMismatch(f"{where(name)} has shape {tuple(tensor.shape)}, expected [experts, dim, 2F]")
                gate, up = tensor.chunk(2, dim=-1)
                out[prefix + "feed_forward.experts.w1"] = gate.transpose(1, 2)
                out[prefix + "feed_forward.experts.w3"] = up.transpose(1, 2)
            elif rest == "feed_forward.experts.down_proj":  # [E, F, D]
                if tensor.dim() != 3:
                    raise ShapeMismatch(f"{where(name)} has shape {tuple(tensor.shape)}, expected [experts, F, dim]")
                out[prefix + "feed_forward.experts.w2"] = tensor.transpose(1, 2)
            elif rest in LAYER_MAP:
                if not args.is_llama4 and rest == "self_attn.q_proj.weight":
                    expect(name, tensor, (args.n_heads * hd, args.dim))
                    tensor = _interleaved(tensor, args.n_heads, lazy)
                elif not args.is_llama4 and rest == "self_attn.k_proj.weight":
                    expect(name, tensor, (args.n_kv_heads * hd, args.dim))
                    tensor = _interleaved(tensor, args.n_kv_heads, lazy)
                out[prefix + LAYER_MAP[rest]] = tensor
            else:
                raise UnexpectedTensor(f"{where(name)}: no place for this tensor in a Llama model")
        else:
            raise UnexpectedTensor(f"{where(name)}: no place for this tensor in a Llama model")
    return out


def _interleaved(w: torch.Tensor, n_heads: int, lazy: bool):
    if lazy:
        from herd.formats.slices import InterleavedRows

        return InterleavedRows(w, n_heads)
    return permute_for_interleaved(w, n_heads)


# safetensors dtype -> bytes per element (the format's own list; sub-byte types are left to the library)
_ST_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
                "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}
_ST_MAX_HEADER = 100_000_000  # the safetensors library's own limit


def check_safetensors(path: Path) -> dict[str, dict]:
    """Read and check a safetensors header (u64 length, JSON object, data) before the library maps the
    file, so that each way it can be wrong gets its own message. Returns the tensor entries."""
    size = path.stat().st_size
    if size < 8:
        raise TruncatedFile(f"{path}: {size} bytes, shorter than a safetensors header")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > _ST_MAX_HEADER:
            raise FormatError(f"{path}: the safetensors header claims {n} bytes (limit {_ST_MAX_HEADER}); not a safetensors file")
        if 8 + n > size:
            raise TruncatedFile(f"{path}: the safetensors header needs {n} bytes, but the file ends after {size - 8}")
        text = f.read(n)
    try:
        header = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise FormatError(f"{path}: the safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: the safetensors header is a JSON {type(header).__name__}, expected an object")
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise FormatError(f"{path}: header entry for tensor {name} is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str):
            raise FormatError(f"{path}: tensor {name} has no dtype string (got {dtype!r})")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise FormatError(f"{path}: tensor {name} has shape {shape!r}, not a list of sizes")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
                or offsets[0] > offsets[1]):
            raise FormatError(f"{path}: tensor {name} has data_offsets {offsets!r}, not [begin, end]")
        itemsize = _ST_ITEMSIZE.get(dtype)
        if itemsize is not None and math.prod(shape) * itemsize != offsets[1] - offsets[0]:
            raise FormatError(
                f"{path}: tensor {name} declares {dtype} {shape} = {math.prod(shape) * itemsize} bytes, "
                f"but its data_offsets span {offsets[1] - offsets[0]} bytes"
            )
        entries[name] = info
    data = size - 8 - n
    end, last = 0, None
    for name, info in sorted(entries.items(), key=lambda e: tuple(e[1]["data_offsets"])):
        begin, stop = info["data_offsets"]
        if begin < end:
            raise FormatError(f"{path}: tensors {last} and {name} overlap (bytes {begin}..{min(end, stop)} of the data)")
        if begin > end:
            raise FormatError(f"{path}: {begin - end} unused bytes before tensor {name} (safetensors data is contiguous)")
        if stop > data:
            raise TruncatedFile(
                f"{path}: data ends before tensor {name}: it needs bytes {begin}..{stop} of the data, which has {data}"
            )
        end, last = stop, name
    if end != data:
        raise FormatError(f"{path}: {data - end} bytes after the last tensor's data; the header does not describe them")
    return entries


def _open_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    check_safetensors(path)
    try:
        return load_file(str(path))  # memory-mapped: tensors share the file's pages until copied
    except SafetensorError as e:
        raise FormatError(f"{path}: cannot read as safetensors ({e})") from None
    except Exception as e:  # e.g. a dtype torch has no type for
        raise FormatError(f"{path}: cannot read as safetensors ({e})") from None


def _safetensors_names(path: Path) -> list[str]:
    return list(check_safetensors(path))


def read_hf(path: Path, lazy: bool = False) -> Checkpoint:
    """`lazy`: q/k rows are permuted when read, not here (see canonical_tensors)."""
    config = read_json(path / "config.json", ConfigError)
    index = path / "model.safetensors.index.json"
    weight_map = None
    if index.is_file():
        weight_map = Fields(read_json(index), str(index), FormatError).object("weight_map").data
        bad = next(((k, v) for k, v in weight_map.items() if not isinstance(v, str) or Path(v).name != v), None)
        if bad:
            raise FormatError(f"{index}: weight_map[{bad[0]!r}] = {bad[1]!r} is not the name of a file next to it")
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        if list(path.glob("*.bin")):
            raise FormatError(f"{path}: only PyTorch .bin weights; herd reads safetensors (convert them first)")
        raise MissingTensor(f"{path}: no .safetensors files")
    for name in files:
        if not (path / name).is_file():
            raise MissingTensor(f"{path}: the index names {name}, which is missing")
    # the headers first (no data is touched): the config is checked against the tensor names they list
    names = {n: path / f for f in files for n in _safetensors_names(path / f)}
    args = args_from_hf_config(config, path / "config.json", list(names))
    raw: dict[str, torch.Tensor] = {}
    for name in files:
        raw.update(_open_safetensors(path / name))
    if weight_map is not None:
        missing = set(weight_map) - set(raw)
        if missing:
            raise MissingTensor(f"{path}: tensors listed in the index are absent: {sorted(missing)[:5]}")
    return Checkpoint(
        args=args,
        tensors=mllama_tensors(raw, args, _hf_cross_layers(config), names) if args.cross_attention_layers
        else canonical_tensors(raw, args, names, lazy),
        format="hf",
        path=path,
        tokenizer=_tokenizer_source(path),
        chat_template=read_chat_template(path),
        generation=guess_generation(args),
        quantization=", ".join(sorted({str(t.dtype).removeprefix("torch.") for t in raw.values()})),
        eos_token_ids=_eos_ids(path, config),
        metadata={"architectures": config.get("architectures"), "name": config.get("_name_or_path", path.name),
                  **_vision_note(config, args, path, names)},
    )


def _hf_cross_layers(config: dict) -> list[int]:
    return list((config.get("text_config") or {}).get("cross_attention_layers") or [])


def _vision_note(config: dict, args: ModelArgs, path: Path, names) -> dict:
    """A vision checkpoint whose image weights are absent, or whose vision config herd cannot build, runs as
    text only, and says so."""
    if "vision_config" not in config or args.vision is not None:
        return {}
    reason = "the checkpoint has none of its weights"
    if any(n.startswith(VISION_PREFIXES) for n in names):
        top = Fields(config, str(path / "config.json"))
        build = _mllama_vision if args.cross_attention_layers else _llama4_vision
        try:
            build(top.object("vision_config"), top, path / "config.json")
        except (UnsupportedArchitecture, ConfigError) as e:
            reason = f"herd cannot build it ({e})"
    note = f"{path}: the config describes an image encoder, but {reason}; loaded as a text-only model"
    import warnings

    warnings.warn(f"herd: {note}", stacklevel=3)
    return {"note": note}


def _tokenizer_source(path: Path) -> TokenizerSource | None:
    tok_config = read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").is_file() else {}
    if (path / "tokenizer.json").is_file():
        return TokenizerSource("hf_json", path / "tokenizer.json", config=tok_config)
    model = path / "tokenizer.model"
    if not model.is_file() and (path / "original" / "tokenizer.model").is_file():
        model = path / "original" / "tokenizer.model"
    if model.is_file():
        kind = "tiktoken" if _looks_like_tiktoken(model) else "sentencepiece"
        return TokenizerSource(kind, model, config=tok_config)
    return None


def _looks_like_tiktoken(path: Path) -> bool:
    with open(path, "rb") as f:
        first = f.readline(200).split()
    return len(first) == 2 and first[1].isdigit()


def read_chat_template(path: Path) -> str | None:
    """The chat template of an HF-style directory: chat_template.jinja, else tokenizer_config.json's (the
    "default" of named variants)."""
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        try:
            return jinja.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise FormatError(f"{jinja}: not UTF-8 text ({e.reason})") from None
    config = path / "tokenizer_config.json"
    if not config.is_file():
        return None
    template = read_json(config).get("chat_template")
    if isinstance(template, list):  # named variants: take "default"
        named = [t for t in template if isinstance(t, dict) and isinstance(t.get("name"), str)
                 and isinstance(t.get("template"), str)]
        if len(named) != len(template):
            raise FormatError(f"{config}: chat_template is a list, but not of {{\"name\", \"template\"}} strings")
        template = next((t["template"] for t in named if t["name"] == "default"), None)
    if template is not None and not isinstance(template, str):
        raise FormatError(f"{config}: chat_template must be a string or a list of named templates, "
                          f"got {json.dumps(template)[:60]}")
    return template


def _eos_ids(path: Path, config: dict) -> tuple[int, ...]:
    ids: list[int] = []
    text = config.get("text_config", config)
    sources = [(text, path / "config.json")]
    if (path / "generation_config.json").is_file():
        sources.append((read_json(path / "generation_config.json", ConfigError), path / "generation_config.json"))
    for source, file in sources:
        eos = source.get("eos_token_id")
        if isinstance(eos, int) and not isinstance(eos, bool):
            eos = [eos]
        if eos is None:
            continue
        if not isinstance(eos, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in eos):
            raise ConfigError(f"{file}: field 'eos_token_id' must be a token id or a list of them, got {eos!r}")
        ids += eos
    return tuple(dict.fromkeys(ids))


def guess_generation(args: ModelArgs) -> str:
    """Which Llama generation these facts describe (chooses the built-in chat format)."""
    if args.is_llama4:
        return "4"
    if args.cross_attention_layers:
        return "3.2"  # Llama 3.2 Vision
    if args.vocab_size >= 128256:
        if args.rope_scaling is None:
            return "3"
        return "3.2" if args.tie_embeddings else "3.1"
    if args.vocab_size == 32000:
        return "1" if args.norm_eps < 5e-6 else "2"
    return "unknown"
