"""Hugging Face directories: config.json + safetensors (sharded through model.safetensors.index.json).

Covers LlamaForCausalLM (Llama 1-3.3) and Llama4ForCausalLM / Llama4ForConditionalGeneration (the
text model). Tensors stay memory-mapped by safetensors until the loader copies them into the model.
HF Llama 1-3 store q/k rows permuted for rotate_half RoPE; they are put back in Meta's interleaved
order here. Llama 4 is interleaved in every format.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from herd.config import ModelArgs, MoEArgs, RopeScaling
from herd.errors import (
    ConfigError,
    FormatError,
    MissingTensor,
    TruncatedFile,
    UnexpectedTensor,
    UnsupportedArchitecture,
)
from herd.formats.checkpoint import Checkpoint, TokenizerSource

LLAMA_ARCHS = {"LlamaForCausalLM"}
LLAMA4_ARCHS = {"Llama4ForCausalLM", "Llama4ForConditionalGeneration"}

# Settings that change the maths and that herd does not implement: (key, value herd accepts).
UNSUPPORTED_IF_NOT = {
    "attention_bias": False,
    "mlp_bias": False,
    "hidden_act": "silu",
    "router_jitter_noise": 0.0,
}


def is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise FormatError(f"{path} is not valid JSON: {e}") from None


def _rope(cfg: dict) -> tuple[float, RopeScaling | None]:
    # transformers 4.x: rope_theta + rope_scaling; 5.x: rope_parameters holds both.
    params = dict(cfg.get("rope_scaling") or {})
    params.update(cfg.get("rope_parameters") or {})
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind == "llama3":
        return theta, RopeScaling(
            "llama3",
            factor=float(params["factor"]),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position=int(params.get("original_max_position_embeddings", 8192)),
        )
    if kind == "linear":
        return theta, RopeScaling("linear", factor=float(params["factor"]))
    raise UnsupportedArchitecture(f"config.json: rope type {kind!r} is not supported (herd has default, llama3, linear)")


def args_from_hf_config(config: dict) -> ModelArgs:
    archs = config.get("architectures") or []
    model_type = config.get("model_type")
    if not (set(archs) & (LLAMA_ARCHS | LLAMA4_ARCHS)) and model_type not in ("llama", "llama4", "llama4_text"):
        raise UnsupportedArchitecture(
            f"config.json: architectures={archs} model_type={model_type!r}; herd runs "
            f"{sorted(LLAMA_ARCHS | LLAMA4_ARCHS)}"
        )
    cfg = config.get("text_config", config) if model_type == "llama4" or "text_config" in config else config
    for key, accepted in UNSUPPORTED_IF_NOT.items():
        if key in cfg and cfg[key] not in (accepted, None):
            raise UnsupportedArchitecture(f"config.json: {key}={cfg[key]!r} is not supported (herd needs {accepted!r})")
    try:
        theta, scaling = _rope(cfg)
        n_layers = int(cfg["num_hidden_layers"])
        common = dict(
            dim=int(cfg["hidden_size"]),
            n_layers=n_layers,
            n_heads=int(cfg["num_attention_heads"]),
            n_kv_heads=int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]),
            vocab_size=int(cfg["vocab_size"]),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_seq_len=int(cfg.get("max_position_embeddings", 2048)),
            head_dim=cfg.get("head_dim"),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        )
        if model_type not in ("llama4", "llama4_text") and not set(archs) & LLAMA4_ARCHS:
            return ModelArgs(hidden_dim=int(cfg["intermediate_size"]), **common)
        step = int(cfg.get("interleave_moe_layer_step", 1))
        moe_layers = cfg.get("moe_layers")
        moe_layers = tuple(moe_layers) if moe_layers is not None else tuple(range(step - 1, n_layers, step))
        rope_flags = cfg.get("no_rope_layers") or [
            int((i + 1) % int(cfg.get("no_rope_layer_interval", 4)) != 0) for i in range(n_layers)
        ]
        return ModelArgs(
            hidden_dim=int(cfg.get("intermediate_size_mlp", cfg["intermediate_size"])),
            moe=MoEArgs(
                num_experts=int(cfg["num_local_experts"]),
                top_k=int(cfg.get("num_experts_per_tok", 1)),
                hidden_dim=int(cfg["intermediate_size"]),
                layers=moe_layers,
            )
            if moe_layers
            else None,
            nope_layers=tuple(i for i in range(n_layers) if not rope_flags[i]),
            attention_chunk_size=cfg.get("attention_chunk_size"),
            use_qk_norm=bool(cfg.get("use_qk_norm", True)),
            attn_temperature_tuning=bool(cfg.get("attn_temperature_tuning", True)),
            floor_scale=float(cfg.get("floor_scale", 8192)),
            attn_scale=float(cfg.get("attn_scale", 0.1)),
            **common,
        )
    except KeyError as e:
        raise ConfigError(f"config.json lacks the field {e.args[0]!r}") from None


def permute_for_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF rotate_half row order → Meta interleaved: row h·hd + c·hd/2 + i goes to h·hd + 2i + c."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


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
SKIPPED_PREFIXES = ("vision_model.", "multi_modal_projector.", "model.vision_model.", "model.multi_modal_projector.")


def canonical_tensors(raw: dict[str, Any], args: ModelArgs) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, tensor in raw.items():
        if name.startswith(SKIPPED_PREFIXES) or name.endswith("rotary_emb.inv_freq"):
            continue
        key = name
        # Llama4ForConditionalGeneration nests the text model: language_model.model.* (hub files) or
        # model.language_model.* (transformers 5 in memory).
        while key.startswith(("language_model.", "model.")):
            key = key.split(".", 1)[1]
        if key == "embed_tokens.weight":
            out["tok_embeddings.weight"] = tensor
        elif key == "norm.weight":
            out["norm.weight"] = tensor
        elif key == "lm_head.weight":
            out["output.weight"] = tensor
        elif key.startswith("layers."):
            _, index, rest = key.split(".", 2)
            prefix = f"layers.{index}."
            if rest == "feed_forward.experts.gate_up_proj":  # [E, D, 2F], x @ W, gate first
                gate, up = tensor.chunk(2, dim=-1)
                out[prefix + "feed_forward.experts.w1"] = gate.transpose(1, 2)
                out[prefix + "feed_forward.experts.w3"] = up.transpose(1, 2)
            elif rest == "feed_forward.experts.down_proj":  # [E, F, D]
                out[prefix + "feed_forward.experts.w2"] = tensor.transpose(1, 2)
            elif rest in LAYER_MAP:
                if not args.is_llama4 and rest == "self_attn.q_proj.weight":
                    tensor = permute_for_interleaved(tensor, args.n_heads)
                elif not args.is_llama4 and rest == "self_attn.k_proj.weight":
                    tensor = permute_for_interleaved(tensor, args.n_kv_heads)
                out[prefix + LAYER_MAP[rest]] = tensor
            else:
                raise UnexpectedTensor(f"{name}: no place for this tensor in a Llama model")
        else:
            raise UnexpectedTensor(f"{name}: no place for this tensor in a Llama model")
    return out


def _open_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    size = path.stat().st_size
    if size < 8:
        raise TruncatedFile(f"{path}: {size} bytes, shorter than a safetensors header")
    try:
        return load_file(str(path))  # memory-mapped: tensors share the file's pages until copied
    except SafetensorError as e:
        raise TruncatedFile(f"{path}: not a complete safetensors file ({e})") from None
    except Exception as e:  # malformed header JSON and the like
        raise FormatError(f"{path}: cannot read as safetensors ({e})") from None


def read_hf(path: Path) -> Checkpoint:
    config = _read_json(path / "config.json")
    args = args_from_hf_config(config)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map", {})
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        if list(path.glob("*.bin")):
            raise FormatError(f"{path}: only PyTorch .bin weights; herd reads safetensors (convert them first)")
        raise MissingTensor(f"{path}: no .safetensors files")
    raw: dict[str, torch.Tensor] = {}
    for name in files:
        shard = path / name
        if not shard.is_file():
            raise MissingTensor(f"{path}: the index names {name}, which is missing")
        raw.update(_open_safetensors(shard))
    if index.is_file():
        missing = set(weight_map) - set(raw)
        if missing:
            raise MissingTensor(f"{path}: tensors listed in the index are absent: {sorted(missing)[:5]}")
    return Checkpoint(
        args=args,
        tensors=canonical_tensors(raw, args),
        format="hf",
        path=path,
        tokenizer=_tokenizer_source(path),
        chat_template=_chat_template(path),
        generation=guess_generation(args),
        quantization=", ".join(sorted({str(t.dtype).removeprefix("torch.") for t in raw.values()})),
        eos_token_ids=_eos_ids(path, config),
        metadata={"architectures": config.get("architectures"), "name": config.get("_name_or_path", path.name)},
    )


def _tokenizer_source(path: Path) -> TokenizerSource | None:
    tok_config = _read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").is_file() else {}
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


def _chat_template(path: Path) -> str | None:
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    if (path / "tokenizer_config.json").is_file():
        template = _read_json(path / "tokenizer_config.json").get("chat_template")
        if isinstance(template, list):  # named variants: take "default"
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return template
    return None


def _eos_ids(path: Path, config: dict) -> tuple[int, ...]:
    ids: list[int] = []
    sources = [config.get("text_config", config)]
    if (path / "generation_config.json").is_file():
        sources.append(_read_json(path / "generation_config.json"))
    for source in sources:
        eos = source.get("eos_token_id")
        ids += eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else []
    return tuple(dict.fromkeys(ids))


def guess_generation(args: ModelArgs) -> str:
    """Which Llama generation these facts describe (chooses the built-in chat format)."""
    if args.is_llama4:
        return "4"
    if args.vocab_size >= 128256:
        if args.rope_scaling is None:
            return "3"
        return "3.2" if args.tie_embeddings else "3.1"
    if args.vocab_size == 32000:
        return "1" if args.norm_eps < 5e-6 else "2"
    return "unknown"
