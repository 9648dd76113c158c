"""File → Checkpoint. The format is detected from the bytes and markers, never from a file name."""

from __future__ import annotations

from pathlib import Path

from herd.errors import FormatError, ModelNotFound
from herd.formats.checkpoint import Checkpoint, TokenizerSource

GGUF_MAGIC = b"GGUF"


def open_checkpoint(path: str | Path, lazy: bool = False) -> Checkpoint:
    """Read a GGUF file, an HF directory (config.json + safetensors) or a Meta directory
    (params.json + consolidated.NN.pth) into a Checkpoint. `lazy`: what a reader would join or rearrange
    whole (a Meta checkpoint's model-parallel shards, HF's q/k rows) is left as stored and arranged as it is
    read (herd.formats.slices), for tensor-parallel ranks that read only a share."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelNotFound(f"{path}: no such file or directory")
    if path.is_file():
        try:
            with open(path, "rb") as f:
                magic = f.read(4)
        except OSError as e:  # /proc/self/mem and the like: a "file" that cannot be read from its start
            raise FormatError(f"{path}: cannot be read ({e.strerror or e})") from None
        if magic == GGUF_MAGIC:
            from herd.formats.gguf import read_gguf

            return read_gguf(path)
        raise FormatError(f"{path}: not a GGUF file (starts with {magic!r}); pass a GGUF file or a model directory")
    if not path.is_dir():
        raise FormatError(f"{path}: neither a regular file nor a directory; pass a GGUF file or a model directory")
    from herd.formats.herdq import is_herdq_dir, read_herdq
    from herd.formats.hf import is_hf_dir, read_hf
    from herd.formats.meta import is_meta_dir, read_meta

    if is_herdq_dir(path):
        return read_herdq(path)
    if is_hf_dir(path):
        return read_hf(path, lazy)
    if is_meta_dir(path):
        return read_meta(path, lazy)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return open_checkpoint(ggufs[0], lazy)
    raise FormatError(
        f"{path}: not a model directory (no config.json, no params.json"
        + (f", and {len(ggufs)} GGUF files: name one)" if ggufs else ", no GGUF file)")
    )


__all__ = ["open_checkpoint", "Checkpoint", "TokenizerSource"]
