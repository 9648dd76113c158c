"""Meta's original Llama 3.2 Vision checkpoints (params.json with vision_num_cross_attention_layers).

Facts from llama-models models/llama3/multimodal/model.py (CrossAttentionTransformer) and args.py, and from
transformers' models/mllama/convert_mllama_weights_to_hf.py, which turns these files into HF's:
- tensors are `text_model.*` (a Llama 3 text model in Meta's names, q/k already in RoPE-interleaved order, plus
  `learnable_embedding` [8, dim]: the rows of ids vocab_size.. (<|image|> is the first, 128256), and
  `cross_attention_layers.N.*`, whose q/k carry no RoPE) and `vision_model.{vision_encoder, vision_projection}.*`,
  whose names are herd's (herd.model.mllama keeps Meta's module names);
- cross-attention layer k runs before self-attention layer fusion_schedule[k] (`_init_fusion_schedule`);
- the aspect-ratio tables (pre/post tile embeddings [T, T, 1, dim], gated_positional_embedding [T, T, P, dim])
  are indexed by (rows, columns) there; herd's, as HF's, by arrangement id (the converter's
  `pre_compute_positional_embedding`);
- the encoder's shape is fixed in Meta's code, not in params.json: 16 heads, patch 14, 32 + 8 layers of width 1280,
  and the projector reads the *inputs* of local layers 3, 7, 15, 23, 30 (`ImageTransformer.forward` appends x
  before running block idx). herd reads every size the tensors show from the tensors, and takes the heads and
  those layers from Meta's code.
"""

from __future__ import annotations

import math

import torch

from herd.config import MllamaVisionArgs
from herd.errors import ConfigError, MissingTensor, ShapeMismatch, UnexpectedTensor, UnsupportedArchitecture
from herd.formats.fields import Fields, check_layer_count

VISION_HEADS = 16  # VisionEncoder(heads=16) in Meta's code, and HF's converter
# Meta's return_intermediate: the inputs of these local layers, i.e. the outputs of the layers before them,
# which is what herd's VisionEncoder keeps (MllamaVisionArgs.intermediate_layers: outputs of layer i).
RETURN_INTERMEDIATE = (3, 7, 15, 23, 30)
LEARNABLE_ROWS = 8  # max(model-parallel size, 8) rows in Meta's code: read from the tensor, written as 8
TEXT = "text_model."
VISION = "vision_model."
ENCODER = "vision_model.vision_encoder."
# Meta's aspect-ratio tables (below vision_encoder.) -> herd's
TILE_TABLES = {"pre_tile_pos_embed.embedding": "pre_tile_pos_embed.embedding",
               "post_tile_pos_embed.embedding": "post_tile_pos_embed.embedding",
               "gated_positional_embedding": "gated_positional_embedding.embedding"}

# Model-parallel split of each tensor (dim to concatenate the shards on); every other tensor is replicated.
# Meta's Column/RowParallelLinear and VocabParallelEmbedding, as the converter's get_concat_dim reads them.
_SPLIT_ROWS = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "feed_forward.w1.weight",
               "feed_forward.w3.weight", "attn.wq.weight", "attn.wk.weight", "attn.wv.weight", "mlp.c_fc.weight",
               "mlp.c_fc.bias")
_SPLIT_COLUMNS = ("attention.wo.weight", "feed_forward.w2.weight", "attn.wo.weight", "mlp.c_proj.weight")
_SPLIT_ROWS_NAMED = ("text_model.tok_embeddings.weight", "text_model.learnable_embedding.weight",
                     "text_model.output.weight", "vision_model.vision_encoder.conv1._linear.weight",
                     "vision_model.vision_projection.weight", "vision_model.vision_projection.bias")


def is_mllama(params: dict) -> bool:
    return bool(cross_layer_count(params))


def cross_layer_count(params: dict):
    """params.json's vision_num_cross_attention_layers, or the nested form llama-models' ModelArgs also reads
    (vision_model.cross_attention_adapter.num_layers)."""
    nested = params.get("vision_model")
    if isinstance(nested, dict) and isinstance(nested.get("cross_attention_adapter"), dict):
        return nested["cross_attention_adapter"].get("num_layers")
    count = params.get("vision_num_cross_attention_layers")
    return None if count in (None, -1) else count


def shard_concat_dim(name: str) -> int | None:
    if name in _SPLIT_ROWS_NAMED:
        return 0
    if name.startswith((TEXT + "layers.", TEXT + "cross_attention_layers.", ENCODER + "transformer.",
                        ENCODER + "global_transformer.")):
        if name.endswith(_SPLIT_ROWS):
            return 0
        if name.endswith(_SPLIT_COLUMNS):
            return 1
    return None


def fusion_schedule(n_layers: int, n_cross: int) -> list[int]:
    """The self-attention layers a cross-attention layer runs before: spread uniformly, ending at the last one
    (CrossAttentionTransformerText._init_fusion_schedule)."""
    step = math.ceil(n_layers / n_cross)
    return list(range(n_layers))[::-1][::step][:n_cross][::-1]


def text_view(tensors: dict) -> dict:
    """The text model's self-attention tensors under the names a Llama 3 checkpoint has (for the shared checks)."""
    return {n[len(TEXT):]: t for n, t in tensors.items()
            if n.startswith(TEXT) and not n.startswith(TEXT + "cross_attention_layers.")}


def mllama_fields(params: dict, p: Fields, tensors: dict, path, n_layers: int, vocab: int) -> dict:
    """The ModelArgs fields Llama 3.2 Vision adds to its text model's."""
    n_cross = cross_layer_count(params)
    if isinstance(n_cross, bool) or not isinstance(n_cross, int) or n_cross <= 0:
        raise ConfigError(f"{path}: field 'vision_num_cross_attention_layers' must be a positive integer, "
                          f"got {n_cross!r}")
    schedule = fusion_schedule(n_layers, n_cross)
    if len(schedule) != n_cross:
        raise UnsupportedArchitecture(f"{path}: {n_cross} cross-attention layers cannot be spread over {n_layers} "
                                      f"layers by Meta's fusion schedule (it places {len(schedule)})")
    cross_names = [n[len(TEXT):] for n in tensors if n.startswith(TEXT + "cross_attention_layers.")]
    check_layer_count(n_cross, cross_names, r"cross_attention_layers\.(\d+)\.", path,
                      "vision_num_cross_attention_layers")
    learnable = tensors.get(TEXT + "learnable_embedding.weight")
    if learnable is None:
        raise MissingTensor(f"{path}: no text_model.learnable_embedding.weight (the rows of <|image|> and the "
                            "other ids past vocab_size)")
    if learnable.dim() != 2 or learnable.shape[1] != p.int("dim"):
        raise ShapeMismatch(f"{path}: text_model.learnable_embedding.weight has shape {tuple(learnable.shape)}, "
                            f"expected [rows, dim {p.int('dim')}]")
    return dict(cross_attention_layers=tuple(schedule), extra_embeddings=int(learnable.shape[0]),
                vision=vision_args(p, tensors, path, vocab))


def _tensor(tensors: dict, name: str, path, dims: int) -> torch.Tensor:
    if name not in tensors:
        raise MissingTensor(f"{path}: missing tensor {name} of the image encoder")
    t = tensors[name]
    if t.dim() != dims:
        raise ShapeMismatch(f"{path}: {name} has shape {tuple(t.shape)}; expected {dims} dimensions")
    return t


def _count(tensors: dict, prefix: str) -> int:
    ids = {int(n[len(prefix):].split(".", 1)[0]) for n in tensors
           if n.startswith(prefix) and n[len(prefix):].split(".", 1)[0].isdigit()}
    if ids != set(range(len(ids))):
        raise MissingTensor(f"{prefix}N: the checkpoint holds blocks {sorted(ids)[:8]}..., not 0..{len(ids) - 1}")
    return len(ids)


def aspect_ratios(max_tiles: int) -> tuple[tuple[int, int], ...]:
    """Every arrangement of at most max_tiles tiles, numbered from 1 in this order (HF MllamaImageProcessor's
    get_all_supported_aspect_ratios, which the converter's tables follow)."""
    return tuple((a, b) for a in range(1, max_tiles + 1) for b in range(1, max_tiles + 1) if a * b <= max_tiles)


def vision_args(p: Fields, tensors: dict, path, vocab: int) -> MllamaVisionArgs | None:
    """The encoder's sizes: from the tensors where they show, from Meta's code where they do not. None when the
    checkpoint has no image weights (read_meta's note says so)."""
    if not any(n.startswith(VISION) for n in tensors):
        return None
    return _vision_args(p, tensors, path, vocab)


def _vision_args(p: Fields, tensors: dict, path, vocab: int) -> MllamaVisionArgs:
    dim = _tensor(tensors, ENCODER + "class_embedding", path, 1).shape[0]
    conv = _tensor(tensors, ENCODER + "conv1._linear.weight", path, 2)
    channels = 3  # ColumnParallelConv2dPatch(in_channels=3)
    patch = math.isqrt(conv.shape[1] // channels)
    if conv.shape[0] != dim or channels * patch * patch != conv.shape[1]:
        raise ShapeMismatch(f"{path}: {ENCODER}conv1._linear.weight has shape {tuple(conv.shape)}, not "
                            f"[width {dim}, 3 x patch x patch]")
    image_size = p.int("vision_chunk_size")
    if image_size <= 0 or image_size % patch:
        raise p.fail("vision_chunk_size", f"a positive multiple of the patch size {patch}", image_size)
    max_tiles = p.int("vision_max_num_chunks", 4)
    if max_tiles <= 0:
        raise p.fail("vision_max_num_chunks", "a positive integer", max_tiles)
    n_patches = (image_size // patch) ** 2 + 1
    local = _count(tensors, ENCODER + "transformer.resblocks.")
    global_ = _count(tensors, ENCODER + "global_transformer.resblocks.")
    if not local or not global_:
        raise MissingTensor(f"{path}: the image encoder has {local} local and {global_} global layers")
    hidden = _tensor(tensors, ENCODER + "transformer.resblocks.0.mlp.c_fc.weight", path, 2).shape[0]
    if dim % VISION_HEADS:
        raise UnsupportedArchitecture(f"{path}: image encoder width {dim} does not split into Meta's "
                                      f"{VISION_HEADS} heads")
    if local <= max(RETURN_INTERMEDIATE):
        raise UnsupportedArchitecture(f"{path}: the image encoder has {local} local layers; Meta's code reads "
                                      f"the inputs of layers {list(RETURN_INTERMEDIATE)}")
    positional = _tensor(tensors, ENCODER + "positional_embedding", path, 2)
    if tuple(positional.shape) != (n_patches, dim):
        raise UnsupportedArchitecture(
            f"{path}: {ENCODER}positional_embedding has shape {tuple(positional.shape)}; vision_chunk_size "
            f"{image_size} with patch {patch} needs {(n_patches, dim)} (Meta's load hook would resample it; "
            "herd does not)")
    for name in TILE_TABLES:
        table = tensors.get(ENCODER + name)
        if table is None:
            raise MissingTensor(f"{path}: missing tensor {ENCODER}{name} of the image encoder (Meta's load hook "
                                "would initialise it; herd reads released checkpoints, which have it)")
        want = (max_tiles, max_tiles, n_patches if name == "gated_positional_embedding" else 1, dim)
        if tuple(table.shape) != want:
            raise ShapeMismatch(f"{path}: {ENCODER}{name} has shape {tuple(table.shape)}; vision_max_num_chunks "
                                f"{max_tiles} and {n_patches} positions per tile give {want}")
    projection = _tensor(tensors, VISION + "vision_projection.weight", path, 2)
    if projection.shape[1] != dim * (1 + len(RETURN_INTERMEDIATE)):
        raise ShapeMismatch(f"{path}: {VISION}vision_projection.weight has shape {tuple(projection.shape)}; it "
                            f"reads the last layer and {len(RETURN_INTERMEDIATE)} intermediate ones of width {dim}, "
                            f"{dim * (1 + len(RETURN_INTERMEDIATE))} in all")
    return MllamaVisionArgs(
        dim=dim, n_layers=local, n_global_layers=global_, n_heads=VISION_HEADS, hidden_dim=hidden,
        image_size=image_size, patch_size=patch, max_num_tiles=max_tiles,
        intermediate_layers=tuple(i - 1 for i in RETURN_INTERMEDIATE), aspect_ratios=aspect_ratios(max_tiles),
        norm_eps=1e-5, image_token_id=vocab, n_channels=channels)  # LayerNorm's default eps, as Meta's code


def by_arrangement(table: torch.Tensor, ratios: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """[T, T, P, dim] indexed by (rows, columns) -> [1 + arrangements, T * P * dim] indexed by arrangement id
    (0: none): row id holds the first a*b tiles of table[:a, :b] for arrangement id = (a, b)."""
    tiles, _, positions, dim = table.shape
    out = table.new_zeros(len(ratios) + 1, tiles, positions, dim)
    for i, (a, b) in enumerate(ratios):
        out[i + 1, : a * b] = table[:a, :b].reshape(a * b, positions, dim)
    return out.flatten(1)


def herd_tensors(tensors: dict, args, path) -> dict:
    """Meta's Llama 3.2 Vision names and layouts -> herd's (herd.model.mllama): the text model without its
    prefix, learnable_embedding appended to the embedding's rows, the aspect-ratio tables by arrangement id.
    Without args.vision the image weights are left out."""
    out: dict = {}
    for name, t in tensors.items():
        if name.startswith(VISION):
            if args.vision is None:
                continue
            short = name[len(ENCODER):] if name.startswith(ENCODER) else None
            if short in TILE_TABLES:
                out[ENCODER + TILE_TABLES[short]] = by_arrangement(t, args.vision.aspect_ratios)
            else:
                out[name] = t
        elif name.startswith(TEXT):
            if name != TEXT + "learnable_embedding.weight":
                out[name[len(TEXT):]] = t
        else:
            raise UnexpectedTensor(f"{path}: {name}: no place for this tensor in Llama 3.2 Vision (its tensors are "
                                   "text_model.* and vision_model.*)")
    embedding = out.get("tok_embeddings.weight")
    learnable = tensors[TEXT + "learnable_embedding.weight"]
    if embedding is None:
        raise MissingTensor(f"{path}: no text_model.tok_embeddings.weight in the checkpoint")
    if embedding.dim() != 2 or embedding.shape[1] != learnable.shape[1]:
        raise ShapeMismatch(f"{path}: text_model.tok_embeddings.weight has shape {tuple(embedding.shape)}, "
                            f"learnable_embedding {tuple(learnable.shape)}: their widths differ")
    out["tok_embeddings.weight"] = torch.cat([embedding, learnable.to(embedding.dtype)], dim=0)
    return out


# ---- writing (herd.formats.meta_writer): the inverse, refusing what Meta's code would run differently ----------


def params_fields(args) -> dict:
    """params.json's Llama 3.2 Vision keys for `args`; UnsupportedArchitecture where Meta's code, which fixes
    the schedule, the encoder heads and its intermediate layers, would compute another model."""
    n_cross = len(args.cross_attention_layers)
    if list(args.cross_attention_layers) != fusion_schedule(args.n_layers, n_cross):
        raise UnsupportedArchitecture(
            f"cross-attention layers before layers {list(args.cross_attention_layers)}; Meta's fusion schedule "
            f"for {n_cross} over {args.n_layers} layers is {fusion_schedule(args.n_layers, n_cross)}")
    if args.extra_embeddings != LEARNABLE_ROWS:
        raise UnsupportedArchitecture(f"{args.extra_embeddings} embedding rows past the vocabulary; Meta's code "
                                      f"has {LEARNABLE_ROWS} (learnable_embedding)")
    v = args.vision
    if v is None:
        raise UnsupportedArchitecture("a Llama 3.2 Vision model without its image encoder has no Meta layout "
                                      "(params.json would need the encoder's tile size)")
    meta_layers = tuple(i - 1 for i in RETURN_INTERMEDIATE)
    fixed = {"n_heads": (v.n_heads, VISION_HEADS), "intermediate_layers": (tuple(v.intermediate_layers), meta_layers),
             "aspect_ratios": (tuple(v.aspect_ratios), aspect_ratios(v.max_num_tiles)),
             "n_channels": (v.n_channels, 3), "norm_eps": (v.norm_eps, 1e-5),
             "image_token_id": (v.image_token_id, args.vocab_size)}
    for name, (have, meta) in fixed.items():
        if have != meta:
            why = (" (it keeps the outputs of those layers; Meta's code the inputs of layers "
                   f"{list(RETURN_INTERMEDIATE)}, i.e. the outputs of {list(meta_layers)})"
                   if name == "intermediate_layers" else "")
            raise UnsupportedArchitecture(f"image encoder {name} {have}{why}; Meta's code fixes {meta}")
    return {"vision_chunk_size": v.image_size, "vision_max_num_chunks": v.max_num_tiles,
            "vision_num_cross_attention_layers": n_cross}


def from_arrangements(rows: torch.Tensor, ratios, tiles: int, positions: int) -> torch.Tensor:
    """by_arrangement's inverse: [1 + arrangements, T * P * dim] -> [T, T, P, dim] (cells no arrangement
    reaches are zero; Meta's code never reads them)."""
    by_id = rows.view(len(ratios) + 1, tiles, positions, -1)
    table = rows.new_zeros(tiles, tiles, positions, by_id.shape[-1])
    for i, (a, b) in enumerate(ratios):
        table[:a, :b] = by_id[i + 1, : a * b].reshape(a, b, positions, -1)
    return table


def meta_layout(tensors: dict, args) -> dict:
    """herd's Llama 3.2 Vision tensors -> Meta's checkpoint names and layouts (params_fields first)."""
    v, out = args.vision, {}
    herd_tables = {herd: meta for meta, herd in TILE_TABLES.items()}
    for name, t in tensors.items():
        if name.startswith(VISION):
            short = name[len(ENCODER):] if name.startswith(ENCODER) else None
            if short in herd_tables:
                positions = v.n_patches if short.startswith("gated_positional") else 1
                out[ENCODER + herd_tables[short]] = from_arrangements(t, v.aspect_ratios, v.max_num_tiles, positions)
            else:
                out[name] = t
        elif name == "tok_embeddings.weight":
            out[TEXT + name], out[TEXT + "learnable_embedding.weight"] = t[: args.vocab_size], t[args.vocab_size:]
        else:
            out[TEXT + name] = t
    return out
