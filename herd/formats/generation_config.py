"""The sampling settings a checkpoint ships with its weights.

- GGUF: the `general.sampling.*` keys (gguf-py's Keys.General.SAMPLING_*, which llama.cpp reads as its
  defaults and convert_hf_to_gguf.py copies from generation_config.json): temp, top_k, top_p, min_p and
  penalty_repeat (herd has no mirostat or XTC sampler; those keys are left unread);
- HF: generation_config.json's temperature, top_k, top_p, min_p and repetition_penalty; `do_sample: false`
  means greedy there (transformers then ignores the other settings), so it gives temperature 0.

Values are returned as the file holds them, as herd.sampling names them; the caller checks their ranges
(herd.api.LLM.sampling_defaults drops what herd.sampling.SamplingParams refuses).
"""

from __future__ import annotations

from pathlib import Path

from herd.errors import FormatError
from herd.formats.checkpoint import Checkpoint
from herd.formats.fields import read_json

GGUF_KEYS = {
    "general.sampling.temp": "temperature",
    "general.sampling.top_k": "top_k",
    "general.sampling.top_p": "top_p",
    "general.sampling.min_p": "min_p",
    "general.sampling.penalty_repeat": "repetition_penalty",
}
HF_KEYS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")


def _number(value):
    """A JSON or GGUF number as Python keeps it; GGUF's float32 shown as the decimal it was written from
    (0.2, not 0.20000000298)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(f"{value:.7g}") if isinstance(value, float) else value


def shipped_sampling(checkpoint: Checkpoint) -> tuple[dict, str]:
    """({sampling keyword: value}, where they were read, in words); ({}, "") when the checkpoint ships none."""
    if checkpoint.format == "gguf":
        found = {name: _number(checkpoint.metadata[key]) for key, name in GGUF_KEYS.items()
                 if key in checkpoint.metadata}
        found = {k: v for k, v in found.items() if v is not None}
        return (found, f"{Path(checkpoint.path).name}'s general.sampling keys") if found else ({}, "")
    path = Path(checkpoint.path) / "generation_config.json"
    if not Path(checkpoint.path).is_dir() or not path.is_file():
        return {}, ""
    try:
        config = read_json(path)
    except FormatError:
        return {}, ""  # the weights are still usable; the chat falls back to other defaults
    if config.get("do_sample") is False:
        return {"temperature": 0}, "generation_config.json (do_sample false: greedy)"
    found = {k: _number(config[k]) for k in HF_KEYS if k in config}
    found = {k: v for k, v in found.items() if v is not None}
    return (found, "generation_config.json") if found else ({}, "")


__all__ = ["shipped_sampling", "GGUF_KEYS", "HF_KEYS"]
