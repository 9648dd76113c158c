"""Writing a GGUF file (arch "llama") with gguf-py, as llama.cpp's convert_hf_to_gguf.py lays it out: the
metadata keys it writes, tensors under GGUF names in Meta's interleaved q/k order (herd's own), norms and
1-D tensors in F32, matrices in F16 or Q8_0 (rows not a multiple of 32 fall back to F16, as the converter
does), llama3-style RoPE scaling as the `rope_freqs` divisors. The tokenizer comes as GGUF keys: a GGUF
source's own, or an HF tokenizer.json converted by the caller (herd.finetune.export.gguf_tokenizer_keys);
a lineage record goes in `general.herd.lineage` (JSON text).

gguf-py is optional (`pip install gguf`); only this writer needs it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from herd.config import ModelArgs
from herd.errors import FormatError, HerdError, UnsupportedArchitecture
from herd.formats.checkpoint import TokenizerSource

LINEAGE_KEY = "general.herd.lineage"
_GLOBAL = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
           "output.weight": "output.weight"}
_LAYER = {"attention_norm.weight": "attn_norm.weight", "attention.wq.weight": "attn_q.weight",
          "attention.wk.weight": "attn_k.weight", "attention.wv.weight": "attn_v.weight",
          "attention.wo.weight": "attn_output.weight", "ffn_norm.weight": "ffn_norm.weight",
          "feed_forward.w1.weight": "ffn_gate.weight", "feed_forward.w2.weight": "ffn_down.weight",
          "feed_forward.w3.weight": "ffn_up.weight"}
OUT_TYPES = ("F16", "Q8_0", "F32")


def _gguf():
    try:
        import gguf
    except ImportError:
        raise HerdError("writing GGUF needs gguf-py: pip install gguf") from None
    return gguf


def _copy_tokenizer_keys(w, metadata: dict) -> None:
    for key, value in metadata.items():
        if key.endswith("_token_id") and isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, list) and value:
            w.add_array(key, value)


def write_gguf(out: str | Path, args: ModelArgs, tensors: dict[str, torch.Tensor], tokenizer: TokenizerSource | None,
               name: str = "herd export", out_type: str = "F16", chat_template: str | None = None,
               lineage: dict | None = None, rope_divisors: np.ndarray | None = None) -> Path:
    """`rope_divisors`: for llama3 RoPE scaling, the plain inverse frequencies divided by the scaled ones
    (herd.model.rope computes both; the caller passes them, as formats know no model maths)."""
    gguf = _gguf()
    if args.is_llama4:
        raise UnsupportedArchitecture("writing Llama 4 as GGUF is not supported yet")
    if out_type not in OUT_TYPES:
        raise ValueError(f"GGUF export type must be one of {', '.join(OUT_TYPES)}, got {out_type!r}")
    if tokenizer is None or not tokenizer.gguf_metadata:
        raise FormatError("GGUF export needs the tokenizer as GGUF keys (a GGUF source's, or a converted "
                          "tokenizer.json)")
    out = Path(out)
    if out.exists():
        raise FormatError(f"{out}: exists; choose a new file name")
    Q = gguf.GGMLQuantizationType
    file_type = {"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
                 "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[out_type]
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_block_count(args.n_layers)
    w.add_context_length(args.max_seq_len)
    w.add_embedding_length(args.dim)
    w.add_feed_forward_length(args.hidden_dim)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.n_kv_heads)
    w.add_rope_freq_base(args.rope_theta)
    w.add_layer_norm_rms_eps(args.norm_eps)
    w.add_key_length(args.head_dim)
    w.add_value_length(args.head_dim)
    w.add_file_type(file_type)
    w.add_vocab_size(args.vocab_size)
    w.add_rope_dimension_count(args.head_dim)
    if args.rope_scaling is not None and args.rope_scaling.kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(args.rope_scaling.factor)
    _copy_tokenizer_keys(w, {k: v for k, v in tokenizer.gguf_metadata.items() if k != "tokenizer.chat_template"})
    if chat_template:
        w.add_chat_template(chat_template)
    if lineage is not None:
        w.add_string(LINEAGE_KEY, json.dumps(lineage, sort_keys=True))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    divisors = rope_divisors
    if args.rope_scaling is not None and args.rope_scaling.kind == "divisors":
        divisors = np.asarray(args.rope_scaling.divisors, dtype=np.float32)
    elif args.rope_scaling is not None and args.rope_scaling.kind == "llama3" and divisors is None:
        raise ValueError("llama3 RoPE scaling needs rope_divisors")
    if divisors is not None:
        w.add_tensor("rope_freqs.weight", divisors.astype(np.float32), raw_dtype=Q.F32)
    for key in sorted(tensors, key=_order):
        if key == "output.weight" and args.tie_embeddings:
            continue
        if key in _GLOBAL:
            gguf_name = _GLOBAL[key]
        else:
            _, layer, rest = key.split(".", 2)
            if rest not in _LAYER:
                raise UnsupportedArchitecture(f"tensor {key} has no GGUF llama name")
            gguf_name = f"blk.{int(layer)}.{_LAYER[rest]}"
        arr = tensors[key].detach().float().cpu().numpy()
        qtype = Q.F32 if arr.ndim <= 1 or gguf_name.endswith("norm.weight") else getattr(Q, out_type)
        try:
            data = gguf.quants.quantize(arr, qtype)
        except gguf.QuantError:
            qtype = Q.F16
            data = gguf.quants.quantize(arr, qtype)
        w.add_tensor(gguf_name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def _order(key: str):
    if key.startswith("layers."):
        return (1, int(key.split(".")[1]), key)
    return (0 if key == "tok_embeddings.weight" else 2, 0, key)


__all__ = ["write_gguf", "LINEAGE_KEY", "OUT_TYPES"]
