"""Writing an HF directory (config.json + model.safetensors + tokenizer files) that transformers loads as a
LlamaForCausalLM: herd's canonical tensors renamed back to HF's (herd.formats.hf.LAYER_MAP inverted) and
q/k rows permuted back to rotate_half order. Llama 1-3 only: Llama 4's HF layout (fused experts,
vision towers) is not written."""

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


def hf_config(args: ModelArgs, eos_token_ids=(), bos_token_id: int | None = None) -> dict:
    if args.is_llama4:
        raise UnsupportedArchitecture("writing Llama 4 as an HF directory is not supported (export it to GGUF)")
    scaling = args.rope_scaling
    rope = None
    if scaling is not None:
        if scaling.kind == "llama3":
            rope = {"rope_type": "llama3", "factor": scaling.factor, "low_freq_factor": scaling.low_freq_factor,
                    "high_freq_factor": scaling.high_freq_factor,
                    "original_max_position_embeddings": scaling.original_max_position}
        elif scaling.kind == "linear":
            rope = {"rope_type": "linear", "factor": scaling.factor}
        elif any(abs(d - 1.0) > 0 for d in scaling.divisors):
            raise UnsupportedArchitecture("this model's RoPE frequencies come as per-frequency divisors (GGUF "
                                          "rope_freqs), which an HF config cannot state")
    eos = list(eos_token_ids)
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": args.dim,
        "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim, "intermediate_size": args.hidden_dim,
        "vocab_size": args.vocab_size, "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
        "rope_scaling": rope, "max_position_embeddings": args.max_seq_len, "tie_word_embeddings": args.tie_embeddings,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
        "bos_token_id": bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
    }


def hf_tensors(tensors: dict[str, torch.Tensor], args: ModelArgs, dtype: torch.dtype | None = None) -> dict:
    out = {}
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
            if rest not in _HERD_TO_HF:
                raise UnsupportedArchitecture(f"tensor {name} has no place in an HF LlamaForCausalLM")
            key = f"model.layers.{layer}.{_HERD_TO_HF[rest]}"
            if rest == "attention.wq.weight":
                t = permute_for_rotate_half(t, args.n_heads)
            elif rest == "attention.wk.weight":
                t = permute_for_rotate_half(t, args.n_kv_heads)
        out[key] = t.contiguous()
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
