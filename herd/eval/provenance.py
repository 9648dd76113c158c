"""What determines a score besides the task: the exact model (fingerprint, files, tokenizer, chat template,
quantization) and the runtime (device, dtype, threads, batch size, versions)."""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

from herd.eval.data import sha256_file, sha256_json, sha256_text
from herd.fingerprint import tensor_digests


def weight_files(path: Path) -> list[Path]:
    """The files a checkpoint was read from: the file itself, or every file of its directory."""
    if path.is_file():
        return [path]
    return sorted(p for p in path.iterdir() if p.is_file())


def tokenizer_sha256(llm) -> str | None:
    source = llm.checkpoint.tokenizer
    if source is None:
        return None
    parts = {"kind": source.kind, "config": source.config}
    if source.path is not None:
        parts["file_sha256"] = sha256_file(source.path)
    if source.gguf_metadata is not None:
        parts["gguf_metadata"] = source.gguf_metadata
    return sha256_text(json.dumps(parts, sort_keys=True, default=repr))


def model_record(llm, source: str | None) -> dict:
    """Everything about the weights a report binds its scores to."""
    ck = llm.checkpoint
    files = [{"name": p.name, "bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in weight_files(ck.path)]
    a = ck.args
    return {
        "weights_known": True,
        "source": str(source) if source is not None else str(ck.path),
        "path": str(ck.path),
        "name": ck.metadata.get("name") or ck.path.stem,
        "fingerprint": llm.fingerprint,
        "tensor_sha256": tensor_digests(ck.tensors),
        "files": files,
        "format": ck.format,
        "generation": ck.generation,
        "quantization": ck.quantization,
        "tokenizer_sha256": tokenizer_sha256(llm),
        "chat_template_sha256": sha256_text(ck.chat_template) if ck.chat_template else None,
        "config_sha256": sha256_json({k: repr(v) for k, v in sorted(vars(a).items())}),
        "context": a.max_seq_len,
        "lineage": lineage(llm),
        "adapter": _adapter(llm),
    }


def lineage(llm) -> dict | None:
    """What a fine-tuned model came from (herd finetune's lineage record: its herd.json, or a GGUF file's
    general.herd.lineage), so a score of a tuned variant names its base, data and settings."""
    from herd.formats.hf_writer import read_lineage

    ck = llm.checkpoint
    record = read_lineage(ck.path) if ck.path.is_dir() else None
    text = ck.metadata.get("general.herd.lineage") if isinstance(ck.metadata, dict) else None
    if record is None and isinstance(text, str):
        try:
            record = json.loads(text)
        except json.JSONDecodeError:
            record = {"unreadable": text[:200]}
    return record


def _adapter(llm) -> dict | None:
    """A LoRA adapter applied at load: its file's SHA-256, its settings, the base's own fingerprint, and the
    adapter's lineage when herd made it."""
    settings = getattr(llm, "adapter", None)
    if not settings:
        return None
    from herd.formats.hf_writer import read_lineage

    return {"path": settings.get("path"), "sha256": settings.get("sha256"), "rank": settings.get("rank"),
            "alpha": settings.get("alpha"), "modules": sorted(settings.get("modules", ())),
            "base_fingerprint": llm.base_fingerprint, "lineage": read_lineage(settings["path"])}


def unknown_model_record(url: str, model: str | None, served: dict | None) -> dict:
    """A server's weights cannot be checked from outside: the report says so instead of guessing."""
    return {"weights_known": False, "source": url, "name": model, "fingerprint": None, "server_model_card": served,
            "note": "scored through an HTTP endpoint: the weights that produced these scores are unknown to the "
                    "evaluator; the fingerprint is absent and `herd eval verify` can only re-score, not identify"}


def versions() -> dict:
    import numpy
    import torch

    import herd

    return {"herd": herd.__version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "python": sys.version.split()[0], "platform": platform.platform()}


def runtime_record(llm, backend: str, batch_size: int, url: str | None = None) -> dict:
    import torch

    record = {"backend": backend, "batch_size": batch_size, "versions": versions()}
    if llm is not None:
        weight = llm.model.tok_embeddings.weight
        swapped = sorted({f"{type(m).__module__}.{type(m).__name__}" for m in llm.model.modules()
                          if type(m).__module__.startswith(("herd.transforms", "herd.quant"))})
        quantized = any(name.startswith("herd.quant") for name in swapped)
        record.update(device=str(llm.device), dtype=str(weight.dtype).removeprefix("torch."),
                      # herd's quantized CPU linears take bf16 activations (herd.loader)
                      matmul_dtype="bfloat16" if quantized else str(weight.dtype).removeprefix("torch."),
                      weights_quantized=quantized, threads=torch.get_num_threads(), modules=swapped,
                      # ranks of a tensor/expert-parallel job: the order of its all-reduced sums differs
                      processes=torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1)
    if url is not None:
        record["server_url"] = url
    return record
