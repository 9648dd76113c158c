"""Direct Preference Optimization (Rafailov et al. 2023) on {"prompt", "chosen", "rejected"} JSONL.

loss = -log σ(β · ((log π(chosen) - log π(rejected)) - (log π_ref(chosen) - log π_ref(rejected)))), averaged
over pairs (TRL's "sigmoid" loss), where log π(y) sums the log-probabilities of the completion's tokens.
The reference is the model before training, so its log-probabilities are computed once, before the first
step, and no second model is kept (with full DPO under torchrun, over the FSDP-sharded model, each process
scoring its share). A prompt may be a string (plain text, BOS first) or a list of chat
messages (rendered with the model's chat format, assistant header last; then the completions end with
the format's end of turn as the tokenizer's EOS)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from herd.errors import DataError
from herd.finetune.data import DataFile, Example, Row, collate, read_data
from herd.finetune.forward import sequence_logprobs
from herd.finetune.train import Trainer


@dataclass
class Pair:
    chosen: Row
    rejected: Row
    ref_chosen: float = 0.0
    ref_rejected: float = 0.0


def _row(example: Example) -> Row:
    row = Row()
    row.add(example)
    return row


def load_preferences(data, tokenizer, chat_format, max_len: int, truncate: bool = False) -> tuple[list[Pair], int]:
    """(pairs, how many were cut to max_len) of a data file: a path, or a DataFile read_data made."""
    from herd.chat import render
    from herd.errors import TemplateError

    data = data if isinstance(data, DataFile) else read_data(data)
    if data.kind != "preference":
        raise DataError(f"{data.path}: DPO needs {{\"prompt\", \"chosen\", \"rejected\"}} records, not {data.kind}")
    pairs, truncated = [], 0
    for where, record in data.records:
        prompt = record["prompt"]
        if isinstance(prompt, list):
            if chat_format is None:
                raise DataError(f"{where}: a chat prompt, but this model has no chat format")
            try:
                head = render(prompt, tokenizer, chat_format, add_generation_prompt=True)
            except TemplateError as e:
                raise DataError(f"{where}: {e}") from None
        elif isinstance(prompt, str):
            head = tokenizer.encode(prompt, bos=tokenizer.bos_id is not None)
        else:
            raise DataError(f"{where}: \"prompt\" must be a string or a list of chat messages")
        rows = []
        for key in ("chosen", "rejected"):
            if not isinstance(record[key], str) or not record[key]:
                raise DataError(f"{where}: \"{key}\" must be a non-empty string")
            tail = tokenizer.encode(record[key], bos=False)
            if tokenizer.eos_id is not None:
                tail.append(tokenizer.eos_id)
            ids, train = head + tail, [False] * len(head) + [True] * len(tail)
            if len(ids) > max_len:
                if not truncate:
                    raise DataError(f"{where}: prompt + {key} is {len(ids)} tokens, longer than --max-len {max_len} "
                                    "(raise --max-len, or pass --truncate)")
                ids, train = ids[:max_len], train[:max_len]
                truncated += 1
            if not any(train[1:]):
                raise DataError(f"{where}: no {key} token left after truncation")
            rows.append(_row(Example(ids, train, where)))
        pairs.append(Pair(*rows))
    return pairs, truncated


def dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta: float) -> torch.Tensor:
    """Per-pair sigmoid DPO loss."""
    return -F.logsigmoid(beta * ((chosen - rejected) - (ref_chosen - ref_rejected)))


class DPOTrainer(Trainer):
    """`shard`: full-model DPO under torch.distributed with FSDP2, as Trainer's full fine-tuning."""

    def __init__(self, model, config, items: list[Pair], eval_items=None, pad_id: int = 0, device=None,
                 shard: bool = False):
        super().__init__(model, config, items, eval_items, pad_id, device, shard)
        self.reference_logprobs(self.items + self.eval_items)

    @torch.no_grad()
    def reference_logprobs(self, pairs: list[Pair]) -> None:
        """Each process scores its share of the pairs (every process runs the same number of forwards, as
        FSDP's collectives need; a process short of a batch scores a spare one and drops it); the scores are
        then exchanged, so every process holds every pair's."""
        import torch.distributed as dist

        self.model.eval()
        size = self.config.batch_size
        mine = list(range(self.rank, len(pairs), self.world))
        rounds = math.ceil(math.ceil(len(pairs) / self.world) / size)
        scores = {}
        for r in range(rounds):
            index = mine[r * size:(r + 1) * size]
            chunk = [pairs[i] for i in index] or pairs[:1]
            batch, _ = self.make_batch(chunk)
            with self.autocast():
                logps = self.apply(sequence_logprobs, batch).float().cpu()
            for k, i in enumerate(index):
                scores[i] = (float(logps[k]), float(logps[len(chunk) + k]))
        if self.world > 1:
            shares = [None] * self.world
            dist.all_gather_object(shares, scores)
            scores = {i: v for share in shares for i, v in share.items()}
        for i, pair in enumerate(pairs):
            pair.ref_chosen, pair.ref_rejected = scores[i]

    def make_batch(self, items: list[Pair]):
        rows = [p.chosen for p in items] + [p.rejected for p in items]
        ref = torch.tensor([p.ref_chosen for p in items] + [p.ref_rejected for p in items], dtype=torch.float64)
        return collate(rows, self.pad_id).to(self.device), ref

    def count(self, batch) -> int:
        return batch[0].tokens.shape[0] // 2

    def batch_tokens(self, batch) -> int:
        return int((batch[0].segments >= 0).sum())

    def loss_of(self, model, batch) -> torch.Tensor:
        rows, ref = batch
        logps = sequence_logprobs(model, rows, self.config.activation_checkpointing)
        n = logps.shape[0] // 2
        ref = ref.to(logps.dtype)
        return dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], self.config.dpo_beta).sum()


__all__ = ["Pair", "load_preferences", "dpo_loss", "DPOTrainer"]
