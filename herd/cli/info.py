"""`herd info SOURCE` and `herd list`."""

from __future__ import annotations


def add_arguments(parser, name):
    if name == "info":
        parser.add_argument("source", nargs="?", default=None, help="GGUF file, model directory or alias")


def main(args):
    if args.command == "list":
        return list_models()
    return show_info(args.source)


def show_info(source):
    from rich.console import Console

    from herd.config import layer_plan, parameter_counts
    from herd.fingerprint import fingerprint
    from herd.formats import open_checkpoint
    from herd.models import resolve

    path = resolve(source)
    ck = open_checkpoint(path)
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
    console = Console(soft_wrap=True)  # never cut a path or the fingerprint to the terminal's width
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
