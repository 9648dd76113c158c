"""SchedulerOutput → model forwards → sampled tokens: the only engine file that touches tensors.

The KV cache is paged (herd.model.cache.PagedKVCache): each sequence's keys are in the blocks its
herd.engine.blocks table lists, allocated as its tokens arrive. The step's prefill chunks run together,
[B, T] padded to the longest, in groups whose padding stays under PAD_WASTE of the real tokens (the
weights are then read once for several prompts: many short prompts, as an evaluation sends, cost about
what one long one does); all decoding sequences share one forward [B, 1], each row at its own position
with its own blocks, so rows at different lengths run together (with herd's CPU kernels, as one op per layer).
Sampling, penalties and logprobs are herd.sampling's and herd.decoding's, the same code the
single-request generator uses.
"""

from __future__ import annotations

import os
from collections import OrderedDict

import torch

from herd.engine.blocks import BlockManager
from herd.engine.graphs import StaticDecode, capturable
from herd.engine.scheduler import PrefillChunk, SchedulerOutput, Sequence
from herd.decoding import TokenLogprob, token_logprob
from herd.model import Batch, PagedKVCache, Transformer
from herd.sampling import apply_penalties, sample
from herd.tokenizer import Tokenizer


def default_kv_dtype(model: Transformer) -> torch.dtype:
    """What the loader chose for this model's keys and values (`model.kv_dtype`: fp16 on herd's quantized
    CPU path), else the activations' dtype (fp32 on the CPU reference path, bf16 on a GPU)."""
    return getattr(model, "kv_dtype", None) or model.tok_embeddings.weight.dtype


PAD_WASTE = 0.25  # most padding, as a share of the real tokens, a group of prompts may carry


def prefill_groups(chunks: list[PrefillChunk]) -> list[list[PrefillChunk]]:
    """The step's prefill chunks in groups that run as one forward each: longest first, a chunk joins the
    current group while the padding to the group's longest stays within PAD_WASTE."""
    groups: list[list[PrefillChunk]] = []
    real = 0
    for c in sorted(chunks, key=lambda c: c.end - c.start, reverse=True):
        n = c.end - c.start
        if groups:
            group = groups[-1]
            longest = group[0].end - group[0].start
            if longest * (len(group) + 1) <= (1 + PAD_WASTE) * (real + n):
                group.append(c)
                real += n
                continue
        groups.append([c])
        real = n
    return groups


class ImageFeatures:
    """The image encoder's output per image digest, least recently used dropped past `capacity` images: an
    image is encoded once, however many chunks its tokens are prefilled in and however many turns of a
    conversation (or requests) send it again."""

    def __init__(self, capacity: int = 32):
        self.capacity = capacity
        self._rows: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.encoded = 0  # images run through the encoder (a cache miss each)

    def get(self, model: Transformer, image):
        """For an ImagePlacement: Llama 4's [len(image.positions), dim] rows; Llama 3.2 Vision's keys and values
        of every cross-attention layer."""
        rows = self._rows.get(image.digest)
        if rows is None:
            device = model.tok_embeddings.weight.device
            if model.args.cross_attention_layers:
                tiles = image.tiles.to(device)
                tile_mask = (torch.arange(tiles.shape[1], device=device) < image.n_tiles).long()[None]
                rows = model.cross_attention_states(tiles, torch.tensor([image.ratio_id], device=device), tile_mask)
            else:
                rows = model.encode_images(image.tiles.to(device))
                rows = rows.reshape(-1, rows.shape[-1])
                if rows.shape[0] != len(image.positions):
                    raise ValueError(f"the image gives {rows.shape[0]} feature rows for {len(image.positions)} "
                                     "image tokens")
            self.encoded += 1
            self._rows[image.digest] = rows
            while len(self._rows) > self.capacity:
                self._rows.popitem(last=False)
        self._rows.move_to_end(image.digest)
        return rows


class Runner:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, blocks: BlockManager, kv_dtype: torch.dtype | None = None,
                 max_batch: int = 8, context: int | None = None, image_features: ImageFeatures | None = None):
        self.model = model
        self.image_features = image_features or ImageFeatures()
        self.tokenizer = tokenizer
        self.blocks = blocks
        weight = model.tok_embeddings.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.vocab_size = model.args.vocab_size
        args = model.args
        self.cache = PagedKVCache(args.n_layers, args.n_kv_heads, args.head_dim, blocks.num_blocks, blocks.block_size,
                                  kv_dtype or default_kv_dtype(model), self.device)
        self.static = None  # on CUDA, decode steps replay captured graphs (herd.engine.graphs)
        if self.device.type == "cuda" and os.environ.get("HERD_CUDA_GRAPHS", "1") != "0" and capturable(model) \
                and not hasattr(model, "select_adapters"):  # adapters are chosen per step, on the host
            max_blocks = -(-(context or args.max_seq_len) // blocks.block_size)
            self.static = StaticDecode(model, self.cache, max_batch, max_blocks)
        self.computed_tokens = 0  # tokens whose keys this runner computed (prefix-cache hits are not among them)

    def generator(self, seed: int | None) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))
        return g

    def _tensor(self, rows) -> torch.Tensor:
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    @torch.inference_mode()
    def execute(self, step: SchedulerOutput) -> list[tuple[Sequence, torch.Tensor]]:
        """Run the step's forwards; return (sequence, logits [V]) for every sequence that samples now
        (its prompt just completed, or it is decoding). Prompt logprobs are filled in on the way."""
        ready: list[tuple[Sequence, torch.Tensor]] = []
        for group in prefill_groups(step.prefill):
            steps = max(c.end - c.start for c in group)
            for c in group:
                self.blocks.grow(c.seq.blocks, c.end)
            batch = Batch.rows(self.cache, [c.seq.blocks.table for c in group], [c.start for c in group], steps,
                               self.device, lengths=[c.end - c.start for c in group])
            tokens = [c.seq.token_ids[c.start:c.end] + [0] * (steps - c.end + c.start) for c in group]
            self._select_adapters([c.seq for c in group])
            every = any(c.seq.request.prompt_logprobs is not None for c in group)
            extra = self._image_inputs([c.seq for c in group], batch, lambda: self._image_embeds(group, steps))
            logits = self.model(self._tensor(tokens), batch, last_only=not every, **extra)  # [B, T or 1, V]
            for row, c in zip(logits, group):
                seq, n = c.seq, c.end - c.start
                if seq.request.prompt_logprobs is not None:
                    self._prompt_logprobs(seq, c.start, c.end, row[:n])
                self._computed(seq, c.end)
                if c.completes_prompt and seq.request.max_tokens > 0:
                    ready.append((seq, row[n - 1] if every else row[-1]))
        if step.decode:
            seqs = step.decode
            for s in seqs:
                self.blocks.grow(s.blocks, len(s.token_ids))
            batch = Batch.rows(self.cache, [s.blocks.table for s in seqs], [len(s.token_ids) - 1 for s in seqs], 1,
                               self.device)
            self._select_adapters(seqs)
            extra = self._image_inputs(seqs, batch, lambda: None)
            # captured graphs (CUDA), or a compiled step where one is attached, or the model itself
            decode = self.model if extra else self.static or getattr(self.model, "decode_step", None) or self.model
            logits = decode(self._tensor([[s.token_ids[-1]] for s in seqs]), batch, last_only=True, **extra)[:, -1]
            for s, row in zip(seqs, logits):
                self._computed(s, len(s.token_ids))
                ready.append((s, row))
        return ready

    def _image_inputs(self, seqs: list[Sequence], batch: Batch, llama4) -> dict:
        """The forward's image keywords: Llama 3.2 Vision's cross-attention inputs for rows with images (every
        step: each token reads them), Llama 4's image embeddings (`llama4()`, prefill only)."""
        if not any(s.request.images for s in seqs):
            return {}
        if not self.model.args.cross_attention_layers:
            embeds = llama4()
            return {"image_embeds": embeds} if embeds is not None else {}
        from herd.model.mllama import cross_inputs

        vision = self.model.args.vision
        if vision is None:
            raise ValueError("this model cannot see images (it has no image encoder)")
        rows = [[(im.positions[0], im.n_tiles, self.image_features.get(self.model, im)) for im in s.request.images]
                for s in seqs]
        return {"cross": cross_inputs(rows, batch.positions, vision.n_patches, vision.max_num_tiles)}

    def _image_embeds(self, group: list[PrefillChunk], steps: int):
        """(mask [B, steps], rows) for the image tokens of this group's chunks, or None when there are none."""
        if not any(c.seq.request.images for c in group):
            return None
        mask = torch.zeros(len(group), steps, dtype=torch.bool)
        rows = []
        for b, c in enumerate(group):
            for image in c.seq.request.images:
                wanted = [i for i, p in enumerate(image.positions) if c.start <= p < c.end]
                if not wanted:
                    continue
                features = self.image_features.get(self.model, image)
                rows.append((b, [image.positions[i] - c.start for i in wanted], features[wanted]))
        if not rows:
            return None
        for b, offsets, _ in rows:
            mask[b, offsets] = True
        # masked_scatter fills row-major: each row's positions in order (a row's images are in prompt order)
        ordered = sorted(rows, key=lambda r: (r[0], r[1][0]))
        return mask.to(self.device), torch.cat([r[2] for r in ordered])

    def _select_adapters(self, seqs: list[Sequence]) -> None:
        """Each row's LoRA adapter, for a model serving several (herd.transforms.lora.use_adapters attaches
        `select_adapters`); a model without them takes none."""
        select = getattr(self.model, "select_adapters", None)
        if select is not None:
            select([s.request.adapter for s in seqs])
        elif any(s.request.adapter for s in seqs):
            raise ValueError("this model serves no adapters")

    def _computed(self, seq: Sequence, upto: int) -> None:
        self.computed_tokens += upto - seq.num_computed
        seq.num_computed = upto
        self.blocks.filled(seq.blocks, seq.token_ids, upto)

    def generable(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` [..., V] with -inf for the ids no token stands for. A checkpoint's embedding often has more
        rows than its tokenizer has tokens (padded to a round size); the model computes real logits for them,
        and LLM.logits and herd's scoring keep them as transformers does (a logits API that claims
        transformers' values must return them). Generation is where they are banned: an id without a token
        can neither be sampled nor decoded, so the draw and the logprobs shown beside the text (whose
        alternatives are decoded) never see them."""
        n = getattr(self.tokenizer, "vocab_size", None)
        if n is None or n >= logits.shape[-1]:
            return logits
        return logits.float().index_fill(-1, torch.arange(n, logits.shape[-1], device=logits.device), float("-inf"))

    def _prompt_logprobs(self, seq: Sequence, start: int, end: int, logits: torch.Tensor) -> None:
        """Logprob of prompt token i+1 from the logits at position i, for the positions of this chunk."""
        if start == 0:
            seq.prompt_logprobs.append(None)  # the first token has no context to be predicted from
        logprobs = torch.log_softmax(self.generable(logits.float()), dim=-1)
        top_n = seq.request.prompt_logprobs
        for i in range(start, min(end, seq.n_prompt - 1)):
            row = logprobs[i - start]
            seq.prompt_logprobs.append(token_logprob(row, seq.token_ids[i + 1], top_n, self.tokenizer, row))

    @torch.inference_mode()
    def sample(self, ready: list[tuple[Sequence, torch.Tensor]]) -> list[tuple[int, TokenLogprob | None]]:
        """One token per ready sequence: penalties, constraint masks, then per-request seeded draws."""
        if not ready:
            return []
        seqs = [s for s, _ in ready]
        logits = self.generable(torch.stack([row for _, row in ready]))  # [N, V]
        params = [s.request.params for s in seqs]
        shaped = apply_penalties(logits, [s.token_ids for s in seqs], params, n_prompt=[s.n_prompt for s in seqs])
        for i, s in enumerate(seqs):
            if s.constraint is not None:
                allowed = s.constraint.allowed(self.vocab_size).to(shaped.device)
                shaped[i] = shaped[i].masked_fill(~allowed, float("-inf"))
        tokens = sample(shaped, params, [s.generator for s in seqs]).tolist()
        out = []
        for i, (s, token) in enumerate(zip(seqs, tokens)):
            n = s.request.logprobs
            out.append((token, token_logprob(logits[i], token, n, self.tokenizer) if n is not None else None))
        return out
