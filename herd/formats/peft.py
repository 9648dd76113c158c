"""LoRA adapters in Hugging Face PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

Keys are PEFT's for a LlamaForCausalLM: `base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`
([r, in]) and `...lora_B.weight` ([out, r]); the update is (lora_alpha / r) · B A. herd's q/k rows are in
Meta's interleaved RoPE order and HF's in rotate_half order (herd.formats.hf), so B of q_proj and k_proj is
permuted on the way in and out (A acts on the input, whose order both share); Llama 4 is never permuted.
Only what herd applies is accepted: plain LoRA (no DoRA, rsLoRA, per-module ranks, biases or extra
trained modules); anything else is refused by name.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from herd.config import ModelArgs
from herd.errors import FormatError, MissingTensor
from herd.formats.fields import read_json
from herd.formats.hf import permute_for_interleaved, permute_for_rotate_half

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model.model."

# HF module (within a layer) <-> herd module
HF_TO_HERD = {
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3",
    "mlp.down_proj": "feed_forward.w2",
}
HERD_TO_HF = {v: k for k, v in HF_TO_HERD.items()}
_KEY = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(\w+\.\w+)\.lora_([AB])(?:\.default)?\.weight")
# settings that change the maths, with the value herd implements
_PLAIN = {"use_dora": False, "use_rslora": False, "fan_in_fan_out": False, "bias": "none", "modules_to_save": None,
          "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None}


def is_adapter_dir(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / CONFIG).is_file()


def _qk_heads(module: str, args: ModelArgs) -> int | None:
    if args.is_llama4:
        return None
    return {"attention.wq": args.n_heads, "attention.wk": args.n_kv_heads}.get(module)


def read_adapter(path: str | Path, args: ModelArgs) -> tuple[dict, dict[str, torch.Tensor]]:
    """(settings {"rank", "alpha", "dropout", "targets" (herd module names)}, herd-named A/B tensors
    `layers.N.attention.wq.lora_A` ...) of a PEFT LoRA adapter directory."""
    from safetensors.torch import load_file

    path = Path(path)
    config_path = path / CONFIG
    if not config_path.is_file():
        raise FormatError(f"{path}: not a PEFT adapter directory (no {CONFIG})")
    cfg = read_json(config_path)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise FormatError(f"{config_path}: peft_type {cfg.get('peft_type')!r}; herd applies LORA adapters")
    for key, plain in _PLAIN.items():
        value = cfg.get(key, plain)
        if value not in (plain, None) and not (plain == {} and not value):
            raise FormatError(f"{config_path}: {key} = {value!r} is not supported (herd applies plain LoRA: {plain!r})")
    rank, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, (int, float)):
        raise FormatError(f"{config_path}: r must be a positive integer and lora_alpha a number, got {rank!r}, {alpha!r}")
    weights = path / WEIGHTS
    if not weights.is_file():
        raise MissingTensor(f"{path}: no {WEIGHTS}")
    from herd.formats.hf import check_safetensors

    check_safetensors(weights)
    raw = load_file(str(weights))
    tensors, modules = {}, set()
    for key, t in raw.items():
        m = _KEY.fullmatch(key)
        if not m or m[2] not in HF_TO_HERD:
            raise FormatError(f"{weights}: tensor {key} is not a LoRA weight herd can place "
                              f"(expected {PREFIX}layers.N.<{'|'.join(HF_TO_HERD)}>.lora_A/B.weight)")
        layer, module, part = int(m[1]), HF_TO_HERD[m[2]], m[3]
        if layer >= args.n_layers:
            raise FormatError(f"{weights}: tensor {key} names layer {layer}; the model has {args.n_layers}")
        t = t.float()
        heads = _qk_heads(module, args)
        if part == "B" and heads is not None:
            t = permute_for_interleaved(t, heads)
        modules.add(f"layers.{layer}.{module}")
        tensors[f"layers.{layer}.{module}.lora_{part}"] = t
    for module in modules:
        for part in "AB":
            if f"{module}.lora_{part}" not in tensors:
                raise MissingTensor(f"{weights}: {module} has no lora_{part}")
        a, b = tensors[f"{module}.lora_A"], tensors[f"{module}.lora_B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise FormatError(f"{weights}: {module} lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not have rank {rank}")
    settings = {"rank": rank, "alpha": float(alpha), "dropout": float(cfg.get("lora_dropout", 0.0) or 0.0),
                "modules": sorted(modules)}
    return settings, tensors


def write_adapter(out: str | Path, tensors: dict[str, torch.Tensor], args: ModelArgs, rank: int, alpha: float,
                  dropout: float, base_name: str | None = None) -> Path:
    """herd-named A/B tensors (herd.transforms.lora.lora_state_dict) as a PEFT adapter directory."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stored, targets = {}, set()
    for key, t in tensors.items():
        module, _, part = key.rpartition(".lora_")
        _, layer, herd_module = module.split(".", 2)
        hf_module = HERD_TO_HF[herd_module]
        heads = _qk_heads(herd_module, args)
        t = t.detach().float().cpu()
        if part == "B" and heads is not None:
            t = permute_for_rotate_half(t, heads)
        stored[f"{PREFIX}layers.{layer}.{hf_module}.lora_{part}.weight"] = t.contiguous()
        targets.add(hf_module.split(".")[1])
    save_file(stored, str(out / WEIGHTS), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "lora_dropout": dropout,
        "target_modules": sorted(targets), "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
        "use_dora": False, "modules_to_save": None, "init_lora_weights": True, "inference_mode": True,
        "base_model_name_or_path": base_name,
    }
    (out / CONFIG).write_text(json.dumps(config, indent=2))
    return out


__all__ = ["read_adapter", "write_adapter", "is_adapter_dir", "HF_TO_HERD", "HERD_TO_HF"]
