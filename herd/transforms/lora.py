"""LoRA (Hu et al. 2021): chosen linears of the model wrapped so that y = base(x) + (alpha/r) · B A dropout(x),
with the base frozen and only A [r, in] and B [out, r] trained.

The wrapper holds the base module rather than subclassing it because the base may be any linear: a plain
nn.Linear, a bf16 one, or a quantized module that dequantizes block by block (herd.transforms.qlora). A and B
are float32 (master weights) whatever the base computes in. Initialisation is PEFT's default: A Kaiming-uniform
(a = sqrt(5), as nn.Linear), B zero, so the wrapped model starts equal to the base.

Names: `--lora-targets` uses short names (q, k, v, o, gate, up, down); herd's modules are Meta's (wq, wk, wv, wo,
w1, w3, w2); HF/PEFT names (q_proj, ..., down_proj) are what adapters on disk use (herd.formats.peft).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from herd.transforms import replace_modules

# short target name -> (herd attribute, HF module name)
TARGETS = {
    "q": ("attention.wq", "self_attn.q_proj"),
    "k": ("attention.wk", "self_attn.k_proj"),
    "v": ("attention.wv", "self_attn.v_proj"),
    "o": ("attention.wo", "self_attn.o_proj"),
    "gate": ("feed_forward.w1", "mlp.gate_proj"),
    "up": ("feed_forward.w3", "mlp.up_proj"),
    "down": ("feed_forward.w2", "mlp.down_proj"),
}
HF_TO_SHORT = {hf.rsplit(".", 1)[1]: short for short, (_, hf) in TARGETS.items()}


def parse_targets(text: str | list[str]) -> list[str]:
    """"q,v" or ["q", "v"] (or the PEFT names q_proj, ...) -> short names, checked."""
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    out = []
    for name in names:
        short = HF_TO_SHORT.get(name, name)
        if short not in TARGETS:
            raise ValueError(f"unknown LoRA target {name!r}: choose from {', '.join(TARGETS)} "
                             f"(or {', '.join(HF_TO_SHORT)})")
        out.append(short)
    if not out:
        raise ValueError("no LoRA targets given")
    return list(dict.fromkeys(out))


def _frozen_dense_weight(base: nn.Module) -> torch.Tensor | None:
    if type(base) is nn.Linear and base.bias is None and not base.weight.requires_grad:
        return base.weight
    return None


class _FrozenBaseLoRA(torch.autograd.Function):
    """y = x W^T + s (x A^T) B^T over a frozen dense W, with the backward written out. Autograd's version of
    the same expression makes a separate pass over [tokens, out] for the scaling, one for the sum and one for
    each input-gradient term; here the low-rank terms accumulate into the dense products (addmm_), and the
    small products are laid out with the rank as the short side of the output, where the GEMM is fastest.
    The multiplications are the same, so the values are autograd's up to float rounding order."""

    @staticmethod
    def forward(ctx, x, weight, lora_A, lora_B, scaling: float):
        flat = x.reshape(-1, x.shape[-1])
        xa = flat @ lora_A.T  # [tokens, r]
        y = flat @ weight.T
        y.addmm_(xa, lora_B.T, alpha=scaling)
        ctx.save_for_backward(flat, xa, weight, lora_A, lora_B)
        ctx.scaling = scaling
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        flat, xa, weight, lora_A, lora_B = ctx.saved_tensors
        s = ctx.scaling
        dy = grad_y.reshape(-1, grad_y.shape[-1])
        dxa = (dy @ lora_B).mul_(s)  # [tokens, r]
        grad_A = dxa.T @ flat if ctx.needs_input_grad[2] else None
        grad_B = (xa.T @ dy).T.mul_(s) if ctx.needs_input_grad[3] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = dy @ weight
            grad_x.addmm_(dxa, lora_A)
            grad_x = grad_x.reshape(*grad_y.shape[:-1], grad_x.shape[-1])
        return grad_x, None, grad_A, grad_B, None


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        device = next((p.device for p in base.parameters()), None) or next((b.device for b in base.buffers()), None)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = _frozen_dense_weight(self.base)
        if (weight is not None and isinstance(self.dropout, nn.Identity) and torch.is_grad_enabled()
                and x.dtype == weight.dtype == self.lora_A.dtype
                and not torch.is_autocast_enabled(x.device.type)):
            return _FrozenBaseLoRA.apply(x, weight, self.lora_A, self.lora_B, self.scaling)
        y = self.base(x)
        a, b = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        delta = F.linear(F.linear(self.dropout(x), a), b) * self.scaling
        return y + delta.to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """(alpha/r) · B A in float32: what merging adds to the base weight."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}"


class MultiLoRALinear(nn.Module):
    """Several LoRA adapters over one frozen base, each row of a batch through its own: y = base(x) +
    B_i A_i x for row adapter i, slot 0 being none (S-LoRA's and vLLM's multi-LoRA serving, in plain
    PyTorch). A [n+1, R, in] and B [n+1, out, R] hold every adapter zero-padded to the largest rank R, its
    alpha/r folded into B. `rows` (set before each forward by the model's select_adapters) picks them."""

    def __init__(self, base: nn.Module, adapters: list[tuple[torch.Tensor, torch.Tensor, float] | None]):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        rank = max((a.shape[0] for a, _, _ in filter(None, adapters)), default=1)
        A = torch.zeros(len(adapters) + 1, rank, self.in_features)
        B = torch.zeros(len(adapters) + 1, self.out_features, rank)
        for i, adapter in enumerate(adapters, 1):
            if adapter is not None:
                a, b, scaling = adapter
                A[i, : a.shape[0]], B[i, :, : a.shape[0]] = a.float(), b.float() * scaling
        self.register_buffer("lora_A", A)
        self.register_buffer("lora_B", B)
        self.rows: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.rows is None:
            return y
        a, b = self.lora_A[self.rows].to(x.dtype), self.lora_B[self.rows].to(x.dtype)  # [B, R, in], [B, out, R]
        flat = x.reshape(x.shape[0], -1, x.shape[-1])  # [B, T, in]
        delta = (flat @ a.transpose(1, 2)) @ b.transpose(1, 2)
        return y + delta.reshape(y.shape).to(y.dtype)

    def extra_repr(self) -> str:
        return f"{self.lora_A.shape[0] - 1} adapters, rank <= {self.lora_A.shape[1]}"


def use_adapters(model: nn.Module, adapters: list[dict[str, tuple[torch.Tensor, torch.Tensor, float]]]) -> int:
    """Wrap every linear that any of `adapters` (each {module name: (A, B, alpha/r)}) adapts in a
    MultiLoRALinear, and attach `model.select_adapters(rows)`: the adapter (1-based; 0 none) of each row of
    the next forward. Returns how many modules were wrapped."""
    names = set().union(*(a.keys() for a in adapters))

    def build(name: str, module: nn.Module):
        if name in names:
            return MultiLoRALinear(module, [a.get(name) for a in adapters])
        return None

    wrapped = replace_modules(model, build)
    modules = [m for m in model.modules() if isinstance(m, MultiLoRALinear)]

    def select_adapters(rows: list[int]) -> None:
        chosen = torch.tensor(rows, dtype=torch.long, device=modules[0].lora_A.device) if any(rows) else None
        for m in modules:
            m.rows = chosen

    model.select_adapters = select_adapters
    return wrapped


def add_lora(model: nn.Module, targets: list[str], rank: int, alpha: float, dropout: float = 0.0) -> list[str]:
    """Wrap every target projection of every layer in a LoRALinear; freeze everything else.
    Returns the wrapped modules' names (herd's). Llama 4 MoE layers: only the shared expert's dense
    projections carry `feed_forward.w1/w2/w3` names, and routed experts are left as they are."""
    attrs = {TARGETS[t][0] for t in parse_targets(targets)}
    model.requires_grad_(False)
    wrapped = []

    def build(name: str, module: nn.Module):
        parts = name.split(".")
        if len(parts) == 4 and parts[0] == "layers" and f"{parts[2]}.{parts[3]}" in attrs:
            wrapped.append(name)
            return LoRALinear(module, rank, alpha, dropout)
        return None

    replace_modules(model, build)
    if not wrapped:
        raise ValueError(f"no module of this model matches the LoRA targets {sorted(attrs)}")
    return wrapped


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """herd-named A and B: `layers.0.attention.wq.lora_A` [r, in], `....lora_B` [out, r]."""
    out = {}
    for name, m in lora_modules(model).items():
        out[f"{name}.lora_A"] = m.lora_A.detach()
        out[f"{name}.lora_B"] = m.lora_B.detach()
    return out


def load_lora_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy herd-named A/B into the model's LoRALinear modules (every one must be present, shapes equal)."""
    modules = lora_modules(model)
    expected = {f"{n}.lora_{p}" for n in modules for p in "AB"}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"adapter weights do not fit the wrapped modules: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}")
    with torch.no_grad():
        for name, m in modules.items():
            for part in "AB":
                param, value = getattr(m, f"lora_{part}"), state[f"{name}.lora_{part}"]
                if tuple(value.shape) != tuple(param.shape):
                    raise ValueError(f"{name}.lora_{part}: shape {tuple(value.shape)}, the model needs "
                                     f"{tuple(param.shape)}")
                param.copy_(value)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRALinear into its base nn.Linear (W += (alpha/r) B A) and put the base back in its place."""
    def build(name: str, module: nn.Module):
        if not isinstance(module, LoRALinear):
            return None
        base = module.base
        if not isinstance(base, nn.Linear):
            raise TypeError(f"{name}: can only merge into a dense nn.Linear, not {type(base).__name__} "
                            "(load the base with quantized=False to merge)")
        with torch.no_grad():  # a new tensor: the base may be a read-only view of the file
            merged = (base.weight.float() + module.delta_weight()).to(base.weight.dtype)
        base.weight = nn.Parameter(merged, requires_grad=False)
        return base

    replace_modules(model, build)
    return model


__all__ = ["TARGETS", "LoRALinear", "add_lora", "parse_targets", "lora_modules", "lora_state_dict",
           "load_lora_weights", "merge_lora"]
