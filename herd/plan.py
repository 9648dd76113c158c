"""The memory plan of a model on a set of devices, from its configuration alone: weights per rank under each
parallel layout herd runs (herd.transforms.tensor_parallel), KV cache per token per rank, and how many tokens
of KV cache (batch x context) fit in what is left.

Sizes follow the layout exactly: q/k/v/o split by heads (KV heads replicated when there are fewer than ranks),
SwiGLU widths split, embedding and output split by vocabulary rows (rounded up), norms and routers on every
rank; with expert parallelism the routed experts are split by count. What the plan leaves out: activations
(small beside the weights for decoding; a long prefill needs more) and each process's fixed cost (Python,
torch, a CUDA context: a few hundred MB), which the memory fraction is for.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from herd.config import ModelArgs, layer_plan
from herd.errors import ConfigError, HerdError

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GiB = 2**30


@dataclass(frozen=True)
class Devices:
    """`count` devices of `memory` bytes each, e.g. 8xH100-80GB, 2xCPU-64GB (GB read as GiB, as GPU
    memory sizes are quoted)."""

    count: int
    name: str
    memory: int

    @classmethod
    def parse(cls, text: str) -> "Devices":
        m = re.fullmatch(r"(?:(\d+)\s*[xX*]\s*)?([A-Za-z][\w.]*)-(\d+(?:\.\d+)?)\s*(GB|GiB|G|TB|TiB)", text.strip())
        if not m or (m.group(1) is not None and int(m.group(1)) < 1):
            raise HerdError(f"--devices {text!r}: expected COUNTxNAME-SIZE, e.g. 8xH100-80GB or 2xCPU-64GB")
        size = float(m.group(3)) * (1024 if m.group(4).startswith("T") else 1)
        return cls(int(m.group(1) or 1), m.group(2), int(size * GiB))


@dataclass
class LayoutPlan:
    name: str
    tp: int
    ep: int
    weights: int  # bytes per rank (the largest rank)
    kv_per_token: int  # bytes per token per rank
    kv_tokens: int  # tokens of KV cache that fit per rank (0: the weights do not fit)
    problem: str = ""  # why herd cannot run this layout, if it cannot


def read_config(path: str | Path) -> tuple[ModelArgs, str]:
    """ModelArgs from config.json (HF), params.json (Meta) or a GGUF header, reading no weights."""
    path = Path(path).expanduser()
    if path.is_file() and path.suffix == ".json":
        path = path.parent
    if path.is_dir() and (path / "config.json").is_file():
        from herd.formats.fields import read_json
        from herd.formats.hf import args_from_hf_config

        return args_from_hf_config(read_json(path / "config.json", ConfigError), path / "config.json"), "config.json"
    if path.is_dir() and (path / "params.json").is_file():
        return _meta_args(path), "params.json"
    from herd.formats import open_checkpoint

    checkpoint = open_checkpoint(path)  # a GGUF file: its header, the tensors only mapped
    return checkpoint.args, "GGUF header"


def _meta_args(path: Path) -> ModelArgs:
    import torch

    from herd.formats.fields import read_json
    from herd.formats.meta import args_from_params

    params = read_json(path / "params.json", ConfigError)
    n_layers = params.get("n_layers")
    if not isinstance(n_layers, int) or n_layers < 1:
        raise ConfigError(f"{path / 'params.json'}: field 'n_layers' must be a positive integer, got {n_layers!r}")
    if not isinstance(params.get("vocab_size"), int) or params["vocab_size"] <= 0:
        raise ConfigError(f"{path / 'params.json'}: herd plan needs vocab_size (Llama 1/2 write -1: the "
                          "embedding decides; plan from the HF config.json instead)")
    # Names stand in for the tensors: the layer count is checked against them, and the output counts as untied
    # (params.json does not say; Llama 3.2 1B/3B tie theirs, which makes the plan a little pessimistic).
    stand_in = {f"layers.{i}.attention_norm.weight": None for i in range(n_layers)}
    stand_in |= {"tok_embeddings.weight": torch.empty(0), "output.weight": torch.empty(1)}
    return args_from_params(params, stand_in, path / "params.json")[0]


def _split(n: int, parts: int) -> int:
    return -(-n // parts)


def weights_per_rank(args: ModelArgs, tp: int, ep: int, dtype_bytes: int) -> int:
    d, hd = args.dim, args.head_dim
    kv_heads = args.n_kv_heads // tp if args.n_kv_heads % tp == 0 else 1
    attn = d * hd * (2 * args.n_heads // tp + 2 * kv_heads)
    vocab_rows = _split(args.vocab_size, tp)
    n = vocab_rows * d * (1 if args.tie_embeddings else 2) + d
    for spec in layer_plan(args):
        n += attn + 2 * d
        if spec.moe:
            m = args.moe
            n += d * m.num_experts + 3 * d * m.hidden_dim // tp  # router, shared expert
            n += 3 * d * m.hidden_dim * (m.num_experts // ep if ep > 1 else m.num_experts) // (1 if ep > 1 else tp)
        else:
            n += 3 * d * args.hidden_dim // tp
    return n * dtype_bytes


def kv_per_token(args: ModelArgs, tp: int, kv_bytes: int) -> int:
    kv_heads = args.n_kv_heads // tp if args.n_kv_heads % tp == 0 else 1
    return 2 * args.n_layers * kv_heads * args.head_dim * kv_bytes


def layouts(args: ModelArgs, n: int) -> list[tuple[str, int, int]]:
    out = [("one device", 1, 1)]
    if n > 1:
        out.append((f"tp {n}", n, 1))
        if args.moe is not None:
            out += [(f"tp {n} + ep {n}", n, n), (f"ep {n} (attention replicated)", 1, n)]
    return out


def plan(args: ModelArgs, devices: Devices, dtype: str = "bfloat16", kv_dtype: str | None = None,
         fraction: float = 0.9) -> list[LayoutPlan]:
    from herd.transforms.tensor_parallel import check_layout

    w_bytes, kv_bytes = DTYPE_BYTES[dtype], DTYPE_BYTES[kv_dtype or dtype]
    usable = int(devices.memory * fraction)
    plans = []
    for name, tp, ep in layouts(args, devices.count):
        world = max(tp, ep)
        problem = ""
        try:
            check_layout(args, tp, ep, world)
        except HerdError as e:
            problem = str(e)
        weights = weights_per_rank(args, tp, ep, w_bytes)
        per_token = kv_per_token(args, tp, kv_bytes)
        tokens = max(0, usable - weights) // per_token
        plans.append(LayoutPlan(name, tp, ep, weights, per_token, tokens, problem))
    return plans


def contexts(args: ModelArgs) -> list[int]:
    return sorted({c for c in (4096, 32768, 131072, args.max_seq_len) if c <= args.max_seq_len})


def render(args: ModelArgs, source: str, devices: Devices, plans: list[LayoutPlan], dtype: str, kv_dtype: str | None,
           fraction: float) -> str:
    from herd.config import parameter_counts

    total, active = parameter_counts(args)
    lines = [f"model: {args.n_layers} layers, dim {args.dim}, {args.n_heads} heads / {args.n_kv_heads} KV heads "
             f"(head dim {args.head_dim}), vocab {args.vocab_size}"
             + (f", {args.moe.num_experts} experts (top {args.moe.top_k}) on {len(args.moe.layers)} layers"
                if args.moe else "") + f"; from {source}",
             f"parameters: {total / 1e9:,.2f} B" + (f" ({active / 1e9:,.2f} B active per token)" if active != total else "")
             + f"; weights {dtype}, KV cache {kv_dtype or dtype}",
             f"devices: {devices.count} x {devices.name} with {devices.memory / GiB:,.0f} GiB each; "
             f"{fraction:.0%} of it planned", ""]
    ctx = contexts(args)
    header = f"{'layout':<30} {'weights/rank':>14} {'KV/token/rank':>14} {'KV tokens/rank':>15}  " + \
        "  ".join(f"{'batch@' + _k(c):>11}" for c in ctx)
    lines.append(header)
    for p in plans:
        row = f"{p.name:<30} {p.weights / GiB:>10,.1f} GiB {p.kv_per_token / 1024:>10,.1f} KiB "
        if p.problem:
            lines.append(row + f"  cannot run: {p.problem}")
        elif p.kv_tokens == 0:
            lines.append(row + f"  does not fit ({p.weights / GiB:,.1f} GiB of weights > "
                               f"{fraction * devices.memory / GiB:,.1f} GiB)")
        else:
            lines.append(row + f"{p.kv_tokens:>15,}  " + "  ".join(f"{p.kv_tokens // c:>11,}" for c in ctx))
    lines += ["", "batch@C: how many sequences of C tokens (prompt + output) the KV cache left over holds; "
                  "activations and per-process overhead come out of the unplanned share."]
    return "\n".join(lines)


def _k(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def plan_json(args: ModelArgs, devices: Devices, plans: list[LayoutPlan]) -> str:
    return json.dumps({"devices": {"count": devices.count, "name": devices.name, "memory_bytes": devices.memory},
                       "layouts": [p.__dict__ for p in plans]}, indent=2)


__all__ = ["Devices", "LayoutPlan", "read_config", "plan", "render", "weights_per_rank", "kv_per_token"]
