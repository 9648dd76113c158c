"""GGUF image projector files (`mmproj`, llama.cpp's multimodal layout) joined to the text model they serve.

llama.cpp splits a Llama 4 GGUF in two (convert_hf_to_gguf.py, and `--mmproj` for the second): the text model,
and an `mmproj` file of general.architecture "clip" holding the image encoder and its projector. What the file
holds, as llama.cpp writes (conversion/llama4.py Llama4VisionModel, gguf-py constants/tensor_mapping) and runs it
(tools/mtmd/clip.cpp, PROJECTOR_TYPE_LLAMA4, build_llama4):

- metadata `clip.projector_type` "llama4" (older files: `clip.vision.projector_type`); `clip.vision.*`:
  embedding_length, block_count, attention.head_count, feed_forward_length, image_size, patch_size,
  attention.layer_norm_epsilon, projection_dim (the text model's width), projector.scale_factor (1 / the pixel
  shuffle ratio), image_mean / image_std. The 2D RoPE theta is not stored: clip.cpp fixes it at 10000.
- tensors: `v.patch_embd.weight` (the unfold-then-linear patch embedding, [dim, 3·p·p]), `v.class_embd`,
  `v.position_embd.weight` ([patches + 1, dim], the class token's row last), `v.pre_ln` / `v.post_ln`
  (LayerNorms with biases), per block `v.blk.N.{ln1, attn_q, attn_k, attn_v, attn_out, ln2, ffn_up, ffn_down}`
  (weights and biases), the adapter `mm.model.mlp.1` / `mm.model.mlp.2` (no biases, GELU after each) and the
  projection to the text width `mm.model.fc`.
- the computation (build_llama4): patches, the class token appended last, positions added, pre-LayerNorm, the
  ViT blocks with 2D RoPE (the first half of each head turns with the patch's column, the second with its row),
  post-LayerNorm, the class token dropped, pixel shuffle, the adapter MLP, the projection: herd.model.vision.
- in the text, each image is `<|image_start|>` [per tile row: the tiles' patches separated by
  `<|tile_x_separator|>`, then `<|tile_y_separator|>`] `<|image|>` (the whole-image overview's patches)
  `<|image_end|>`, the tile part only with more than one tile: herd.chat's llama4_image_tokens.

The converter cached with herd (llama.cpp 0.3.36's) names each block's pre-FFN LayerNorm (HF's
post_attention_layernorm) `v.blk.N.attn_post_norm` instead of `ln2`: gemma4's tensor mapping claims the same HF
name later in gguf-py's table. Llama 4's blocks have no norm on the attention output, so in a llama4 projector
that name can only be the pre-FFN norm and is read as such (HF's Llama4VisionEncoderLayer is the reference).

llama-server 0.3.36 loads such a file but runs it as another model: it applies `attn_post_norm` to the attention
output (clip.cpp's build_vit, gemma4's meaning) and finds no pre-FFN norm (renaming the tensors `ln2` changes its
answers), and for a one-tile image it leaves out the `<|image|>` token HF's processor puts before the overview's
patches. So herd is checked against HF transformers, not against llama-server, for images.

Tiles are cut as HF's Llama4ImageProcessor cuts them (herd.images.preprocess_llama4, up to 16 tiles, as the
released preprocessor_config.json), not by llama.cpp's own slicing, and normalised with the file's image_mean /
image_std (Llama 4's are 0.5).

Every metadata value is type-checked before use: a wrong one is a FormatError naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any

from herd.config import VisionArgs
from herd.errors import (
    ConfigError,
    FormatError,
    MissingTensor,
    ModelNotFound,
    ShapeMismatch,
    UnexpectedTensor,
    UnsupportedArchitecture,
)
from herd.formats.checkpoint import Checkpoint
from herd.formats.fields import check_layer_count, naming

_ENCODER = "vision_embeddings.vision_encoder."
_GLOBAL = {
    "v.patch_embd.weight": _ENCODER + "conv1._linear.weight",
    "v.class_embd": _ENCODER + "class_embedding",
    "v.position_embd.weight": _ENCODER + "positional_embedding_vlm",
    "v.pre_ln.weight": _ENCODER + "ln_pre.weight",
    "v.pre_ln.bias": _ENCODER + "ln_pre.bias",
    "v.post_ln.weight": _ENCODER + "ln_post.weight",
    "v.post_ln.bias": _ENCODER + "ln_post.bias",
    "mm.model.mlp.1.weight": "vision_embeddings.vision_adapter.mlp.c_fc.weight",
    "mm.model.mlp.2.weight": "vision_embeddings.vision_adapter.mlp.c_proj.weight",
    "mm.model.fc.weight": "vision_projection.weight",
}
_BLOCK_PARTS = {
    "ln1": "ln_1", "ln2": "ln_2", "attn_post_norm": "ln_2",  # attn_post_norm: see the module doc
    "attn_q": "attn.wq", "attn_k": "attn.wk", "attn_v": "attn.wv", "attn_out": "attn.wo",
    "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj",
}
_BLOCK = re.compile(r"v\.blk\.(\d+)\.([a-z_0-9]+)\.(weight|bias)")

# VisionArgs field -> the metadata key it comes from, for messages about impossible values
_KEYS = {
    "vision.dim": "clip.vision.embedding_length", "vision.n_layers": "clip.vision.block_count",
    "vision.n_heads": "clip.vision.attention.head_count", "vision.hidden_dim": "clip.vision.feed_forward_length",
    "vision.image_size": "clip.vision.image_size", "vision.patch_size": "clip.vision.patch_size",
    "vision.pixel_shuffle_ratio": "clip.vision.projector.scale_factor",
    "vision.norm_eps": "clip.vision.attention.layer_norm_epsilon", "vision.output_dim": "mm.model.mlp.2.weight",
}
LLAMA4_MEAN_STD = (0.5, 0.5, 0.5)
_REQUIRED = object()


def _typed(md: dict[str, Any], path: Path, key: str, kind: type, default: Any = _REQUIRED) -> Any:
    """md[key] checked to be a `kind` (float: any number; bool only for bool): a FormatError names the file,
    the key and what it holds otherwise, a ConfigError a required key that is missing."""
    if key not in md:
        if default is _REQUIRED:
            raise ConfigError(f"{path}: the image projector's metadata lacks {key}")
        return default
    value = md[key]
    types = (int, float) if kind is float else kind
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, types):
        what = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[kind]
        raise FormatError(f"{path}: {key} should be {what}, got {_shown(value)}")
    return value


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def projector_type(md: dict[str, Any], path: Path | None = None) -> str | None:
    """clip.projector_type (older files: clip.vision.projector_type); with `path`, one of another type is an
    error naming the key."""
    key = "clip.projector_type" if "clip.projector_type" in md else "clip.vision.projector_type"
    value = md.get(key)
    if path is not None and value is not None and not isinstance(value, str):
        raise FormatError(f"{path}: {key} should be a string, got {_shown(value)}")
    return value if isinstance(value, str) else None


def _per_channel(md: dict[str, Any], path: Path, key: str, nonzero: bool) -> tuple[float, ...]:
    values = md.get(key, list(LLAMA4_MEAN_STD))
    if not isinstance(values, list) or len(values) != 3 or any(
            isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (nonzero and v == 0)
            for v in values):
        raise FormatError(f"{path}: {key} should be 3 finite numbers{', none of them 0' if nonzero else ''} (one "
                          f"per colour channel), got {_shown(values)}")
    return tuple(float(v) for v in values)


def _vision_args(md: dict[str, Any], tensors: dict[str, Any], path: Path, image_token_id: int | None) -> VisionArgs:
    def get(key: str, kind: type = int, default: Any = _REQUIRED):
        return _typed(md, path, key, kind, default)

    if get("clip.has_vision_encoder", bool, None) is not True:
        raise UnsupportedArchitecture(f"{path}: the projector file has no image encoder (clip.has_vision_encoder "
                                      f"is {md.get('clip.has_vision_encoder')!r})")
    mean = _per_channel(md, path, "clip.vision.image_mean", nonzero=False)
    std = _per_channel(md, path, "clip.vision.image_std", nonzero=True)
    if get("clip.use_gelu", bool, True) is not True:
        raise UnsupportedArchitecture(f"{path}: clip.use_gelu is {md.get('clip.use_gelu')!r}; Llama 4's encoder "
                                      "uses GELU")
    scale = get("clip.vision.projector.scale_factor", int, 2)
    if scale <= 0:
        raise ConfigError(f"{path}: clip.vision.projector.scale_factor must be positive, got {scale}")
    adapter_out = tensors.get("mm.model.mlp.2.weight")
    if adapter_out is None:
        raise MissingTensor(f"{path}: missing tensor mm.model.mlp.2.weight (the vision adapter's output layer)")
    dim = get("clip.vision.embedding_length")
    extra = {"image_token_id": image_token_id} if image_token_id is not None else {}
    with naming(path, _KEYS):
        return VisionArgs(
            dim=dim,
            n_layers=get("clip.vision.block_count"),
            n_heads=get("clip.vision.attention.head_count"),
            hidden_dim=get("clip.vision.feed_forward_length"),
            image_size=get("clip.vision.image_size"),
            patch_size=get("clip.vision.patch_size"),
            output_dim=adapter_out.shape[0],
            pixel_shuffle_ratio=1.0 / scale,
            rope_theta=10000.0,  # not in the file: clip.cpp fixes it for llama4
            norm_eps=float(get("clip.vision.attention.layer_norm_epsilon", float, 1e-5)),
            image_mean=mean, image_std=std,
            **extra,
        )


def _canonical(name: str, n_layers: int, path: Path) -> str:
    if name in _GLOBAL:
        return _GLOBAL[name]
    m = _BLOCK.fullmatch(name)
    if m and m[2] in _BLOCK_PARTS and int(m[1]) < n_layers:
        return f"{_ENCODER}transformer.resblocks.{int(m[1])}.{_BLOCK_PARTS[m[2]]}.{m[3]}"
    raise UnexpectedTensor(f"{path}: tensor {name} has no place in a llama4 image projector with {n_layers} blocks")


def read_projector(path: Path, text: Checkpoint, image_token_id: int | None = None
                   ) -> tuple[VisionArgs, dict[str, Any], dict[str, Any]]:
    """(VisionArgs, tensors under herd's names, general metadata) of a llama4 mmproj for the text model `text`."""
    from herd.formats.gguf import read_gguf_parts

    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelNotFound(f"{path}: no such image projector file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise FormatError(f"{path}: not a GGUF image projector file (starts with {magic!r})")
    version, md, raw, types = read_gguf_parts(path)
    arch = md.get("general.architecture")
    if arch != "clip":
        raise UnsupportedArchitecture(f"{path}: not an image projector file: its general.architecture is "
                                      f"{_shown(arch)}, an mmproj's is 'clip'")
    kind = projector_type(md, path)
    if kind != "llama4":
        raise UnsupportedArchitecture(f"{path}: image projector type {kind!r}: herd implements 'llama4' only "
                                      "(Llama 4's encoder); this mmproj belongs to another model family")
    check_layer_count(md.get("clip.vision.block_count"), raw, r"v\.blk\.(\d+)\.", path, "clip.vision.block_count")
    vision = _vision_args(md, raw, path, image_token_id)
    tensors: dict[str, Any] = {}
    for name, t in raw.items():
        canonical = _canonical(name, vision.n_layers, path)
        if canonical in tensors:  # ln2 and attn_post_norm both, or blk.7 and blk.07
            raise FormatError(f"{path}: tensor {name} is a second {canonical}")
        tensors[canonical] = t
    width = _typed(md, path, "clip.vision.projection_dim", int, None)
    projection = tensors.get("vision_projection.weight")
    if width is not None and width != text.args.dim:
        raise ShapeMismatch(f"{path}: the projector maps images to width {width} (clip.vision.projection_dim), but "
                            f"the text model {text.path.name} is {text.args.dim} wide")
    if projection is not None and tuple(projection.shape) != (text.args.dim, vision.output_dim):
        raise ShapeMismatch(f"{path}: mm.model.fc.weight has shape {tuple(projection.shape)}; the text model "
                            f"{text.path.name} ({text.args.dim} wide) needs {(text.args.dim, vision.output_dim)}")
    metadata = {k: v for k, v in md.items() if k.startswith("general.")}
    metadata["gguf.version"] = version
    metadata["quantization"] = ", ".join(f"{n} ×{c}" for n, c in types.most_common())
    return vision, tensors, metadata


def _token_id(checkpoint: Checkpoint, text: str) -> int | None:
    md = checkpoint.tokenizer.gguf_metadata if checkpoint.tokenizer is not None else None
    tokens = (md or {}).get("tokenizer.ggml.tokens")
    try:
        return tokens.index(text) if isinstance(tokens, list) else None
    except ValueError:
        return None


def attach_projector(checkpoint: Checkpoint, path: str | Path) -> Checkpoint:
    """The text GGUF `checkpoint` with the image encoder of the mmproj at `path`: VisionArgs in its args, the
    encoder's tensors among its own (the loader checks each against the model, the fingerprint covers them)."""
    path = Path(path).expanduser()
    if checkpoint.format != "gguf":
        raise UnsupportedArchitecture(f"{path}: an mmproj goes with a GGUF text model; {checkpoint.path} is "
                                      f"{checkpoint.format}, whose image weights live in the checkpoint itself")
    if checkpoint.args.vision is not None or checkpoint.args.cross_attention_layers:
        raise UnsupportedArchitecture(f"{checkpoint.path} has an image encoder already; no mmproj is needed")
    if not checkpoint.args.is_llama4:
        raise UnsupportedArchitecture(f"{path}: a llama4 image projector, but {checkpoint.path.name} is not a "
                                      "Llama 4 text model")
    # the token the image features replace, looked up by name as llama.cpp's mtmd does
    vision, tensors, metadata = read_projector(path, checkpoint, _token_id(checkpoint, "<|patch|>"))
    clash = sorted(set(tensors) & set(checkpoint.tensors))
    if clash:
        raise FormatError(f"{path}: tensor(s) {clash[:4]} are in the text model {checkpoint.path.name} already")
    return dataclasses.replace(
        checkpoint,
        args=dataclasses.replace(checkpoint.args, vision=vision),
        tensors={**checkpoint.tensors, **tensors},
        quantization=f"{checkpoint.quantization}; mmproj: {metadata['quantization']}",
        metadata={**checkpoint.metadata, "mmproj": str(path)},
        projector=path,
    )


__all__ = ["attach_projector", "read_projector", "projector_type"]
