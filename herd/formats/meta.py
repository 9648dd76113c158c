"""Meta's original checkpoints: params.json + consolidated.NN.pth (model-parallel shards).

Shards are read with torch.load(weights_only=True, mmap=True), so a pickle that holds anything but
tensors is refused and nothing is loaded twice. Names are already herd's; q/k are already interleaved.
Llama 4's fused and renamed tensors are unpacked the way Meta's own load hooks do.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import torch

from herd.config import ModelArgs, MoEArgs, RopeScaling, ffn_hidden_dim
from herd.errors import (
    ConfigError,
    FormatError,
    TruncatedFile,
    UnexpectedTensor,
    UnsafePickle,
    UnsupportedArchitecture,
)
from herd.formats.checkpoint import Checkpoint, TokenizerSource

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
    "vision_num_cross_attention_layers": "Llama 3.2 Vision inserts cross-attention layers into the text model",
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
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UnsafePickle(f"{path}: expected a dict of tensors")
    return state


def args_from_params(params: dict, tensors: dict[str, torch.Tensor]) -> tuple[ModelArgs, str]:
    """params.json → (ModelArgs, generation). Derived sizes follow Meta's FeedForward/MoE rules."""
    try:
        dim, n_layers, n_heads = int(params["dim"]), int(params["n_layers"]), int(params["n_heads"])
    except KeyError as e:
        raise ConfigError(f"params.json lacks the field {e.args[0]!r}") from None
    for key, why in UNSUPPORTED_PARAMS.items():
        if params.get(key):
            raise UnsupportedArchitecture(f"params.json: {key} is set: {why}")
    vocab = int(params.get("vocab_size", -1))
    if vocab <= 0:  # Llama 1/2 write -1: the tokenizer decides, and the embedding shows it
        vocab = tensors["tok_embeddings.weight"].shape[0]
    multiple_of = int(params.get("multiple_of", 256))
    multiplier = params.get("ffn_dim_multiplier")
    moe_params = params.get("moe_args")
    llama4 = moe_params is not None or "nope_layer_interval" in params or params.get("use_qk_norm", False)
    tied = "output.weight" not in tensors or torch.equal(tensors["output.weight"], tensors["tok_embeddings.weight"])
    if llama4:
        generation = "4"
    elif "rope_theta" in params or params.get("use_scaled_rope"):  # Llama 1/2 params.json have neither
        generation = ("3.2" if tied else "3.1") if params.get("use_scaled_rope") else "3"
    else:
        generation = "1" if float(params.get("norm_eps", 1e-5)) < 5e-6 else "2"
    scaling = None
    if params.get("use_scaled_rope"):
        # Meta's reference hard-codes factor 8; Llama 3.2 1B/3B need 32 (llama-models #166, #241),
        # Llama 4 Scout 16 with high_freq_factor 1 (llama-models PR #322).
        default_factor, default_high = {"3.2": (32.0, 4.0), "4": (16.0, 1.0)}.get(generation, (8.0, 4.0))
        scaling = RopeScaling(
            "llama3",
            factor=float(params.get("rope_scaling_factor") or default_factor),
            low_freq_factor=1.0,
            high_freq_factor=float(params.get("rope_high_freq_factor") or default_high),
            original_max_position=8192,
        )
    common = dict(
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=int(params.get("n_kv_heads") or n_heads),
        vocab_size=vocab,
        norm_eps=float(params.get("norm_eps", 1e-5)),
        rope_theta=float(params.get("rope_theta", 500000.0 if generation.startswith(("3", "4")) else 10000.0)),
        rope_scaling=scaling,
        max_seq_len=int(params.get("max_seq_len", CONTEXT_BY_GENERATION[generation])),
        head_dim=params.get("head_dim"),
        tie_embeddings=tied,
    )
    ffn_exp = float(params.get("ffn_exp") or 4.0)
    hidden_dim = ffn_hidden_dim(dim, multiple_of, multiplier, ffn_exp)
    if not llama4:
        return ModelArgs(hidden_dim=hidden_dim, **common), generation
    moe = None
    if moe_params:
        step = int(moe_params.get("interleave_moe_layer_step", 1))
        expert_hidden = int(2 * int(ffn_exp * dim) / 3)
        expert_hidden = int((multiplier or 1.0) * expert_hidden)
        if moe_params.get("auto_scale_F", True):
            expert_hidden = int(expert_hidden / (float(moe_params.get("capacity_factor", 1.0)) + 1))
        expert_hidden += -expert_hidden % multiple_of
        moe = MoEArgs(
            num_experts=int(moe_params["num_experts"]),
            top_k=int(moe_params.get("top_k", 1)),
            hidden_dim=expert_hidden,
            layers=tuple(i for i in range(n_layers) if (i + 1) % step == 0),
        )
    interval = params.get("nope_layer_interval")
    return (
        ModelArgs(
            hidden_dim=hidden_dim,
            moe=moe,
            nope_layers=tuple(i for i in range(n_layers) if interval and (i + 1) % interval == 0),
            attention_chunk_size=params.get("attention_chunk_size"),
            use_qk_norm=bool(params.get("use_qk_norm", False)),
            attn_temperature_tuning=bool(params.get("attn_temperature_tuning", False)),
            floor_scale=float(params.get("floor_scale", 8192.0)),
            attn_scale=float(params.get("attn_scale", 0.1)),
            **common,
        ),
        generation,
    )


def merge_shards(shards: list[dict[str, torch.Tensor]], dim: int) -> dict[str, torch.Tensor]:
    if len(shards) == 1:
        return shards[0]
    merged = {}
    for name in shards[0]:
        parts = [shard[name] for shard in shards]
        short = name.split(".", 2)[-1] if name.startswith("layers.") else name
        if name == "tok_embeddings.weight":
            # Llama 1/2 split the embedding by columns, Llama 3's VocabParallelEmbedding by rows.
            merged[name] = torch.cat(parts, dim=1 if parts[0].shape[1] != dim else 0)
        elif short in CONCAT_DIM:
            merged[name] = torch.cat(parts, dim=CONCAT_DIM[short])
        elif parts[0].dim() <= 1:
            merged[name] = parts[0]  # norms are replicated on every rank
        else:
            raise FormatError(
                f"{name}: herd does not know how to merge this tensor across {len(shards)} shards "
                "(Llama 4 multi-shard checkpoints need llama-models' resharding first)"
            )
    return merged


def llama4_canonical(tensors: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Meta Llama 4 names (fused wqkv, router_DE, moe_w_*_eD_F, mlp.fc1/fc2) → herd names."""
    out = {}
    q_rows, kv_rows = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    for name, t in tensors.items():
        if not name.startswith("layers."):
            out[name] = t
            continue
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
    return out


def read_meta(path: Path) -> Checkpoint:
    try:
        params = json.loads((path / "params.json").read_text())
    except json.JSONDecodeError as e:
        raise FormatError(f"{path / 'params.json'} is not valid JSON: {e}") from None
    files = sorted(path.glob("consolidated.*.pth"))
    if not files:
        raise FormatError(f"{path}: params.json but no consolidated.NN.pth weights")
    shards = [_load_shard(f) for f in files]
    for shard in shards:
        for name in [n for n in shard if n.endswith(DROPPED_SUFFIXES)]:
            del shard[name]
    if "dim" not in params:
        raise ConfigError(f"{path / 'params.json'} lacks the field 'dim'")
    tensors = merge_shards(shards, int(params["dim"]))
    if "tok_embeddings.weight" not in tensors:
        raise FormatError(f"{path}: no tok_embeddings.weight in the checkpoint")
    args, generation = args_from_params(params, tensors)
    if generation == "4":
        tensors = llama4_canonical(tensors, args)
    if args.tie_embeddings:
        tensors.pop("output.weight", None)
    for name in tensors:
        if not (name in ("tok_embeddings.weight", "norm.weight", "output.weight") or name.startswith("layers.")):
            raise UnexpectedTensor(f"{name}: no place for this tensor in a Llama model")
    tokenizer = None
    for candidate in (path / "tokenizer.model", path.parent / "tokenizer.model"):
        if candidate.is_file():
            with open(candidate, "rb") as f:
                first = f.readline(200).split()
            kind = "tiktoken" if len(first) == 2 and first[1].isdigit() else "sentencepiece"
            tokenizer = TokenizerSource(kind, candidate)
            break
    return Checkpoint(
        args=args,
        tensors=tensors,
        format="meta",
        path=path,
        tokenizer=tokenizer,
        generation=generation,
        quantization=", ".join(sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})),
        metadata={"shards": len(files)},
    )
