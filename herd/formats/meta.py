"""Meta's original checkpoints: params.json + consolidated.NN.pth (model-parallel shards).

Shards are read with torch.load(weights_only=True, mmap=True), so a pickle that holds anything but
tensors is refused and nothing is loaded twice. Names are already herd's; q/k are already interleaved.
Llama 4's fused and renamed tensors are unpacked the way Meta's own load hooks do; Llama 3.2 Vision's
text_model./vision_model. layout is herd.formats.meta_mllama's.
"""

from __future__ import annotations

import math
import pickle
import zipfile
from pathlib import Path

import torch

from herd.config import ModelArgs, MoEArgs, RopeScaling, VisionArgs, ffn_hidden_dim
from herd.errors import (
    ConfigError,
    FormatError,
    MissingTensor,
    ShapeMismatch,
    TruncatedFile,
    UnexpectedTensor,
    UnsafePickle,
    UnsupportedArchitecture,
)
from herd.formats import meta_mllama
from herd.formats.checkpoint import Checkpoint, TokenizerSource
from herd.formats.fields import Fields, check_layer_count, naming, read_json
from herd.formats.hf import read_chat_template

# How a tensor split across model-parallel ranks is put back together (dim to concatenate on).
# Norms and Llama 4 routers are replicated; embeddings depend on the generation (see merge_shards).
CONCAT_DIM = {
    "attention.wq.weight": 0,
    "attention.wk.weight": 0,
    "attention.wv.weight": 0,
    "attention.wo.weight": 1,
    "feed_forward.w1.weight": 0,
    "feed_forward.w3.weight": 0,
    "feed_forward.w2.weight": 1,
    "output.weight": 0,
}
SHARED_EXPERT = {
    "feed_forward.w_in_shared_FD.weight": "w1",
    "feed_forward.w_swiglu_FD.weight": "w3",
    "feed_forward.w_out_shared_DF.weight": "w2",
}
# params.json fields that change the text model in ways herd does not implement.
UNSUPPORTED_PARAMS = {
    "quantization_args": "Meta's own quantized checkpoints (fp8/int4 layouts) are not read; use the bf16 release",
    "lora_args": "a LoRA-augmented checkpoint; merge the adapters first",
}
CONTEXT_BY_GENERATION = {"1": 2048, "2": 4096, "3": 8192, "3.1": 131072, "3.2": 131072, "4": 10485760}
DROPPED_SUFFIXES = ("rope.freqs", "freqs_cis", "_extra_state", "global_gate_stats_3E", "expert_activation_DE",
                    "running_gate_stats_3E")


def is_meta_dir(path: Path) -> bool:
    return path.is_dir() and (path / "params.json").is_file()


def _load_shard(path: Path) -> dict[str, torch.Tensor]:
    if path.stat().st_size == 0:
        raise TruncatedFile(f"{path}: empty file")
    # torch.save files are zip archives and can be memory-mapped; a legacy plain pickle cannot.
    mmap = zipfile.is_zipfile(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise UnsafePickle(f"{path}: holds objects other than tensors; refused to unpickle ({e})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile) as e:
        raise TruncatedFile(f"{path}: not a complete PyTorch checkpoint ({e})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise UnsafePickle(f"{path}: expected a dict of tensors by name")
    return state


# ModelArgs field -> the params.json key it comes from, for messages about impossible values
_META_NAMES = {
    "dim": "dim", "n_layers": "n_layers", "n_heads": "n_heads", "n_kv_heads": "n_kv_heads", "vocab_size": "vocab_size",
    "hidden_dim": "multiple_of/ffn_dim_multiplier", "norm_eps": "norm_eps", "rope_theta": "rope_theta",
    "max_seq_len": "max_seq_len", "head_dim": "head_dim", "rope_scaling": "rope_scaling_factor", "moe": "moe_args",
    "attention_chunk_size": "attention_chunk_size", "floor_scale": "floor_scale", "attn_scale": "attn_scale",
    "nope_layers": "nope_layer_interval",
}


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """torch.equal, reading one row first: an untied output differs there, and a memory-mapped pair of
    whole matrices is then never read."""
    return a.shape == b.shape and torch.equal(a[:1], b[:1]) and torch.equal(a, b)


def args_from_params(params: dict, tensors: dict[str, torch.Tensor],
                     path: Path | str = "params.json") -> tuple[ModelArgs, str]:
    """params.json → (ModelArgs, generation). Derived sizes follow Meta's FeedForward/MoE rules. Llama 3.2
    Vision's tensors are read under their own names (text_model.*, vision_model.*)."""
    p = Fields(params, str(path))
    mllama = meta_mllama.is_mllama(params)
    checkpoint_tensors, tensors = tensors, meta_mllama.text_view(tensors) if mllama else tensors
    dim, n_layers, n_heads = p.int("dim"), p.int("n_layers"), p.int("n_heads")
    check_layer_count(n_layers, tensors, r"layers\.(\d+)\.", Path(path), "n_layers")
    for key, why in UNSUPPORTED_PARAMS.items():
        if params.get(key):
            raise UnsupportedArchitecture(f"{path}: {key} is set: {why}")
    vocab = p.int("vocab_size", -1)
    if vocab <= 0:  # Llama 1/2 write -1: the tokenizer decides, and the embedding shows it
        vocab = tensors["tok_embeddings.weight"].shape[0]
    multiple_of = p.int("multiple_of", 256)
    if multiple_of <= 0:
        raise p.fail("multiple_of", "a positive integer", multiple_of)
    multiplier = p.float("ffn_dim_multiplier", None)
    if multiplier is not None and not (math.isfinite(multiplier) and multiplier > 0):
        raise p.fail("ffn_dim_multiplier", "a finite positive number", multiplier)
    moe_params = p.object("moe_args", None)
    llama4 = moe_params is not None or "nope_layer_interval" in params or p.bool("use_qk_norm", False)
    tied = "output.weight" not in tensors or _same(tensors["output.weight"], tensors["tok_embeddings.weight"])
    scaled = p.bool("use_scaled_rope", False)
    if llama4:
        generation = "4"
    elif mllama:
        generation = "3.2"  # Llama 3.2 Vision: untied, and RoPE scaled by factor 8 (Meta's apply_scaling)
    elif "rope_theta" in params or scaled:  # Llama 1/2 params.json have neither
        generation = ("3.2" if tied else "3.1") if scaled else "3"
    else:
        generation = "1" if p.float("norm_eps", 1e-5) < 5e-6 else "2"
    ffn_exp = p.float("ffn_exp", None) or 4.0
    if not (math.isfinite(ffn_exp) and ffn_exp > 0):
        raise p.fail("ffn_exp", "a finite positive number", ffn_exp)
    with naming(path, _META_NAMES):
        scaling = None
        if scaled:
            # Meta's reference hard-codes factor 8; Llama 3.2 1B/3B need 32 (llama-models #166, #241),
            # Llama 4 Scout 16 with high_freq_factor 1 (llama-models PR #322).
            # Llama 3.2 Vision runs on Meta's llama3 code, factor 8.
            default_factor, default_high = (8.0, 4.0) if mllama else {"3.2": (32.0, 4.0), "4": (16.0, 1.0)}.get(
                generation, (8.0, 4.0))
            scaling = RopeScaling(
                "llama3",
                factor=p.float("rope_scaling_factor", None) or default_factor,
                low_freq_factor=1.0,
                high_freq_factor=p.float("rope_high_freq_factor", None) or default_high,
                original_max_position=8192,
            )
        common = dict(
            dim=dim,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=p.int("n_kv_heads", None) or n_heads,
            vocab_size=vocab,
            norm_eps=p.float("norm_eps", 1e-5),
            rope_theta=p.float("rope_theta", 500000.0 if generation.startswith(("3", "4")) else 10000.0),
            rope_scaling=scaling,
            max_seq_len=p.int("max_seq_len", CONTEXT_BY_GENERATION[generation]),
            head_dim=p.int("head_dim", None),
            tie_embeddings=tied,
        )
        hidden_dim = ffn_hidden_dim(dim, multiple_of, multiplier, ffn_exp)
        if mllama:
            fields = meta_mllama.mllama_fields(params, p, checkpoint_tensors, path, n_layers, vocab)
            return ModelArgs(hidden_dim=hidden_dim, **common, **fields), generation
        if not llama4:
            return ModelArgs(hidden_dim=hidden_dim, **common), generation
        moe = None
        if moe_params:
            step = moe_params.int("interleave_moe_layer_step", 1)
            if step <= 0:
                raise moe_params.fail("interleave_moe_layer_step", "a positive integer", step)
            expert_hidden = int(2 * int(ffn_exp * dim) / 3)
            expert_hidden = int((multiplier or 1.0) * expert_hidden)
            if moe_params.bool("auto_scale_F", True):
                capacity = moe_params.float("capacity_factor", 1.0)
                if not (math.isfinite(capacity) and capacity >= 0):
                    raise moe_params.fail("capacity_factor", "a finite number >= 0", capacity)
                expert_hidden = int(expert_hidden / (capacity + 1))
            expert_hidden += -expert_hidden % multiple_of
            moe = MoEArgs(
                num_experts=moe_params.int("num_experts"),
                top_k=moe_params.int("top_k", 1),
                hidden_dim=expert_hidden,
                layers=tuple(i for i in range(n_layers) if (i + 1) % step == 0),
            )
        interval = p.int("nope_layer_interval", None)
        if interval is not None and interval <= 0:
            raise p.fail("nope_layer_interval", "a positive integer", interval)
        return (
            ModelArgs(
                hidden_dim=hidden_dim,
                moe=moe,
                nope_layers=tuple(i for i in range(n_layers) if interval and (i + 1) % interval == 0),
                attention_chunk_size=p.int("attention_chunk_size", None),
                use_qk_norm=p.bool("use_qk_norm", False),
                attn_temperature_tuning=p.bool("attn_temperature_tuning", False),
                floor_scale=p.float("floor_scale", 8192.0),
                attn_scale=p.float("attn_scale", 0.1),
                vision=_vision_args(p, tensors, path),
                **common,
            ),
            generation,
        )


def _vision_args(p: Fields, tensors: dict, path) -> VisionArgs | None:
    """params.json vision_args (llama-models llama4/args.py VisionArgs), when the checkpoint has the encoder."""
    v = p.object("vision_args", None)
    if v is None or not any(n.startswith("vision_embeddings.") for n in tensors):
        return None
    size, patch = v.object("image_size"), v.object("patch_size")
    if size.int("height") != size.int("width") or patch.int("height") != patch.int("width"):
        raise UnsupportedArchitecture(f"{path}: vision_args with non-square tiles or patches are not supported")
    dim = v.int("dim")
    ratio = v.float("mlp_ratio")
    if not (math.isfinite(ratio) and ratio > 0):
        raise v.fail("mlp_ratio", "a finite positive number", ratio)
    if "vision_embeddings.vision_encoder.positional_embedding" in tensors:
        raise UnsupportedArchitecture(f"{path}: a pre-release vision positional_embedding (resampled by Meta's load "
                                      "hook); herd reads positional_embedding_vlm")
    return VisionArgs(dim=dim, n_layers=v.int("n_layers"), n_heads=v.int("n_heads"), hidden_dim=int(ratio * dim),
                      image_size=size.int("height"), patch_size=patch.int("height"), output_dim=v.int("output_dim"),
                      pixel_shuffle_ratio=v.float("pixel_shuffle_ratio", 0.5))


def merge_shards(shards: list[dict[str, torch.Tensor]], dim: int, path: Path | str = "",
                 lazy: bool = False, mllama: bool = False) -> dict[str, torch.Tensor]:
    """One tensor per name; `lazy` leaves split tensors in their shards (herd.formats.slices.ShardedTensor),
    for ranks that read only their share. `mllama`: Llama 3.2 Vision's names (meta_mllama.shard_concat_dim),
    whose replicated tensors include matrices (positional embeddings)."""
    if len(shards) == 1:
        return shards[0]
    merged = {}
    for name in shards[0]:
        parts = [shard[name] for shard in shards]
        short = name.split(".", 2)[-1] if name.startswith("layers.") else name
        concat = meta_mllama.shard_concat_dim(name) if mllama else CONCAT_DIM.get(short)
        if mllama:
            if concat is None:
                merged[name] = parts[0]
                continue
            if parts[0].dim() == 1:  # a split bias
                merged[name] = torch.cat(parts)
                continue
        if name == "tok_embeddings.weight":
            # Llama 1/2 split the embedding by columns, Llama 3's VocabParallelEmbedding by rows.
            concat = 1 if parts[0].dim() == 2 and parts[0].shape[1] != dim else 0
        if concat is not None:
            if any(p.dim() != 2 or p.shape[1 - concat] != parts[0].shape[1 - concat] for p in parts):
                raise ShapeMismatch(f"{path}: {name} has shapes {[tuple(p.shape) for p in parts]} in the "
                                    f"{len(parts)} shards, which do not join along dim {concat}")
            if lazy:
                from herd.formats.slices import ShardedTensor

                merged[name] = ShardedTensor(parts, concat)
            else:
                merged[name] = torch.cat(parts, dim=concat)
        elif parts[0].dim() <= 1:
            merged[name] = parts[0]  # norms are replicated on every rank
        else:
            raise FormatError(
                f"{name}: herd does not know how to merge this tensor across {len(shards)} shards "
                "(Llama 4 multi-shard checkpoints need llama-models' resharding first)"
            )
    return merged


def llama4_canonical(tensors: dict[str, torch.Tensor], args: ModelArgs, path: Path | str = "") -> dict[str, torch.Tensor]:
    """Meta Llama 4 names (fused wqkv, router_DE, moe_w_*_eD_F, mlp.fc1/fc2) → herd names."""
    out = {}
    q_rows, kv_rows = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    for name, t in tensors.items():
        if not name.startswith("layers.") or name.count(".") < 2:
            out[name] = t  # the loader refuses what has no place
            continue
        try:
            _llama4_tensor(out, name, t, args, q_rows, kv_rows)
        except (RuntimeError, ValueError, IndexError) as e:  # split/view of a tensor the config does not fit
            raise ShapeMismatch(f"{path}: {name} has shape {tuple(t.shape)}, which the config cannot split ({e})") from None
    return out


def _llama4_tensor(out: dict, name: str, t: torch.Tensor, args: ModelArgs, q_rows: int, kv_rows: int) -> None:
    """One Meta Llama 4 tensor under its herd name(s), into `out`."""
    _, index, rest = name.split(".", 2)
    p = f"layers.{index}."
    if rest == "attention.wqkv.weight":
        out[p + "attention.wq.weight"], out[p + "attention.wk.weight"], out[p + "attention.wv.weight"] = t.split(
            [q_rows, kv_rows, kv_rows]
        )
    elif rest == "attention.wqkv.layer_norm_weight":
        out[p + "attention_norm.weight"] = t
    elif rest in ("feed_forward.norm.weight", "feed_forward.mlp.layer_norm_weight"):
        out[p + "ffn_norm.weight"] = t
    elif rest == "feed_forward.router_DE":
        out[p + "feed_forward.router.weight"] = t.t()
    elif rest in ("feed_forward.experts.moe_w_in_eD_F", "feed_forward.experts.moe_w_swiglu_eD_F"):
        w = "w1" if "w_in" in rest else "w3"
        out[p + f"feed_forward.experts.{w}"] = t.view(args.moe.num_experts, args.dim, -1).transpose(1, 2)
    elif rest == "feed_forward.experts.moe_w_out_eF_D":
        out[p + "feed_forward.experts.w2"] = t.view(args.moe.num_experts, -1, args.dim).transpose(1, 2)
    elif rest in ("feed_forward.experts.w1", "feed_forward.experts.w3", "feed_forward.experts.w2"):
        out[p + rest] = t.transpose(1, 2)  # Meta's post-hook names hold [E, in, out]
    elif rest in SHARED_EXPERT:
        out[p + f"feed_forward.shared_expert.{SHARED_EXPERT[rest]}.weight"] = t
    elif rest == "feed_forward.mlp.fc1_weight":
        out[p + "feed_forward.w1.weight"], out[p + "feed_forward.w3.weight"] = t.chunk(2, dim=0)
    elif rest == "feed_forward.mlp.fc2_weight":
        out[p + "feed_forward.w2.weight"] = t
    else:
        out[name] = t


def read_meta(path: Path, lazy: bool = False) -> Checkpoint:
    """`lazy`: leave tensors split across shards in them (see merge_shards)."""
    params_path = path / "params.json"
    params = read_json(params_path, ConfigError)
    dim = Fields(params, str(params_path)).int("dim")
    files = sorted(path.glob("consolidated.*.pth")) or sorted(path.glob("consolidated.pth"))
    if not files:
        raise FormatError(f"{path}: params.json but no consolidated.NN.pth weights")
    shards = [_load_shard(f) for f in files]
    for shard in shards:
        for name in [n for n in shard if n.endswith(DROPPED_SUFFIXES)]:
            del shard[name]
    if any(set(shard) != set(shards[0]) for shard in shards):
        raise FormatError(f"{path}: the consolidated.NN.pth shards hold different tensor names")
    mllama = meta_mllama.is_mllama(params)
    tensors = merge_shards(shards, dim, path, lazy and not mllama, mllama)
    embedding = "text_model.tok_embeddings.weight" if mllama else "tok_embeddings.weight"
    if mllama and embedding not in tensors and "tok_embeddings.weight" in tensors:
        raise FormatError(f"{params_path}: vision_num_cross_attention_layers is set (Llama 3.2 Vision), but the "
                          "tensors are a text model's (tok_embeddings.weight, not text_model.*)")
    if embedding not in tensors:
        raise MissingTensor(f"{path}: no {embedding} in the checkpoint")
    # whether the output is tied compares values: one shard's part tells, as every shard splits both alike
    probe = {n: shards[0][n] if n in ("tok_embeddings.weight", "output.weight") and lazy else t for n, t in tensors.items()}
    args, generation = args_from_params(params, probe, params_path)
    if generation == "4":
        tensors = llama4_canonical(tensors, args, path)
    if mllama:
        tensors = meta_mllama.herd_tensors(tensors, args, path)
    if args.tie_embeddings:
        tensors.pop("output.weight", None)
    for name in tensors:
        if not (name in ("tok_embeddings.weight", "norm.weight", "output.weight") or name.startswith("layers.")
                or (args.cross_attention_layers and name.startswith(("cross_attention_layers.", "vision_model.")))
                or (args.vision is not None and name.startswith(("vision_embeddings.", "vision_projection.")))):
            raise UnexpectedTensor(f"{path}: {name}: no place for this tensor in a Llama model")
    return Checkpoint(
        args=args,
        tensors=tensors,
        format="meta",
        path=path,
        tokenizer=_tokenizer_source(path),
        chat_template=read_chat_template(path),
        generation=generation,
        quantization=", ".join(sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})),
        metadata={"shards": len(files), **_vision_note(params, args, path)},
    )


def _tokenizer_source(path: Path) -> TokenizerSource | None:
    """Meta's tokenizer.model (beside the weights or one directory up, as Meta's downloads lay it out); else a
    tokenizer.json, which herd's Meta export writes for a tokenizer that has no tokenizer.model (a GGUF
    vocabulary, an HF tokenizer.json). tokenizer_config.json, where present, states BOS/EOS."""
    config = read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").is_file() else {}
    for candidate in (path / "tokenizer.model", path.parent / "tokenizer.model"):
        if candidate.is_file():
            with open(candidate, "rb") as f:
                first = f.readline(200).split()
            kind = "tiktoken" if len(first) == 2 and first[1].isdigit() else "sentencepiece"
            return TokenizerSource(kind, candidate, config=config if candidate.parent == path else {})
    if (path / "tokenizer.json").is_file():
        return TokenizerSource("hf_json", path / "tokenizer.json", config=config)
    return None


def _vision_note(params: dict, args: ModelArgs, path: Path) -> dict:
    if (params.get("vision_args") or args.cross_attention_layers) and args.vision is None:
        import warnings

        note = (f"{path}: params.json describes an image encoder, but the checkpoint has none of its weights; "
                "loaded as a text-only model")
        warnings.warn(f"herd: {note}", stacklevel=3)
        return {"note": note}
    return {}
