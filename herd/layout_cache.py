"""Quantized CPU models, repacked once: the loaded module tree saved in herd's cache directory and mapped
back from there, so the next load of the same file skips the repacking (seconds for a 1B model).

What is cached is the model exactly as herd.loader built it (herd's packed int4/int8 layouts depend on
this CPU and this herd), saved with torch.save and read with torch.load(mmap=True): the weights are
mapped from the cache file, not copied, so a cached load takes milliseconds and its pages are shared
with the OS page cache. Because the file is a pickle of herd's own modules it is only ever read from
herd's own cache directory (created 0700), never from a path a user or a model file names.

The key covers everything the layout depends on: each weight file's path, size, mtime and inode (an image
projector file joined to a GGUF text model among them; a file
changed in place gets a new key), herd's version and the source of the code that builds the layout
(loader, model, transforms, quantization, kernels), torch's version and the CPU's flags (through the
kernel library's key). Small files (under MIN_BYTES) repack faster than a cache lookup pays for, and are
not cached. HERD_LAYOUT_CACHE=0 turns the cache off (=DIR puts it in DIR); at most KEEP layouts are
kept, the least recently used go first.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Callable, Sequence

import torch

MIN_BYTES = 64 * 2**20
KEEP = 4
_SOURCES = ("loader.py", "model", "transforms", "quant", "kernels", "layout_cache.py")


def enabled() -> bool:
    return os.environ.get("HERD_LAYOUT_CACHE", "1").lower() not in ("0", "off", "false", "no")


def directory() -> Path:
    """HERD_LAYOUT_CACHE when it names a directory, else `layouts` in herd's cache directory."""
    from herd.kernels import cache_dir

    chosen = os.environ.get("HERD_LAYOUT_CACHE", "")
    return Path(chosen) if chosen and enabled() and chosen.lower() not in ("1", "on", "true", "yes") \
        else cache_dir().parent / "layouts"


def _weight_files(paths: Sequence[Path]) -> list[Path]:
    files = []
    for path in paths:
        files += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return files


def _code_digest() -> bytes:
    import herd

    root = Path(herd.__file__).parent
    h = hashlib.sha256(herd.__version__.encode())
    for name in _SOURCES:
        p = root / name
        for f in sorted(p.rglob("*")) if p.is_dir() else [p]:
            if f.suffix in (".py", ".cpp"):
                h.update(f.relative_to(root).as_posix().encode() + f.read_bytes())
    return h.digest()


def key(path: Path, companions: Sequence[Path] = ()) -> str | None:
    """The cache key of the layout built from the weights at `path` (and the files joined to them, such as an
    image projector), or None when it is not worth caching."""
    from herd import kernels

    files = _weight_files([Path(path), *map(Path, companions)])
    stats = [f.stat() for f in files]
    if sum(s.st_size for s in stats) < MIN_BYTES:
        return None
    # herd's kernels registered first: the cached modules call torch.ops.herd.* (and their layout is theirs)
    built = kernels.load()
    h = hashlib.sha256(_code_digest() + torch.__version__.encode() + kernels.library_path().name.encode()
                       + bytes([built]))
    for f, s in zip(files, stats):
        h.update(f"{f.resolve()}|{s.st_size}|{s.st_mtime_ns}|{s.st_ino}\n".encode())
    return h.hexdigest()[:32]


def load_or_build(path: Path, build: Callable[[], torch.nn.Module], check: Callable[[torch.nn.Module], bool],
                  companions: Sequence[Path] = ()):
    """The cached layout for `path` (with `companions`, files whose weights joined it) if there is a sound one
    (`check` says it fits the checkpoint), else `build()`, saved for next time. A cache that cannot be read or
    written costs a warning, never the load."""
    k = key(path, companions) if enabled() else None
    if k is None:
        return build()
    target = directory() / f"{k}.pt"
    if target.exists():
        try:
            model = torch.load(target, mmap=True, weights_only=False)
            if check(model):
                os.utime(target)  # recently used
                return model
            raise ValueError("it does not match the checkpoint")
        except Exception as e:  # truncated, from an older herd, or foreign: rebuild it
            warnings.warn(f"herd: ignoring the cached layout {target} ({type(e).__name__}: {e}); repacking",
                          stacklevel=3)
            target.unlink(missing_ok=True)
    model = build()
    _save(model, target)
    return model


def _save(model: torch.nn.Module, target: Path) -> None:
    tmp = target.with_suffix(f".{os.getpid()}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        torch.save(model, tmp)
        os.replace(tmp, target)  # readers never see a half-written file
    except (OSError, RuntimeError) as e:
        tmp.unlink(missing_ok=True)
        warnings.warn(f"herd: could not cache the repacked layout in {target.parent} ({e})", stacklevel=3)
        return
    _prune(target.parent)


def _prune(folder: Path) -> None:
    layouts = sorted(folder.glob("*.pt"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in layouts[KEEP:]:
        old.unlink(missing_ok=True)


__all__ = ["load_or_build", "key", "enabled", "directory", "MIN_BYTES", "KEEP"]
