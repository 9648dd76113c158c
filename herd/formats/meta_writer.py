"""Writing a Meta checkpoint directory (params.json + consolidated.00.pth, one shard) as Meta's reference code
loads it: herd's canonical tensors are Meta's names and q/k order already, so they are saved as they are.
params.json states the SwiGLU width through multiple_of / ffn_dim_multiplier (Meta's FeedForward rule), and
RoPE scaling only as Meta's code knows it: `use_scaled_rope` with its hard-coded low factor 1 and original
context 8192 (herd's reader takes `rope_scaling_factor` / `rope_high_freq_factor` beside it).

Llama 4 is written in llama-models' layout (models/llama4 model.py, moe.py, ffn.py load hooks, inverted):
`attention.wqkv.weight` = cat(wq, wk, wv) with its `layer_norm_weight`; MoE layers' `feed_forward.norm.weight`,
`router_DE` [D, E], experts as the flat 2-D `moe_w_in_eD_F` / `moe_w_swiglu_eD_F` [E*D, F] and `moe_w_out_eF_D`
[E*F, D], the shared expert as `w_in_shared_FD` / `w_swiglu_FD` / `w_out_shared_DF`; dense layers'
`feed_forward.mlp.fc1_weight` = cat(w1, w3), `fc2_weight`, `layer_norm_weight`. params.json carries `moe_args`,
and the dense and expert widths both come from Meta's rules (ffn_exp, multiple_of, ffn_dim_multiplier, and
the MoE capacity_factor).

Llama 3.2 Vision is written in llama-models' multimodal layout (herd.formats.meta_mllama.meta_layout), where
Meta's code can state the model (params_fields says where it cannot)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from herd.config import ModelArgs, MoEArgs, ffn_hidden_dim
from herd.errors import FormatError, UnsupportedArchitecture
from herd.formats import meta_mllama
from herd.formats.checkpoint import TokenizerSource
from herd.formats.hf_writer import write_tokenizer


def _ffn_params(args: ModelArgs) -> dict:
    """multiple_of (and ffn_dim_multiplier) that Meta's rule turns into exactly args.hidden_dim."""
    for multiple_of in (256, 128, 64, 32, 16, 8, 1):
        if ffn_hidden_dim(args.dim, multiple_of, None) == args.hidden_dim:
            return {"multiple_of": multiple_of}
    base = int(2 * int(4 * args.dim) / 3)
    for multiple_of in (1024, 512, 256, 128, 64, 32, 16, 8, 1):
        if args.hidden_dim % multiple_of:
            continue
        multiplier = round(args.hidden_dim / base, 4)
        if ffn_hidden_dim(args.dim, multiple_of, multiplier) == args.hidden_dim:
            return {"multiple_of": multiple_of, "ffn_dim_multiplier": multiplier}
    return {"multiple_of": args.hidden_dim, "ffn_dim_multiplier": args.hidden_dim / base}


def _moe_width(dim: int, multiple_of: int, multiplier: float | None, capacity: float | None) -> int:
    """llama-models MoE.__init__ (ffn_exp 4): the routed experts' width; capacity None: auto_scale_F off."""
    hidden = int(2 * int(4.0 * dim) / 3)
    hidden = int((multiplier or 1.0) * hidden)
    if capacity is not None:
        hidden = int(hidden / (capacity + 1))
    return hidden + (-hidden % multiple_of)


def _llama4_ffn_params(args: ModelArgs) -> dict:
    """multiple_of, ffn_dim_multiplier and moe_args' capacity_factor / auto_scale_F that Meta's rules turn
    into both args.hidden_dim (dense) and args.moe.hidden_dim (experts)."""
    dim, dense, expert = args.dim, args.hidden_dim, args.moe.hidden_dim
    base = int(2 * int(4 * dim) / 3)
    for multiple_of in (2048, 1024, 512, 256, 128, 64, 32, 16, 8, 1):
        for multiplier in (None, *(round(dense / base, d) for d in (1, 2, 4, 6)), dense / base):
            if ffn_hidden_dim(dim, multiple_of, multiplier) != dense:
                continue
            scaled = int((multiplier or 1.0) * base)
            ratio = scaled / expert - 1
            for capacity in (1.0, None, *(round(ratio, d) for d in (1, 2, 4, 6)), ratio):
                if capacity is not None and capacity < 0:
                    continue
                if _moe_width(dim, multiple_of, multiplier, capacity) == expert:
                    params = {"multiple_of": multiple_of, "ffn_exp": 4.0}
                    if multiplier is not None:
                        params["ffn_dim_multiplier"] = multiplier
                    moe = {"capacity_factor": 1.0 if capacity is None else capacity, "auto_scale_F": capacity is not None}
                    return {**params, "_moe": moe}
    raise UnsupportedArchitecture(f"no multiple_of / ffn_dim_multiplier / capacity_factor gives Meta's rules both "
                                  f"the dense width {dense} and the expert width {expert} at dim {dim}")


def _llama4_params(args: ModelArgs) -> dict:
    moe: MoEArgs | None = args.moe
    if moe is None:
        raise UnsupportedArchitecture("a Llama 4 model without experts has no llama-models layout")
    n = args.n_layers
    step = next((s for s in range(1, n + 1) if tuple(range(s - 1, n, s)) == tuple(moe.layers)), None)
    if step is None:
        raise UnsupportedArchitecture(f"MoE layers {list(moe.layers)} are not every k-th layer, which is all "
                                      "params.json's interleave_moe_layer_step can say")
    params = {}
    if args.nope_layers:
        interval = args.nope_layers[0] + 1
        if tuple(args.nope_layers) != tuple(range(interval - 1, n, interval)):
            raise UnsupportedArchitecture(f"NoPE layers {list(args.nope_layers)} are not every k-th layer, which "
                                          "is all params.json's nope_layer_interval can say")
        params["nope_layer_interval"] = interval
    ffn = _llama4_ffn_params(args)
    moe_args = {"num_experts": moe.num_experts, "top_k": moe.top_k, "interleave_moe_layer_step": step,
                **ffn.pop("_moe")}
    params.update(ffn)
    params.update(use_qk_norm=args.use_qk_norm, attention_chunk_size=args.attention_chunk_size,
                  attn_temperature_tuning=args.attn_temperature_tuning, floor_scale=args.floor_scale,
                  attn_scale=args.attn_scale, moe_args=moe_args)
    return params


def meta_params(args: ModelArgs) -> dict:
    if args.is_llama4 and args.head_dim != args.dim // args.n_heads:
        raise UnsupportedArchitecture(f"llama-models' Llama 4 uses head_dim = dim // n_heads "
                                      f"({args.dim // args.n_heads}), this model {args.head_dim}")
    params = {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads,
              "vocab_size": args.vocab_size, "norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
              "max_seq_len": args.max_seq_len}
    params.update(_llama4_params(args) if args.is_llama4 else _ffn_params(args))
    if args.head_dim != args.dim // args.n_heads:
        params["head_dim"] = args.head_dim
    s = args.rope_scaling
    if s is not None:
        if s.kind != "llama3" or s.low_freq_factor != 1.0 or s.original_max_position != 8192:
            raise UnsupportedArchitecture(f"RoPE scaling {s} cannot be stated in params.json (Meta's code knows "
                                          "only llama3 scaling with low_freq_factor 1 and original context 8192)")
        params.update(use_scaled_rope=True, rope_scaling_factor=s.factor, rope_high_freq_factor=s.high_freq_factor)
    elif args.is_llama4:
        params["use_scaled_rope"] = False
    if args.cross_attention_layers:
        params.update(meta_mllama.params_fields(args))
    elif args.is_llama4 and args.vision is not None:
        params["vision_args"] = _llama4_vision_params(args.vision)
    return params


def _llama4_vision_params(v) -> dict:
    """params.json vision_args (llama-models llama4/args.py VisionArgs); what Meta's encoder fixes and herd's
    Meta reader therefore assumes (2D RoPE theta 10000, LayerNorm eps 1e-5, RGB) must hold."""
    fixed = {"rope_theta": (v.rope_theta, 10000.0), "norm_eps": (v.norm_eps, 1e-5), "n_channels": (v.n_channels, 3)}
    for name, (have, meta) in fixed.items():
        if have != meta:
            raise UnsupportedArchitecture(f"image encoder {name} {have}; Meta's Llama 4 code fixes {meta}")
    return {"image_size": {"height": v.image_size, "width": v.image_size},
            "patch_size": {"height": v.patch_size, "width": v.patch_size},
            "dim": v.dim, "n_layers": v.n_layers, "n_heads": v.n_heads, "mlp_ratio": v.hidden_dim / v.dim,
            "output_dim": v.output_dim, "pixel_shuffle_ratio": v.pixel_shuffle_ratio}


def llama4_state(tensors: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """herd's canonical Llama 4 tensors -> llama-models' checkpoint names and layouts."""
    out, layers = {}, {}
    for name, t in tensors.items():
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            layers.setdefault(int(i), {})[rest] = t
        else:
            out[name] = t
    E, D = (args.moe.num_experts, args.dim)
    for i, w in sorted(layers.items()):
        p = f"layers.{i}."

        def take(rest):
            if rest not in w:
                raise UnsupportedArchitecture(f"layer {i} has no {rest}, which a Llama 4 checkpoint needs")
            return w.pop(rest)

        out[p + "attention.wqkv.weight"] = torch.cat([take("attention.wq.weight"), take("attention.wk.weight"),
                                                      take("attention.wv.weight")], 0)
        out[p + "attention.wqkv.layer_norm_weight"] = take("attention_norm.weight")
        out[p + "attention.wo.weight"] = take("attention.wo.weight")
        if i in args.moe.layers:
            out[p + "feed_forward.norm.weight"] = take("ffn_norm.weight")
            out[p + "feed_forward.router_DE"] = take("feed_forward.router.weight").t()
            w1, w3 = take("feed_forward.experts.w1"), take("feed_forward.experts.w3")  # [E, F, D]
            out[p + "feed_forward.experts.moe_w_in_eD_F"] = w1.transpose(1, 2).reshape(E * D, -1)
            out[p + "feed_forward.experts.moe_w_swiglu_eD_F"] = w3.transpose(1, 2).reshape(E * D, -1)
            out[p + "feed_forward.experts.moe_w_out_eF_D"] = take("feed_forward.experts.w2").transpose(1, 2).reshape(-1, D)
            out[p + "feed_forward.w_in_shared_FD.weight"] = take("feed_forward.shared_expert.w1.weight")
            out[p + "feed_forward.w_swiglu_FD.weight"] = take("feed_forward.shared_expert.w3.weight")
            out[p + "feed_forward.w_out_shared_DF.weight"] = take("feed_forward.shared_expert.w2.weight")
        else:
            out[p + "feed_forward.mlp.layer_norm_weight"] = take("ffn_norm.weight")
            out[p + "feed_forward.mlp.fc1_weight"] = torch.cat([take("feed_forward.w1.weight"),
                                                                take("feed_forward.w3.weight")], 0)
            out[p + "feed_forward.mlp.fc2_weight"] = take("feed_forward.w2.weight")
        if w:
            raise UnsupportedArchitecture(f"layer {i}: {sorted(w)} have no place in a Llama 4 checkpoint")
    return out


def write_meta(out: str | Path, args: ModelArgs, tensors: dict[str, torch.Tensor], tokenizer: TokenizerSource | None,
               lineage: dict | None = None, chat_template: str | None = None,
               tokenizer_json: tuple[str, dict] | None = None) -> Path:
    """A Meta checkpoint directory: consolidated.00.pth and params.json, and the tokenizer. Meta's format is a
    tokenizer.model (SentencePiece or tiktoken), copied as it is; a tokenizer Meta's format has no file for
    (an HF tokenizer.json, a GGUF vocabulary, given as `tokenizer_json`) goes in as tokenizer.json. The chat
    template, which params.json cannot hold, goes into tokenizer_config.json (herd.formats.meta reads both)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FormatError(f"{out}: exists and is not empty")
    params = meta_params(args)  # before anything is written: it refuses what params.json cannot state
    out.mkdir(parents=True, exist_ok=True)
    if args.is_llama4:
        tensors = llama4_state(tensors, args)
    if args.cross_attention_layers:
        tensors = meta_mllama.meta_layout(tensors, args)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    if args.tie_embeddings:  # Meta's 3.2 files store the tied output as a copy
        state["output.weight"] = state["tok_embeddings.weight"].clone()
    torch.save(state, out / "consolidated.00.pth")
    (out / "params.json").write_text(json.dumps(params, indent=2))
    if tokenizer is not None and tokenizer.kind in ("sentencepiece", "tiktoken"):
        tokenizer_json = None  # Meta's own tokenizer.model says it all
    write_tokenizer(out, tokenizer, tokenizer_json, chat_template)
    if lineage is not None:
        (out / "herd.json").write_text(json.dumps({"format": "herd-lineage", "lineage": lineage}, indent=2))
    return out


__all__ = ["write_meta", "meta_params", "llama4_state"]
