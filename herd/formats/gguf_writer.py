"""Writing a GGUF file (arch "llama", or "llama4") with gguf-py, as llama.cpp's convert_hf_to_gguf.py lays it
out (LlamaModel, Llama4Model): the metadata keys it writes, tensors under GGUF names in Meta's interleaved q/k order (herd's own), norms and
1-D tensors in F32, matrices in F16 or Q8_0 (rows not a multiple of 32 fall back to F16, as the converter
does), llama3-style RoPE scaling as the `rope_freqs` divisors. The tokenizer comes as GGUF keys: a GGUF
source's own, or an HF tokenizer.json converted by the caller (herd.finetune.export.gguf_tokenizer_keys);
a lineage record goes in `general.herd.lineage` (JSON text).

Llama 4: the routed experts as ffn_{gate,up,down}_exps (one 3-D tensor each, GGUF shape [D, F, E] / [F, D, E]),
the router ffn_gate_inp (always F32), the shared expert as *_shexp; q/k as they are. llama.cpp hard-codes NoPE
on every 4th layer, temperature tuning on those, and QK norm iff the model does not have 128 experts, so a
model that differs is refused; the chunk size, temperature floor and scale go in the gguf-py keys
attention.sliding_window / temperature_length / temperature_scale (what herd's reader and the test
fixtures use; llama.cpp's defaults are 8192 / 8192 / 0.1).

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
_LAYER4 = {**_LAYER, "feed_forward.router.weight": "ffn_gate_inp.weight",
           "feed_forward.experts.w1": "ffn_gate_exps.weight", "feed_forward.experts.w3": "ffn_up_exps.weight",
           "feed_forward.experts.w2": "ffn_down_exps.weight",
           "feed_forward.shared_expert.w1.weight": "ffn_gate_shexp.weight",
           "feed_forward.shared_expert.w3.weight": "ffn_up_shexp.weight",
           "feed_forward.shared_expert.w2.weight": "ffn_down_shexp.weight"}
OUT_TYPES = ("F16", "Q8_0", "F32")


def stored_type(gguf_name: str, ndim: int, out_type: str):
    """The GGML type the converter gives a tensor: 1-D, norms and the MoE router F32, the rest `out_type`
    (callers fall back to F16 where a row does not fill Q8_0 blocks)."""
    Q = _gguf().GGMLQuantizationType
    if ndim <= 1 or gguf_name.endswith("norm.weight") or gguf_name.endswith(".ffn_gate_inp.weight"):
        return Q.F32
    return getattr(Q, out_type)


def gguf_name(key: str, args: ModelArgs) -> str:
    """herd's canonical tensor name -> its GGUF name."""
    if key in _GLOBAL:
        return _GLOBAL[key]
    table = _LAYER4 if args.is_llama4 else _LAYER
    parts = key.split(".", 2)
    if len(parts) != 3 or parts[0] != "layers" or parts[2] not in table:
        raise UnsupportedArchitecture(f"tensor {key} has no GGUF {'llama4' if args.is_llama4 else 'llama'} name")
    return f"blk.{int(parts[1])}.{table[parts[2]]}"


def _check_llama4(args: ModelArgs) -> None:
    """What llama.cpp's llama4 graph hard-codes; anything else would load there as a different model."""
    n = args.n_layers
    problems = []
    if args.moe is None:
        problems.append("it has no experts")
    else:
        step = next((s for s in range(1, n + 1) if tuple(range(s - 1, n, s)) == tuple(args.moe.layers)), None)
        if step is None:
            problems.append(f"its MoE layers {list(args.moe.layers)} are not every k-th layer")
        if args.use_qk_norm != (args.moe.num_experts != 128):
            problems.append(f"llama.cpp uses QK norm iff there are not 128 experts (use_qk_norm="
                            f"{args.use_qk_norm}, {args.moe.num_experts} experts)")
    if tuple(args.nope_layers) != tuple(range(3, n, 4)):
        problems.append(f"llama.cpp puts NoPE on every 4th layer, this model on {list(args.nope_layers)}")
    if args.attention_chunk_size is None:
        problems.append("its RoPE layers attend without chunks")
    if args.floor_scale != int(args.floor_scale):
        problems.append(f"its temperature floor {args.floor_scale} is not a whole number (GGUF stores an integer)")
    if not args.attn_temperature_tuning:
        problems.append("llama.cpp always tunes the NoPE layers' attention temperature")
    if problems:
        raise UnsupportedArchitecture("this Llama 4 model cannot be written as GGUF: " + "; ".join(problems))


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
        _check_llama4(args)
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
    arch = "llama4" if args.is_llama4 else "llama"
    w = gguf.GGUFWriter(str(out), arch)
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
    if args.is_llama4:
        w.add_expert_count(args.moe.num_experts)
        w.add_expert_used_count(args.moe.top_k)
    w.add_key_length(args.head_dim)
    w.add_value_length(args.head_dim)
    w.add_file_type(file_type)
    w.add_vocab_size(args.vocab_size)
    w.add_rope_dimension_count(args.head_dim)
    if args.is_llama4:
        w.add_interleave_moe_layer_step(args.moe.layers[0] + 1)
        w.add_expert_feed_forward_length(args.moe.hidden_dim)
        w.add_sliding_window(args.attention_chunk_size)
        w.add_attn_temperature_length(int(args.floor_scale))
        w.add_attn_temperature_scale(args.attn_scale)
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
        name_in_file = gguf_name(key, args)
        arr = tensors[key].detach().float().cpu().numpy()
        qtype = stored_type(name_in_file, arr.ndim, out_type)
        try:
            data = gguf.quants.quantize(arr, qtype)
        except gguf.QuantError:
            qtype = Q.F16
            data = gguf.quants.quantize(arr, qtype)
        w.add_tensor(name_in_file, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def _order(key: str):
    if key.startswith("layers."):
        return (1, int(key.split(".")[1]), key)
    return (0 if key == "tok_embeddings.weight" else 2, 0, key)


__all__ = ["write_gguf", "gguf_name", "stored_type", "LINEAGE_KEY", "OUT_TYPES"]
