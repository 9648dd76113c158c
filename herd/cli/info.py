"""`herd info SOURCE` and `herd list`."""

from __future__ import annotations


def add_arguments(parser, name):
    if name == "info":
        parser.add_argument("source", nargs="?", default=None, help="GGUF file, model directory or alias")
        parser.add_argument("--memory", action="store_true",
                            help="load the model as `herd run` would, generate a few tokens, report its memory")
        parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
        parser.add_argument("--mmproj", default=None, metavar="PATH",
                            help="the image projector file (GGUF mmproj) of a Llama 4 text GGUF")


def main(args):
    if args.command == "list":
        return list_models()
    show_info(args.source, getattr(args, "mmproj", None))
    if getattr(args, "memory", False):
        show_memory(args.source, args.dtype, getattr(args, "mmproj", None))


def show_memory(source, dtype=None, mmproj=None):
    """What loading costs: the model's own tensors (by kind), the KV cache per token, and this process's
    peak resident memory (ru_maxrss: Python and torch included) after loading and a short generation."""
    import resource

    import herd

    llm = herd.load(source, dtype=dtype, mmproj=mmproj)
    mapped = 0
    sizes: dict[str, int] = {}
    for module in llm.model.modules():
        for name, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if type(module).__name__ == "QuantEmbedding" and name == "packed":
                continue  # a tied embedding looks rows up in the output's weight, counted there
            n = t.numel() * t.element_size()
            if type(module).__name__ == "QuantEmbedding" and name == "q" and getattr(module, "ggml_type", None):
                mapped += n  # rows of the memory-mapped file: resident only where looked up
                continue
            kind = f"{type(module).__name__}.{name}" if type(module).__name__ not in ("RMSNorm",) else "norms"
            sizes[kind] = sizes.get(kind, 0) + n
    llm.generate("Hello", max_tokens=8, temperature=0)
    a = llm.config
    from herd.engine.runner import default_kv_dtype

    kv_dtype = default_kv_dtype(llm.model)
    per_token = 2 * a.n_layers * a.n_kv_heads * a.head_dim * torch_itemsize(kv_dtype)
    rows = [(k, f"{v / 2**20:,.1f} MiB") for k, v in sorted(sizes.items(), key=lambda kv: -kv[1])]
    rows.append(("mapped embedding rows", f"{mapped / 2**20:,.1f} MiB (file-backed, paged in by lookups)"))
    rows.append(("weights in memory", f"{sum(sizes.values()) / 2**20:,.1f} MiB"))
    rows.append(("KV cache", f"{per_token / 1024:,.1f} KiB per token ({kv_dtype}), "
                             f"{per_token * a.max_seq_len / 2**20:,.0f} MiB at the full context"))
    rows.append(("peak RSS", f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB "
                             "(this process: Python, torch, weights, a short generation)"))
    from rich.console import Console

    console = Console(soft_wrap=True)
    console.print("[bold]memory[/bold]", highlight=False)
    for key, value in rows:
        console.print(f"  [bold]{key:<28}[/bold] {value}", highlight=False)


def torch_itemsize(dtype) -> int:
    import torch

    return torch.empty(0, dtype=dtype).element_size()


def show_info(source, mmproj=None):
    from rich.console import Console

    from herd.config import layer_plan, parameter_counts
    from herd.fingerprint import fingerprint
    from herd.formats import open_checkpoint
    from herd.models import resolve

    from herd.formats.peft import is_adapter_dir

    path = resolve(source)
    if is_adapter_dir(path):
        return show_adapter(path)
    ck = open_checkpoint(path)
    if mmproj is not None:
        from herd.formats.mmproj import attach_projector

        ck = attach_projector(ck, mmproj)
    a = ck.args
    total, active = parameter_counts(a)
    plan = layer_plan(a)
    rows = [
        ("path", str(path)),
        ("format", ck.format),
        ("architecture", "llama4" if a.is_llama4 else "llama"),
        ("generation", ck.generation),
        ("parameters", f"{total / 1e6:,.1f}M" + (f" ({active / 1e6:,.1f}M active per token)" if active != total else "")),
        ("layers", f"{a.n_layers} (dim {a.dim}, {a.n_heads} heads, {a.n_kv_heads} kv heads, head dim {a.head_dim})"),
        ("feed-forward", f"SwiGLU {a.hidden_dim}"
         + (f"; MoE on {sum(s.moe for s in plan)} layers: {a.moe.num_experts} experts of {a.moe.hidden_dim}, "
            f"top-{a.moe.top_k} + shared" if a.moe else "")),
        ("context length", f"{a.max_seq_len:,}"),
        ("rope", f"theta {a.rope_theta:g}" + (f", {a.rope_scaling.kind} scaling" if a.rope_scaling else "")
         + (f", NoPE layers {list(a.nope_layers)}" if a.nope_layers else "")
         + (f", chunked attention {a.attention_chunk_size}" if a.attention_chunk_size else "")),
        ("vocabulary", f"{a.vocab_size:,}" + (" (tied embeddings)" if a.tie_embeddings else "")),
        ("quantization", ck.quantization),
        ("tokenizer", ck.tokenizer.kind if ck.tokenizer else "none found"),
        ("chat format", "template from the file" if ck.chat_template else f"built-in (Llama {ck.generation})"),
        ("fingerprint", fingerprint(ck.tensors)),
    ]
    rows.insert(-1, ("sampling", sampling_row(ck)))
    images = image_row(ck)
    if images:
        rows.insert(-4, ("images", images))
    rows += lineage_rows(path, ck)
    console = Console(soft_wrap=True)  # never cut a path or the fingerprint to the terminal's width
    for key, value in rows:
        console.print(f"[bold]{key:<15}[/bold] {value}", highlight=False)


def sampling_row(ck) -> str:
    """The sampling settings `herd chat` starts from: the file's, else the model card's (herd.models)."""
    from herd.formats.generation_config import shipped_sampling
    from herd.models import recommended_sampling

    values, source = shipped_sampling(ck)
    if not values:
        values, source = recommended_sampling(ck.path)
    if not values:
        return "none shipped (herd chat and run use temperature 0.7, top-p 0.9)"
    return ", ".join(f"{k.replace('_', '-')} {v:g}" for k, v in values.items()) + f" ({source})"


def image_row(ck) -> str | None:
    """The image encoder, whichever file it came from; or why a vision checkpoint runs as text only."""
    from herd.config import MllamaVisionArgs

    a, v = ck.args, ck.args.vision
    where = f", from the mmproj {ck.projector}" if getattr(ck, "projector", None) is not None else ""
    if isinstance(v, MllamaVisionArgs):
        return (f"Llama 3.2 Vision encoder: {v.n_layers} + {v.n_global_layers} global layers, width {v.dim}, "
                f"{v.n_heads} heads, {v.image_size}-pixel tiles (up to {v.max_num_tiles}), patch {v.patch_size}; "
                f"cross-attention before layers {list(a.cross_attention_layers)}{where}")
    if v is not None:
        return (f"Llama 4 encoder: {v.n_layers} layers, width {v.dim}, {v.image_size}-pixel tiles "
                f"(up to {v.max_tiles}), patch {v.patch_size}{where}")
    return f"none ({ck.metadata['note']})" if "note" in ck.metadata else None


def lineage_rows(path, ck=None) -> list[tuple[str, str]]:
    """What a fine-tuned export or adapter came from (its herd.json or GGUF general.herd.lineage)."""
    import json

    from herd.formats.hf_writer import read_lineage

    record = read_lineage(path) if path.is_dir() else None
    if record is None and ck is not None and isinstance(ck.metadata.get("general.herd.lineage"), str):
        try:
            record = json.loads(ck.metadata["general.herd.lineage"])
        except json.JSONDecodeError:
            record = None
    if not record:
        return []
    base = record.get("base") or {}
    train = (record.get("data") or {}).get("train") or {}
    hp = record.get("hyperparameters") or {}
    versions = record.get("versions") or {}
    rows = [("lineage", f"{record.get('method')} of {base.get('path')} ({base.get('format')})"),
            ("  base", str(base.get("fingerprint")))]
    adapter = record.get("adapter")
    if isinstance(adapter, dict):  # a merged export: the adapter that went into it
        rows.append(("  adapter", f"{adapter.get('fingerprint')} ({adapter.get('path')})"))
    rows.append(("  new", str(record.get("fingerprint"))))
    if train:
        rows.append(("  data", f"{train.get('path')} sha256 {train.get('sha256')}"))
    if hp:
        keys = ("steps", "batch_size", "grad_accum", "lr", "lora_rank", "lora_alpha", "lora_targets", "max_len",
                "dtype", "seed")
        rows.append(("  settings", ", ".join(f"{k}={hp[k]}" for k in keys if hp.get(k) is not None)
                     + f"; {record.get('steps')} steps done"))
    rows.append(("  made with", ", ".join(f"{k} {v}" for k, v in versions.items()) + f", {record.get('created')}"))
    return rows


def show_adapter(path):
    from rich.console import Console

    from herd.formats.fields import read_json

    cfg = read_json(path / "adapter_config.json")
    rows = [("path", str(path)), ("format", "PEFT LoRA adapter"),
            ("rank / alpha", f"{cfg.get('r')} / {cfg.get('lora_alpha')}"),
            ("targets", ", ".join(cfg.get("target_modules") or [])),
            ("base", str(cfg.get("base_model_name_or_path")))]
    rows += lineage_rows(path)
    console = Console(soft_wrap=True)
    for key, value in rows:
        console.print(f"[bold]{key:<15}[/bold] {value}", highlight=False)


def list_models():
    from rich.console import Console
    from rich.table import Table

    from herd.models import ALIASES, local_models, models_dir

    found = local_models()
    table = Table("name", "path", "description")
    for name, path, description in found:
        table.add_row(name, str(path), description)
    console = Console()
    console.print(table)
    missing = [a for a in ALIASES.values() if a.name not in {n for n, _, _ in found}]
    for alias in missing:
        console.print(f"not installed: {alias.name} ({alias.description}): {alias.install}")
    console.print(f"Models placed in {models_dir()} (GGUF files or model directories) are listed too.")
