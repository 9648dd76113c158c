"""Tensor and expert parallelism as a load-time transform of the plain model, in the manner of gpt-fast's
tp.py and Megatron-LM: each rank of the torch.distributed group builds the same skeleton, reads only its
share of every weight (herd.sharded_loader, herd.formats.slices) and swaps in the subclasses below, whose forward is the base
class's on that share plus one collective.

Layout, for `tp` ranks (rank r of the group):
- attention: wq, wk, wv column-parallel, split by heads: rank r holds q heads r·H/tp.., and the key/value
  heads their grouped-query group uses. When n_kv_heads < tp (Llama 3.1 405B's 8 KV heads on 16 ranks),
  KV heads are replicated, as Megatron-LM and vLLM do: rank r holds KV head r·Hkv/tp (tp must then be a
  multiple of n_kv_heads). wo is row-parallel (its input columns), then one all-reduce;
- dense SwiGLU: w1, w3 column-parallel, w2 row-parallel, one all-reduce;
- embedding vocabulary-parallel (rows of the vocabulary, masked lookup, all-reduce); output projection
  vocabulary-parallel too, its logits all-gathered (a tied output shares the embedding's rows);
- Llama 4 MoE: the router is replicated; the shared expert is column/row-parallel like the dense SwiGLU.
  Routed experts: with ep == 1 each expert's F is split like w1/w3/w2; with `ep` ranks (ep == tp, or ep
  alone with attention replicated), rank r holds experts r·E/ep.. whole, each rank routes a 1/ep share of
  the tokens and sends each chosen (token, expert) pair's hidden state to the expert's rank (all_to_all),
  which returns the result (all_to_all back). The shared expert's partial sums and the routed results
  meet in one all-reduce;
- norms and RoPE are replicated.
- Llama 4's image encoder and projector (vision_embeddings, vision_projection) are replicated, unsplit: a few
  percent of the weights, run once per image. Rank 0 encodes each image (the engine's encoder-output cache
  is rank 0's) and sends the features with the forward that places them (herd.distributed.StepDescription),
  so the other ranks never run the encoder. Llama 3.2 Vision's cross-attention layers are not split (refused).
The KV cache of a rank holds its own KV heads: `model.args` of a sharded model describes this rank's share
(n_heads and n_kv_heads per rank); everything else in it is the model's.

Quantized GGUF weights are dequantized to the compute dtype, each rank its own rows or blocks only: the
quantized CPU kernels are not used under tensor parallelism (herd.load refuses quantized=True with tp).
Rank 0's lead of the forwards is herd.distributed's (ParallelTransformer.leader).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from herd.errors import HerdError
from herd.model.model import MoE, Attention, FeedForward, Transformer
from herd.transforms import swap_class


@dataclass(frozen=True)
class Layout:
    """tp ranks for attention and dense layers, ep ranks for routed experts; each 1 or the group's size."""

    tp: int
    ep: int
    rank: int
    world: int

    def share(self, n: int, parts: int) -> tuple[int, int]:
        """This rank's contiguous range of n items split `parts` ways (the last ranks one fewer if uneven)."""
        if parts == 1:
            return 0, n
        size = -(-n // parts)
        return min(n, self.rank * size), min(n, (self.rank + 1) * size)


def check_layout(args, tp: int, ep: int, world: int, where: str = "") -> None:
    """Clear errors for layouts the model's sizes cannot take."""
    prefix = f"{where}: " if where else ""
    if tp not in (1, world) or ep not in (1, world):
        raise HerdError(f"{prefix}--tp {tp} --ep {ep} in a job of {world} processes: each must be 1 or {world} "
                        f"(run torchrun --nproc-per-node {max(tp, ep)})")
    if tp > 1:
        if args.n_heads % tp:
            raise HerdError(f"{prefix}{args.n_heads} attention heads do not split over --tp {tp}")
        if args.n_kv_heads % tp and tp % args.n_kv_heads:
            raise HerdError(f"{prefix}{args.n_kv_heads} key/value heads neither split over --tp {tp} nor replicate "
                            f"onto it (tp must divide n_kv_heads or be a multiple of it)")
        if args.hidden_dim % tp:
            raise HerdError(f"{prefix}the feed-forward width {args.hidden_dim} does not split over --tp {tp}")
        if args.moe is not None and args.moe.hidden_dim % tp:
            raise HerdError(f"{prefix}the expert width {args.moe.hidden_dim} does not split over --tp {tp}")
    if ep > 1:
        if args.moe is None:
            raise HerdError(f"{prefix}--ep {ep}: this model has no routed experts (expert parallelism is for Llama 4 MoE)")
        if args.moe.num_experts % ep:
            raise HerdError(f"{prefix}{args.moe.num_experts} experts do not split over --ep {ep}")


# ---- collectives ------------------------------------------------------------------------------------------


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    dist.all_reduce(x)
    return x


def all_gather_last(x: torch.Tensor, width: int, world: int, total: int) -> torch.Tensor:
    """Each rank's [..., n_r] (n_r <= width) joined along the last dim into [..., total]."""
    import torch.distributed as dist

    if x.shape[-1] < width:
        x = F.pad(x, (0, width - x.shape[-1]))
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)[..., :total]


# ---- the swapped modules -------------------------------------------------------------------------------------


class ParallelAttention(Attention):
    """This rank's heads (n_heads, n_kv_heads are per rank), then the all-reduce of wo's partial sums."""

    def forward(self, x, ctx, layer_id: int):
        return all_reduce(super().forward(x, ctx, layer_id))


class ParallelFeedForward(FeedForward):
    """This rank's slice of the SwiGLU width, then the all-reduce of w2's partial sums."""

    def forward(self, x):
        return all_reduce(super().forward(x))


class ParallelMoE(MoE):
    """Every expert's F split over the ranks (and the shared expert's): partial sums, one all-reduce."""

    def forward(self, x):
        return all_reduce(super().forward(x))


class ExpertParallelMoE(MoE):
    """This rank's experts (`first_expert`.. of the model's); tokens reach them by all_to_all."""

    def forward(self, x):
        import torch.distributed as dist

        shape, layout = x.shape, self.layout
        x = x.reshape(-1, shape[-1])
        lo, hi = layout.share(x.shape[0], layout.ep)
        mine = x[lo:hi]
        top_logits, top_experts = self.router(mine).topk(self.top_k, dim=-1)  # [n, k]
        scores = torch.sigmoid(top_logits.float()).to(x.dtype)
        token = torch.arange(hi - lo, device=x.device).repeat_interleave(self.top_k)
        expert = top_experts.reshape(-1)
        dest = expert // self.local_experts
        order = torch.argsort(dest, stable=True)
        token, expert, dest = token[order], expert[order], dest[order]
        send = (mine[token] * scores.reshape(-1)[order, None]).to(self.experts.w1.dtype)
        send_counts = torch.bincount(dest, minlength=layout.world)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts)
        sends, recvs = send_counts.tolist(), recv_counts.tolist()
        received = send.new_empty(sum(recvs), send.shape[1])
        dist.all_to_all_single(received, send, recvs, sends)
        received_expert = expert.new_empty(sum(recvs))
        dist.all_to_all_single(received_expert, expert - dest * self.local_experts, recvs, sends)
        results = torch.zeros_like(received)
        for e in received_expert.unique().tolist():
            rows = torch.nonzero(received_expert == e, as_tuple=True)[0]
            results[rows] = self.experts(received[rows], e).to(results.dtype)
        returned = torch.empty_like(send)
        dist.all_to_all_single(returned, results, sends, recvs)
        if layout.tp > 1:  # the shared expert's partial sums for every token
            out = self.shared_expert(x)
        else:  # the shared expert whole, for this rank's tokens only
            out = torch.zeros_like(x)
            out[lo:hi] = self.shared_expert(mine)
        out[lo:hi].index_add_(0, token, returned.to(out.dtype))
        return all_reduce(out).view(shape)


class VocabParallelEmbedding(nn.Embedding):
    """Rows vocab_start..vocab_stop of the embedding: ids elsewhere look up zeros, and the all-reduce fills in
    each id's row from the rank holding it."""

    def forward(self, tokens):
        local = tokens - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return all_reduce(out.masked_fill(outside[..., None], 0.0))


class VocabParallelOutput(nn.Linear):
    """This rank's rows of the output projection; the logits of every rank all-gathered."""

    def forward(self, x):
        local = F.linear(x, self.weight)
        return all_gather_last(local, self.shard_rows, self.layout.world, self.vocab_size)


VISION_PREFIXES = ("vision_embeddings.", "vision_projection.")  # Llama 4's encoder and projector: replicated


class ParallelTransformer(Transformer):
    """The root of a sharded model. On rank 0, each forward is first described to the other ranks
    (herd.distributed.Leader), which run it too; `local_forward` is the plain forward on this rank's shard.
    `image_embeds` (Llama 4's image features and where they go) travel with the description."""

    def forward(self, tokens, batch=None, last_only: bool = False, image_embeds=None):
        if self.leader is None:
            raise HerdError(f"rank {self.layout.rank} follows rank 0's forwards: call llm.follow() on this rank")
        return self.leader.run(self.local_forward, tokens, batch, last_only, image_embeds)

    def local_forward(self, tokens, batch=None, last_only: bool = False, image_embeds=None):
        return Transformer.forward(self, tokens, batch, last_only, image_embeds=image_embeds)


def parallelize(model: Transformer, layout: Layout, args, local_kv: int) -> None:
    """Swap the modules of a model holding this rank's share of the weights (herd.sharded_loader reads it)
    for the parallel subclasses above, in place; `local_kv` is this rank's number of KV heads."""
    tp = layout.tp
    for block in model.layers:
        attn = block.attention
        if tp > 1:
            attn = swap_class(attn, ParallelAttention)
            attn.n_heads, attn.n_kv_heads = args.n_heads // tp, local_kv
            block.attention = attn
        ff = block.feed_forward
        if isinstance(ff, MoE):
            if layout.ep > 1:
                ff = swap_class(ff, ExpertParallelMoE)
                ff.layout, ff.local_experts = layout, args.moe.num_experts // layout.ep
            elif tp > 1:
                ff = swap_class(ff, ParallelMoE)
            block.feed_forward = ff
        elif tp > 1:
            block.feed_forward = swap_class(ff, ParallelFeedForward)
    if tp > 1:
        emb = swap_class(model.tok_embeddings, VocabParallelEmbedding)
        emb.vocab_start = layout.share(args.vocab_size, tp)[0]
        model.tok_embeddings = emb
        out = swap_class(model.output, VocabParallelOutput)
        out.layout, out.vocab_size, out.shard_rows = layout, args.vocab_size, -(-args.vocab_size // tp)
        model.output = out
    model.__class__ = ParallelTransformer  # in place: the caller holds `model`
    model.layout, model.leader = layout, None
    model.args = dataclasses.replace(args, n_heads=args.n_heads // tp, n_kv_heads=local_kv)


__all__ = ["Layout", "check_layout", "VISION_PREFIXES", "ParallelTransformer", "ParallelAttention",
           "ParallelFeedForward", "ParallelMoE", "ExpertParallelMoE", "VocabParallelEmbedding",
           "VocabParallelOutput", "parallelize"]
