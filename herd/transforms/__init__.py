"""Load-time transforms: functions that take the plain model (herd.model) and swap some of its modules.

Each lives in its own module and says what it replaces:
- herd.transforms.fuse: q/k/v into one matmul (`wqkv`), gate/up into one (`w13`);
- herd.transforms.cpu_kernels: norms, RoPE, decode attention, SwiGLU and whole decoder blocks on herd's
  C++ CPU kernels (herd.kernels);
- quantized linears: herd.loader's quantized plan builds them with the schemes of herd.quant.linear.

herd.loader composes them from one plan per backend; the model file never knows they exist. A swapped
module is a subclass of the module it replaces, holding the same state, so `isinstance` and the readable
forward of the base class still describe what runs.
"""

from __future__ import annotations

from torch import nn


def swap_class(module: nn.Module, cls: type) -> nn.Module:
    """`module` as an instance of `cls` (a subclass of its class), sharing its parameters and children."""
    if not issubclass(cls, type(module)):
        raise TypeError(f"{cls.__name__} does not extend {type(module).__name__}")
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    return new


def replace_modules(model: nn.Module, build) -> int:
    """Replace every submodule m for which build(name, m) returns a module; returns how many were replaced."""
    replaced = 0
    for name, module in list(model.named_modules()):
        if not name:
            continue
        new = build(name, module)
        if new is not None and new is not module:
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
            replaced += 1
    return replaced


__all__ = ["swap_class", "replace_modules"]
