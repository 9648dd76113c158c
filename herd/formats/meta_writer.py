"""Writing a Meta checkpoint directory (params.json + consolidated.00.pth, one shard) as Meta's reference code
loads it: herd's canonical tensors are Meta's names and q/k order already, so they are saved as they are.
params.json states the SwiGLU width through multiple_of / ffn_dim_multiplier (Meta's FeedForward rule), and
RoPE scaling only as Meta's code knows it: `use_scaled_rope` with its hard-coded low factor 1 and original
context 8192 (herd's reader takes `rope_scaling_factor` / `rope_high_freq_factor` beside it). Llama 1-3 only."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from herd.config import ModelArgs, ffn_hidden_dim
from herd.errors import FormatError, UnsupportedArchitecture
from herd.formats.checkpoint import TokenizerSource


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


def meta_params(args: ModelArgs) -> dict:
    if args.is_llama4:
        raise UnsupportedArchitecture("writing Llama 4 as a Meta checkpoint is not supported (export it to GGUF)")
    params = {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads,
              "vocab_size": args.vocab_size, "norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
              "max_seq_len": args.max_seq_len, **_ffn_params(args)}
    if args.head_dim != args.dim // args.n_heads:
        params["head_dim"] = args.head_dim
    s = args.rope_scaling
    if s is not None:
        if s.kind != "llama3" or s.low_freq_factor != 1.0 or s.original_max_position != 8192:
            raise UnsupportedArchitecture(f"RoPE scaling {s} cannot be stated in params.json (Meta's code knows "
                                          "only llama3 scaling with low_freq_factor 1 and original context 8192)")
        params.update(use_scaled_rope=True, rope_scaling_factor=s.factor, rope_high_freq_factor=s.high_freq_factor)
    return params


def write_meta(out: str | Path, args: ModelArgs, tensors: dict[str, torch.Tensor], tokenizer: TokenizerSource | None,
               lineage: dict | None = None) -> Path:
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FormatError(f"{out}: exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    if args.tie_embeddings:  # Meta's 3.2 files store the tied output as a copy
        state["output.weight"] = state["tok_embeddings.weight"].clone()
    torch.save(state, out / "consolidated.00.pth")
    (out / "params.json").write_text(json.dumps(meta_params(args), indent=2))
    if tokenizer is not None and tokenizer.kind in ("sentencepiece", "tiktoken") and tokenizer.path:
        shutil.copyfile(tokenizer.path, out / "tokenizer.model")
    if lineage is not None:
        (out / "herd.json").write_text(json.dumps({"format": "herd-lineage", "lineage": lineage}, indent=2))
    return out


__all__ = ["write_meta", "meta_params"]
