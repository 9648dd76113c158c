"""Quantized linears: the model's nn.Linear modules (still on the meta device) replaced by modules that keep
the stored weights quantized, chosen from a small registry of schemes.

Each Scheme says which stored tensors it takes (one weight, or the parts of a fused projection stacked
along the output dim) and builds its module (herd.quant.linear). The first that takes them wins, so the
order is the preference: herd's exact packed kernels when they are built (herd.kernels), then PyTorch's
int4 / int8 weight-only ops, then a bf16 Linear of the dequantized weights, which takes anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from herd import kernels
from herd.quant import GGMLTensor, Int4Weight, Int8Weight, release_pages
from herd.quant import linear as ql
from herd.transforms import replace_modules


@dataclass(frozen=True)
class Scheme:
    name: str
    takes: Callable[[list], bool]
    build: Callable[[list], nn.Module]


def _ggml(sources) -> bool:
    return all(isinstance(s, GGMLTensor) for s in sources)


def _types(sources) -> set:
    return {s.ggml_type for s in sources}


def _herd_kernels(sources) -> bool:
    return kernels.load() and sources[0].shape[-1] % 32 == 0


def _int4(sources) -> bool:
    return all(isinstance(s, Int4Weight) and s.group_size == sources[0].group_size for s in sources)


def _int4_parts(sources):
    return (torch.cat([s.values() for s in sources]), torch.cat([s.scales for s in sources]),
            torch.cat([s.zeros for s in sources]))


def _int8_parts(sources):
    return torch.cat([s.q for s in sources]), torch.cat([s.scales for s in sources])


def _torch_int4(sources) -> nn.Module:
    q, scales, zeros = _int4_parts(sources)
    return ql.pack_int4([(q, scales.float(), zeros.float())], sources[0].group_size)


def _bf16(sources) -> nn.Module:
    if all(isinstance(s, (GGMLTensor, torch.Tensor)) for s in sources):
        return ql.BF16Linear(ql.dequantize_bf16(sources))
    return ql.BF16Linear(torch.cat([s.dequantize(ql.COMPUTE_DTYPE) for s in sources]))


CPU_SCHEMES = (
    Scheme("herd q4 (GGML Q4_0, Q4_1, Q4_K)",
           lambda s: _herd_kernels(s) and _ggml(s) and _types(s) <= ql.INT4_TYPES and len(_types(s)) == 1,
           ql.q4_from_ggml),
    Scheme("herd q8 (GGML Q8_0, Q5_x, Q6_K, mixed)",
           lambda s: _herd_kernels(s) and _ggml(s) and _types(s) <= ql.INT4_TYPES | ql.Q8_TYPES, ql.q8_from_ggml),
    Scheme("herd q4 (herd int4)", lambda s: _herd_kernels(s) and _int4(s) and s[0].group_size % 32 == 0,
           lambda s: ql.q4_from_int4(*_int4_parts(s), s[0].group_size)),
    Scheme("herd q8 (herd int8)", lambda s: _herd_kernels(s) and all(isinstance(x, Int8Weight) for x in s),
           lambda s: ql.q8_from_int8(*_int8_parts(s))),
    Scheme("PyTorch int4 (GGML Q4_x)", lambda s: _ggml(s) and _types(s) <= ql.INT4_TYPES and len(_types(s)) == 1,
           ql.int4_from_ggml),
    Scheme("PyTorch int4 (herd int4)", _int4, _torch_int4),
    # aten._weight_int8pack_mm crashes (SIGSEGV, torch 2.13) when the input width is not a multiple of 8
    # (measured at 588, 590, 596: Llama 3.2 Vision's 3x14x14 patch embedding)
    Scheme("PyTorch int8 (herd int8)", lambda s: all(isinstance(x, Int8Weight) for x in s) and s[0].shape[-1] % 8 == 0,
           lambda s: ql.Int8Linear(*_int8_parts(s))),
    Scheme("bf16", lambda s: True, _bf16),
)


def quantized_linear(sources: list, schemes=CPU_SCHEMES) -> nn.Module:
    """The module for these stored weights (stacked along the output dim) under the first scheme that takes them."""
    scheme = next(s for s in schemes if s.takes(sources))
    module = scheme.build(sources)
    for s in sources:  # repacked or dequantized: the file's pages need not stay resident
        if isinstance(s, GGMLTensor):
            release_pages(s.data)
    return module


def can_share_one_module(sources: list) -> bool:
    """Fuse only what stays in one kernel: the same stored type, or with herd's kernels GGML types that differ
    (a Q4_K_M file's Q4_K q, k and Q6_K v) but share an exact form."""
    kinds = {(type(s), getattr(s, "ggml_type", None), getattr(s, "group_size", None)) for s in sources}
    if len(kinds) == 1:
        return True
    return _herd_kernels(sources) and _ggml(sources) and _types(sources) <= ql.INT4_TYPES | ql.Q8_TYPES


def quantize_linears(model: nn.Module, tensors: dict, tied_output: bool, progress=None) -> nn.Module:
    """Replace every nn.Linear still on the meta device by its quantized module (weight `NAME.weight`, or
    the tied embedding for the output): the text layers' and, in an image model, the encoder's, projector's
    and cross-attention layers' alike; a linear with a bias (`NAME.bias`) adds it in fp32 (BiasedLinear)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.weight.is_meta]
    done = [0]

    def build(name: str, module: nn.Module):
        if not (isinstance(module, nn.Linear) and module.weight.is_meta):
            return None
        done[0] += 1
        if progress:
            progress(done[0], len(names))
        key = "tok_embeddings.weight" if name == "output" and tied_output else f"{name}.weight"
        linear = quantized_linear([tensors[key]])
        if module.bias is None:
            return linear
        bias = tensors[f"{name}.bias"]
        return ql.BiasedLinear(linear, bias.dequantize() if isinstance(bias, GGMLTensor) else bias)

    replace_modules(model, build)
    return model


__all__ = ["Scheme", "CPU_SCHEMES", "quantized_linear", "can_share_one_module", "quantize_linears"]
