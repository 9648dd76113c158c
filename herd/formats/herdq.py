"""herd's quantized directory: what `herd quantize` writes and herd loads directly.

Layout of OUT/:
- `herd.json`: {"format": "herd-quantized", "version": 1, "scheme": "q4" | "q8", "group_size": 32,
  "args": ModelArgs as a dict, "generation", "chat_template", "eos_token_ids", "tokenizer": {"kind",
  "file" (a name inside OUT), "config"}, "source": {"path", "format", "quantization"}};
- the tokenizer file, copied from the source (tokenizer.json or tokenizer.model);
- `model.safetensors`, canonical herd names (Meta's, interleaved q/k), three kinds of entries:
  - `NAME.q4` uint8 [N, K/2] (element 2i in the low nibble of byte i, 2i+1 in the high one),
    `NAME.scales` and `NAME.zeros` bf16 [N, K/group]: w = (q - 8) * scale + zero, q in 0..15, per group of
    `group_size` along the input dim (PyTorch's CPU int4 convention: no rounding when packed for the kernel);
  - `NAME.q8` int8 [N, K] and `NAME.scales` bf16 [N]: w = q * scale, per output channel;
  - `NAME`: any other tensor as the source stored it (norms, Llama 4 routers and stacked experts).
Linear weights and the embedding are quantized (a tied output shares the embedding's quantized rows).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch

from herd.config import MllamaVisionArgs, ModelArgs, MoEArgs, RopeScaling, VisionArgs
from herd.errors import ConfigError, FormatError, MissingTensor
from herd.formats.checkpoint import Checkpoint, TokenizerSource
from herd.formats.fields import read_json
from herd.quant import GGMLTensor, Int4Weight, Int8Weight

MARKER = "herd.json"
SCHEMES = ("q4", "q8")
_QUANTIZED_SUFFIXES = (".weight",)
_KEEP = ("norm.weight", ".router.weight")  # small or routing-critical: stored as they are


def is_herdq_dir(path: Path) -> bool:
    # HF and Meta exports carry a herd.json lineage record beside their config.json / params.json
    return (path / MARKER).is_file() and not (path / "config.json").is_file() and not (path / "params.json").is_file()


def _args_from_dict(d: dict) -> ModelArgs:
    d = dict(d)
    if d.get("rope_scaling"):
        rs = dict(d["rope_scaling"])
        if rs.get("divisors") is not None:
            rs["divisors"] = tuple(rs["divisors"])
        d["rope_scaling"] = RopeScaling(**rs)
    if d.get("moe"):
        d["moe"] = MoEArgs(**{**d["moe"], "layers": tuple(d["moe"]["layers"])})
    d["nope_layers"] = tuple(d.get("nope_layers", ()))
    if d.get("vision"):  # an image model's encoder: Llama 3.2 Vision's has tiles in arrangements, Llama 4's not
        v = dict(d["vision"])
        if "aspect_ratios" in v:
            v["intermediate_layers"] = tuple(v["intermediate_layers"])
            v["aspect_ratios"] = tuple(tuple(r) for r in v["aspect_ratios"])
            d["vision"] = MllamaVisionArgs(**v)
        else:
            d["vision"] = VisionArgs(**v)
    d["cross_attention_layers"] = tuple(d.get("cross_attention_layers", ()))
    return ModelArgs(**d)


def read_herdq(path: Path) -> Checkpoint:
    from safetensors.torch import load_file

    from herd.formats.hf import check_safetensors

    path = Path(path)
    meta = read_json(path / MARKER)
    if meta.get("format") != "herd-quantized" or meta.get("version") != 1:
        raise FormatError(f"{path / MARKER}: not a herd-quantized version 1 directory")
    if not (path / "model.safetensors").is_file():
        raise MissingTensor(f"{path}: no model.safetensors")
    check_safetensors(path / "model.safetensors")
    try:
        args = _args_from_dict(meta["args"])
        group_size, scheme = int(meta["group_size"]), meta["scheme"]
    except ConfigError as e:
        raise ConfigError(f"{path / MARKER}: {e}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as e:  # written by herd itself: any damage is corruption
        raise FormatError(f"{path / MARKER}: damaged args, group_size or scheme ({type(e).__name__}: {e})") from None
    raw = load_file(str(path / "model.safetensors"))
    parts = [f"{k[:-3]}.{p}" for k in raw if k.endswith(".q4") for p in ("scales", "zeros")]
    parts += [f"{k[:-3]}.scales" for k in raw if k.endswith(".q8")]
    if missing := [p for p in parts if p not in raw]:
        raise MissingTensor(f"{path / 'model.safetensors'}: quantized weights without their {missing[:4]}")
    tensors = {}
    for key in list(raw):
        if key.endswith(".q4"):
            name = key[:-3]
            tensors[name] = Int4Weight(raw.pop(key), raw.pop(f"{name}.scales"), raw.pop(f"{name}.zeros"), group_size)
        elif key.endswith(".q8"):
            name = key[:-3]
            tensors[name] = Int8Weight(raw.pop(key), raw.pop(f"{name}.scales"))
    tensors.update(raw)
    tok = meta.get("tokenizer")
    tokenizer = TokenizerSource(tok["kind"], path / tok["file"], config=tok.get("config") or {}) if tok else None
    source = meta.get("source", {})
    return Checkpoint(
        args=args,
        tensors=tensors,
        format="herd-quantized",
        path=path,
        tokenizer=tokenizer,
        chat_template=meta.get("chat_template"),
        generation=meta.get("generation", "unknown"),
        quantization=f"{scheme} (herd: int4 group {group_size})" if scheme == "q4"
        else "q8 (herd: int8 per channel)",
        eos_token_ids=tuple(meta.get("eos_token_ids", ())),
        metadata={"source": source},
    )


def _quantizable(name: str, t) -> bool:
    return t.dim() == 2 and name.endswith(_QUANTIZED_SUFFIXES) and not name.endswith(_KEEP)


def write_herdq(checkpoint: Checkpoint, out: Path, scheme: str, group_size: int = 32, progress=None) -> Path:
    """Quantize `checkpoint` (HF or Meta) and write it to the directory `out` (created; must be empty)."""
    from safetensors.torch import save_file

    from herd.quant.linear import pack_nibbles, quantize_int4, quantize_int8

    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}: use one of {', '.join(SCHEMES)}")
    if any(isinstance(t, (GGMLTensor, Int4Weight, Int8Weight)) for t in checkpoint.tensors.values()):
        raise FormatError(f"{checkpoint.path}: already quantized ({checkpoint.quantization}); herd loads it as it is")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FormatError(f"{out}: exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    stored: dict[str, torch.Tensor] = {}
    names = sorted(checkpoint.tensors)
    for i, name in enumerate(names):
        t = checkpoint.tensors[name]
        if _quantizable(name, t) and (scheme == "q8" or t.shape[1] % group_size == 0):
            if scheme == "q4":
                q, scales, zeros = quantize_int4(t, group_size)
                stored.update({f"{name}.q4": pack_nibbles(q), f"{name}.scales": scales, f"{name}.zeros": zeros})
            else:
                q, scales = quantize_int8(t)
                stored.update({f"{name}.q8": q, f"{name}.scales": scales})
        else:
            stored[name] = t.contiguous().clone()
        if progress:
            progress(i + 1, len(names))
    save_file(stored, str(out / "model.safetensors"))
    tok = None
    if checkpoint.tokenizer is not None:
        if checkpoint.tokenizer.kind == "gguf" or checkpoint.tokenizer.path is None:
            raise FormatError(f"{checkpoint.path}: the tokenizer must be a file to copy")
        shutil.copyfile(checkpoint.tokenizer.path, out / checkpoint.tokenizer.path.name)
        tok = {"kind": checkpoint.tokenizer.kind, "file": checkpoint.tokenizer.path.name,
               "config": _jsonable(checkpoint.tokenizer.config)}
    meta = {
        "format": "herd-quantized", "version": 1, "scheme": scheme, "group_size": group_size,
        "args": dataclasses.asdict(checkpoint.args), "generation": checkpoint.generation,
        "chat_template": checkpoint.chat_template, "eos_token_ids": list(checkpoint.eos_token_ids),
        "tokenizer": tok,
        "source": {"path": str(checkpoint.path), "format": checkpoint.format, "quantization": checkpoint.quantization},
    }
    (out / MARKER).write_text(json.dumps(meta, indent=1))
    return out


def _jsonable(value):
    try:
        json.dumps(value)
        return value
    except TypeError:
        return {k: v for k, v in (value or {}).items() if is_json(v)}


def is_json(v) -> bool:
    try:
        json.dumps(v)
        return True
    except TypeError:
        return False


__all__ = ["read_herdq", "write_herdq", "is_herdq_dir", "SCHEMES"]
