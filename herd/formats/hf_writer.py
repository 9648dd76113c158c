"""Writing an HF directory (config.json + model.safetensors + tokenizer files) that transformers loads:
herd's canonical tensors renamed back to HF's (herd.formats.hf.LAYER_MAP inverted).

Llama 1-3 become a LlamaForCausalLM with q/k rows permuted back to rotate_half order. Llama 4 becomes a
Llama4ForCausalLM (model_type llama4_text, the text model only): q/k stay as they are (HF Llama 4 is
interleaved), the dense FFN and the router / shared expert live under `feed_forward.`, and each MoE layer's
routed experts are fused as transformers stores them, gate_up_proj [E, D, 2F] (x @ W, gate first) and
down_proj [E, F, D]."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from herd.config import ModelArgs
from herd.errors import FormatError, UnsupportedArchitecture
from herd.formats.checkpoint import TokenizerSource
from herd.formats.herdq import is_json
from herd.formats.hf import LAYER_MAP, permute_for_rotate_half

LINEAGE_FILE = "herd.json"
_HERD_TO_HF = {v: k for k, v in LAYER_MAP.items() if k.startswith(("self_attn.", "mlp.", "input_", "post_"))}
_HERD_TO_HF4 = {v: k for k, v in LAYER_MAP.items() if not k.startswith("mlp.")}
_EXPERTS = ("feed_forward.experts.w1", "feed_forward.experts.w2", "feed_forward.experts.w3")


def _rope_config(args: ModelArgs) -> dict | None:
    scaling = args.rope_scaling
    if scaling is None:
        return None
    if scaling.kind == "llama3":
        return {"rope_type": "llama3", "factor": scaling.factor, "low_freq_factor": scaling.low_freq_factor,
                "high_freq_factor": scaling.high_freq_factor,
                "original_max_position_embeddings": scaling.original_max_position}
    if scaling.kind == "linear":
        return {"rope_type": "linear", "factor": scaling.factor}
    if any(abs(d - 1.0) > 0 for d in scaling.divisors):
        raise UnsupportedArchitecture("this model's RoPE frequencies come as per-frequency divisors (GGUF "
                                      "rope_freqs), which an HF config cannot state")
    return None


def _llama4_config(args: ModelArgs, common: dict) -> dict:
    moe = args.moe
    if moe is None:
        raise UnsupportedArchitecture("a Llama 4 model without experts has no Llama4ForCausalLM layout")
    if args.floor_scale != int(args.floor_scale):
        raise UnsupportedArchitecture(f"temperature floor_scale {args.floor_scale} is not a whole number, which "
                                      "Llama4TextConfig requires")
    return {
        **common, "architectures": ["Llama4ForCausalLM"], "model_type": "llama4_text",
        "intermediate_size": moe.hidden_dim, "intermediate_size_mlp": args.hidden_dim,
        "num_local_experts": moe.num_experts, "num_experts_per_tok": moe.top_k,
        "moe_layers": list(moe.layers), "interleave_moe_layer_step": _step(moe.layers, args.n_layers),
        # 1 = this layer uses RoPE (transformers' convention)
        "no_rope_layers": [int(i not in args.nope_layers) for i in range(args.n_layers)],
        "attention_chunk_size": args.attention_chunk_size, "use_qk_norm": args.use_qk_norm,
        "attn_temperature_tuning": args.attn_temperature_tuning, "floor_scale": int(args.floor_scale),
        "attn_scale": args.attn_scale, "router_jitter_noise": 0.0, "router_aux_loss_coef": 0.001,
    }


def _step(layers: tuple[int, ...], n_layers: int) -> int:
    """interleave_moe_layer_step for informational readers; moe_layers (always written) is what counts."""
    for step in range(1, n_layers + 1):
        if tuple(range(step - 1, n_layers, step)) == tuple(layers):
            return step
    return 1


def hf_config(args: ModelArgs, eos_token_ids=(), bos_token_id: int | None = None) -> dict:
    eos = list(eos_token_ids)
    common = {
        "hidden_size": args.dim, "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim, "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta, "rope_scaling": _rope_config(args),
        "max_position_embeddings": args.max_seq_len, "tie_word_embeddings": args.tie_embeddings,
        "hidden_act": "silu", "attention_bias": False, "torch_dtype": "float32",
        "bos_token_id": bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
    }
    if args.is_llama4:
        return _llama4_config(args, common)
    return {**common, "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "intermediate_size": args.hidden_dim, "mlp_bias": False}


def hf_tensors(tensors: dict[str, torch.Tensor], args: ModelArgs, dtype: torch.dtype | None = None) -> dict:
    out = {}
    to_hf = _HERD_TO_HF4 if args.is_llama4 else _HERD_TO_HF
    experts: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        t = t.detach().to("cpu")
        if dtype is not None:
            t = t.to(dtype)
        if name == "tok_embeddings.weight":
            key = "model.embed_tokens.weight"
        elif name == "norm.weight":
            key = "model.norm.weight"
        elif name == "output.weight":
            if args.tie_embeddings:
                continue
            key = "lm_head.weight"
        else:
            _, layer, rest = name.split(".", 2)
            if args.is_llama4 and rest in _EXPERTS:
                experts.setdefault(layer, {})[rest.rsplit(".", 1)[1]] = t
                continue
            if rest not in to_hf:
                cls = "Llama4ForCausalLM" if args.is_llama4 else "LlamaForCausalLM"
                raise UnsupportedArchitecture(f"tensor {name} has no place in an HF {cls}")
            key = f"model.layers.{layer}.{to_hf[rest]}"
            if not args.is_llama4 and rest == "attention.wq.weight":
                t = permute_for_rotate_half(t, args.n_heads)
            elif not args.is_llama4 and rest == "attention.wk.weight":
                t = permute_for_rotate_half(t, args.n_kv_heads)
        out[key] = t.contiguous()
    for layer, w in experts.items():  # herd: w1, w3 [E, F, D] and w2 [E, D, F], nn.Linear's [out, in] per expert
        if w.keys() != {"w1", "w2", "w3"}:
            raise UnsupportedArchitecture(f"layer {layer}: experts {sorted(w)} without the rest of w1, w2, w3")
        prefix = f"model.layers.{layer}.feed_forward.experts."
        out[prefix + "gate_up_proj"] = torch.cat([w["w1"].transpose(1, 2), w["w3"].transpose(1, 2)], -1).contiguous()
        out[prefix + "down_proj"] = w["w2"].transpose(1, 2).contiguous()
    return out


def write_hf(out: str | Path, args: ModelArgs, tensors: dict[str, torch.Tensor], tokenizer: TokenizerSource | None,
             chat_template: str | None = None, eos_token_ids=(), lineage: dict | None = None,
             dtype: torch.dtype | None = None) -> Path:
    """An HF directory at `out` (new or empty). A tokenizer.json / tokenizer.model is copied; a GGUF-embedded
    tokenizer cannot be written as HF files, so such an export carries none (transformers still loads the
    weights; herd then needs token ids)."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FormatError(f"{out}: exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    tok_config = dict(tokenizer.config) if tokenizer is not None else {}
    bos = None
    if tokenizer is not None and tokenizer.kind in ("hf_json", "sentencepiece", "tiktoken") and tokenizer.path:
        shutil.copyfile(tokenizer.path, out / tokenizer.path.name)
    if tokenizer is not None and tokenizer.gguf_metadata:
        bos = tokenizer.gguf_metadata.get("tokenizer.ggml.bos_token_id")
    config = hf_config(args, eos_token_ids, bos)
    save_file(hf_tensors(tensors, args, dtype), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if tok_config or chat_template:
        tok_config = {k: v for k, v in tok_config.items() if is_json(v)}
        if chat_template:
            tok_config["chat_template"] = chat_template
        (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    if lineage is not None:
        (out / LINEAGE_FILE).write_text(json.dumps({"format": "herd-lineage", "lineage": lineage}, indent=2))
    return out




def read_lineage(path: str | Path) -> dict | None:
    """The lineage record of an HF export or adapter directory (herd.json), if it has one."""
    marker = Path(path) / LINEAGE_FILE
    if not Path(path).is_dir() or not marker.is_file():
        return None
    try:
        data = json.loads(marker.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data.get("lineage") if isinstance(data, dict) and data.get("format") == "herd-lineage" else None


__all__ = ["write_hf", "hf_config", "hf_tensors", "read_lineage", "LINEAGE_FILE"]
