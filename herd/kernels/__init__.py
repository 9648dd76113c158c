"""herd's own CPU kernels (cpu.cpp), compiled once with the local C++ compiler and loaded as torch ops.

PyTorch's weight-only int4 kernel converts every weight to float before multiplying; on an AVX2 CPU that
made it compute-bound at about a third of llama.cpp's decode speed. cpu.cpp multiplies as llama.cpp does,
integer dot products per block of 32 against quantized activations, but with 16-bit activations instead of
8-bit (int8 measured 96.7% greedy agreement with the fp32 path on SmolLM2, int16 100% at the same speed).
It also holds the small ops of a decode step and `decode_block`, one op per decoder block, where PyTorch's
generic kernels and dispatch spend 5-40 us per op on a few KB of work.

The library is built against this torch and this CPU (-march=native) into ~/.cache/herd/kernels (or
$HERD_CACHE/kernels), keyed by a hash of all three, so it builds once per machine (about 20 s; ./setup.sh
does it). No compiler, a failed build or HERD_NATIVE=0: `load()` returns False and herd uses PyTorch's
kernels, with the reason in `why_not()`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("cpu.cpp")
_state: dict = {}
ops = None  # torch.ops.herd once load() succeeded: what callers test before using a kernel


def cache_dir() -> Path:
    root = Path(os.environ["HERD_CACHE"]) if os.environ.get("HERD_CACHE") else Path.home() / ".cache" / "herd"
    return root / "kernels"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _compiler() -> str | None:
    for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++"):
        if c and shutil.which(c):
            return c
    return None


def library_path() -> Path:
    import torch

    key = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode() + _cpu_flags().encode()
                         + sys.version.encode()).hexdigest()[:16]
    return cache_dir() / f"herd_kernels_{key}.so"


def build(verbose: bool = False) -> Path:
    """Compile cpu.cpp (if not already built for this torch and CPU); returns the library's path."""
    import torch
    import torch.utils.cpp_extension as ext

    target = library_path()
    if target.exists():
        return target
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++, c++ or clang++; or set $CXX)")
    target.parent.mkdir(parents=True, exist_ok=True)
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # built aside, renamed in: never half a file
        out = Path(tmp) / target.name
        cmd = [cxx, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++20", "-w", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
               *(f"-I{p}" for p in ext.include_paths()), str(SOURCE), "-o", str(out),
               *(f"-L{p}" for p in ext.library_paths()), "-lc10", "-ltorch_cpu"]
        if verbose:
            print(" ".join(cmd), file=sys.stderr)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{cxx} failed building {SOURCE.name}:\n{proc.stderr[-2000:]}")
        os.replace(out, target)
    return target


def load(build_if_missing: bool = True) -> bool:
    """Make torch.ops.herd.* available; False (and `why_not()` says why) when they cannot be."""
    if "ok" in _state:
        return _state["ok"]
    ok, why = False, ""
    if os.environ.get("HERD_NATIVE", "1") == "0":
        why = "HERD_NATIVE=0"
    else:
        try:
            import torch

            path = library_path()
            if not path.exists():
                if not build_if_missing:
                    raise RuntimeError(f"{path} is not built (run `python -m herd.kernels`)")
                build()
            torch.ops.load_library(str(path))
            _register_fakes(torch)
            global ops
            ops, ok = torch.ops.herd, True
        except Exception as exc:  # any failure means: use PyTorch's kernels
            why = str(exc)
    _state.update(ok=ok, why=why)
    return ok


def _register_fakes(torch) -> None:
    """Shape functions ("fake" implementations) of the ops a forward pass calls, so torch.compile and
    the meta device trace through them without running them. Packed weights are uint8 [N/8, K/32, record]."""
    fake = torch.library.register_fake

    def linear(x, w, n=-1, int8_tokens=0):
        return x.new_empty((*x.shape[:-1], n if n >= 0 else w.shape[0] * 8), dtype=torch.float32)

    def dequantize(w, n=-1):
        return w.new_empty((n if n >= 0 else w.shape[0] * 8, w.shape[1] * 32), dtype=torch.float32)

    def dequantize_rows(w, rows, n=-1):
        return w.new_empty((*rows.shape, w.shape[1] * 32), dtype=torch.float32)

    fake("herd::linear")(linear)
    fake("herd::dequantize")(dequantize)
    fake("herd::dequantize_rows")(dequantize_rows)
    fake("herd::rms_norm")(lambda x, weight, eps: torch.empty_like(x))
    fake("herd::decode_attention")(lambda q, k, v, scale: torch.empty_like(q))
    fake("herd::silu_mul")(lambda x: x.new_empty((*x.shape[:-1], x.shape[-1] // 2)))
    fake("herd::rope_")(lambda x, rot, heads: None)
    fake("herd::decode_block")(lambda x, *args: torch.empty_like(x))


def why_not() -> str:
    return _state.get("why", "")


def main() -> None:  # ./setup.sh builds the kernels here, so the first `herd run` need not
    try:
        print(f"herd kernels: {build(verbose='-v' in sys.argv)}")
    except RuntimeError as exc:
        print(f"herd kernels not built, PyTorch's kernels will be used: {exc}", file=sys.stderr)
