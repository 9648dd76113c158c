"""Process-wide CPU settings: how many threads PyTorch uses.

Decode on a CPU is bound by memory bandwidth and per-core vector units; hyper-threads share both, so
the default is one thread per physical core (what llama.cpp does too). OMP_NUM_THREADS, when set, wins.
"""

from __future__ import annotations

import os
from pathlib import Path


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-thread siblings counted once)."""
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        allowed = list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in allowed:
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add((topo.joinpath("physical_package_id").read_text().strip(),
                       topo.joinpath("core_id").read_text().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))
    return max(1, len(cores))


def set_threads(threads: int | None = None) -> int:
    """Set PyTorch's intra-op threads: `threads`, else $OMP_NUM_THREADS, else the physical core count."""
    import torch

    if threads is None:
        env = os.environ.get("OMP_NUM_THREADS", "")
        threads = int(env) if env.isdigit() and int(env) > 0 else physical_cores()
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def compiler_available() -> bool:
    """torch.compile's CPU backend (inductor) writes C++ and needs a compiler to build it."""
    import shutil

    return any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if c)


def compile_decode(model, enable: bool | None = None) -> bool:
    """Attach `model.decode_step`: torch.compile of the forward pass, used by the engine's runner for one-token
    steps (the prompt's prefill stays eager). Inductor's C++ wrapper removes Python from the step and
    freezing folds the weights in as constants. Returns whether it is attached.

    `enable` None is herd's default: off. Measured on a 2-core AVX2 EPYC (SmolLM2-135M Q4_1), compiling
    takes minutes on a cold cache while the step is dominated by the int4 matmuls, which compiling does
    not change; ask for it with compile=True (`--compile on`). Without a C++ compiler it stays eager."""
    if not enable:
        return False
    if not compiler_available():
        import warnings

        warnings.warn("torch.compile needs a C++ compiler (g++/clang++); decoding stays eager", stacklevel=2)
        return False
    import torch
    import torch._inductor.config as inductor

    inductor.cpp_wrapper = True
    inductor.freezing = True
    for module in model.modules():  # (decorating these at import would import torch._dynamo: seconds, MBs)
        for name in getattr(module, "eager_methods", ()):
            setattr(module, name, torch.compiler.disable(getattr(module, name)))
    model.decode_step = torch.compile(model.forward, dynamic=True)
    return True
