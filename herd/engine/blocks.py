"""Which cache blocks each sequence's tokens live in, and which blocks can be shared. No tensors.

vLLM's block manager at herd's scale. Blocks hold `block_size` tokens; block 0 is never handed out (the
padding block, see herd.model.cache). A block that is full is keyed by the hash of its tokens and of
everything before it (the hash of the previous block), so two sequences that start with the same tokens
(a system prompt, a chat's history) find the same keys: a new sequence takes every full block of its
prompt that is already cached, by reference count, and computes only the rest (automatic prefix caching).
A block nobody uses any more keeps its contents and its key until its space is needed; then the least
recently used such block is evicted. A block in use is never evicted, so eviction cannot touch a running
sequence.

Admission reserves: a sequence is let in only when the blocks it can ever need (prompt plus max_tokens)
are free or evictable, counting what it shares, so a running sequence never waits for memory, and
memory in use follows the tokens actually written.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence


def block_key(previous: bytes, tokens: Sequence[int], extra: bytes = b"") -> bytes:
    """A cryptographic hash (so that no prompt can be made to collide with another's prefix) of a block's
    tokens, of the key of the block before it and of `extra` (the images whose features it holds)."""
    return hashlib.blake2b(previous + array("q", tokens).tobytes() + extra, digest_size=16).digest()


def image_extra(images: Sequence[tuple[int, int, bytes]], begin: int, end: int) -> bytes:
    """What a block of positions begin..end-1 holds besides its token ids: the digest and first position of
    every image (first, last position, digest) with features in it. An image's tokens are the same ids
    whatever the picture, so two images never share a block."""
    return b"".join(b"%d:" % first + digest for first, last, digest in images if first < end and last >= begin)


@dataclass
class Blocks:
    """One sequence's cache blocks: `table` in order, `keys` of its full blocks so far, and how many more
    blocks it was promised."""

    table: list[int] = field(default_factory=list)
    keys: list[bytes] = field(default_factory=list)
    reserved: int = 0
    salt: bytes = b""  # what else the keys depend on (the adapter whose weights computed them)
    images: tuple = ()  # (first, last position, digest) of each image in the prompt: part of its blocks' keys


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        if num_blocks < 2:
            raise ValueError(f"need at least 2 blocks (one is the padding block), got {num_blocks}")
        self.block_size, self.prefix_caching = block_size, prefix_caching
        self.num_blocks = num_blocks
        self.free: list[int] = list(range(num_blocks - 1, 0, -1))  # never used; pop() gives low ids first
        self.refs = [0] * num_blocks
        self.key_of: dict[int, bytes] = {}  # block -> hash of its full contents and its prefix
        self.by_key: dict[bytes, int] = {}  # hash -> block
        self.idle: OrderedDict[int, None] = OrderedDict()  # cached blocks with no user, least recent first
        self.reserved = 0  # blocks promised to running sequences but not allocated yet
        self.hits = self.queries = 0  # prefix-cache lookups, in tokens

    # -- counts ----------------------------------------------------------------------------------------------
    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    @property
    def available(self) -> int:
        """Blocks a new reservation may take: free, or evictable, less what running sequences are owed."""
        return len(self.free) + len(self.idle) - self.reserved

    @property
    def in_use(self) -> int:
        return sum(1 for r in self.refs if r > 0)

    # -- prefix caching --------------------------------------------------------------------------------------
    def keys(self, tokens: Sequence[int], salt: bytes = b"", images: Sequence = ()) -> list[bytes]:
        """The chained hash of every full block of `tokens` (computed by the weights `salt` names, holding
        the features of `images`: (first, last position, digest) each)."""
        out, bs = [], self.block_size
        for i in range(len(tokens) // bs):
            extra = image_extra(images, i * bs, (i + 1) * bs) if images else b""
            out.append(block_key(out[-1] if out else salt, tokens[i * bs : (i + 1) * bs], extra))
        return out

    def cached_prefix(self, tokens: Sequence[int], salt: bytes = b"", images: Sequence = ()) -> list[int]:
        """The cached blocks that hold the longest prefix of full blocks of `tokens` (not yet taken)."""
        if not self.prefix_caching:
            return []
        blocks = []
        for key in self.keys(tokens, salt, images):
            block = self.by_key.get(key)
            if block is None:
                break
            blocks.append(block)
        return blocks

    # -- one sequence's blocks -------------------------------------------------------------------------------
    def admit(self, tokens: Sequence[int], total: int, share: bool = True, salt: bytes = b"",
              images: Sequence = ()) -> Blocks | None:
        """Blocks for a sequence whose prompt is `tokens` and which may grow to `total` tokens: the cached
        blocks of its prompt's prefix, shared, and the rest reserved; None if they do not fit now. At least
        one prompt token is always left to compute (its logits start generation). len(table) * block_size
        tokens are then already computed. share=False computes the whole prompt (prompt logprobs need it).
        `salt`: keys computed by other weights (a LoRA adapter) are other keys, never shared with the base's."""
        shared = self.cached_prefix(tokens, salt, images) if share else []
        while shared and len(shared) * self.block_size >= len(tokens):
            shared.pop()
        need = self.blocks_for(total) - len(shared)
        idle_taken = sum(1 for b in shared if self.refs[b] == 0)  # taking these makes them unavailable
        if need > self.available - idle_taken:
            return None
        for b in shared:
            self._take(b)
        self.reserved += need
        self.queries += len(tokens)
        self.hits += len(shared) * self.block_size
        return Blocks(list(shared), [self.key_of[b] for b in shared], need, salt, tuple(images))

    def grow(self, blocks: Blocks, tokens: int) -> None:
        """Allocate reserved blocks until the table holds `tokens` tokens."""
        while len(blocks.table) * self.block_size < tokens:
            if blocks.reserved <= 0:
                raise RuntimeError("a sequence outgrew its reservation")
            blocks.reserved -= 1
            self.reserved -= 1
            blocks.table.append(self._allocate())

    def filled(self, blocks: Blocks, tokens: Sequence[int], done: int) -> None:
        """`done` tokens of `tokens` are now written: key the blocks that became full, so later sequences
        find them."""
        bs = self.block_size
        while (len(blocks.keys) + 1) * bs <= done:
            i = len(blocks.keys)
            extra = image_extra(blocks.images, i * bs, (i + 1) * bs) if blocks.images else b""
            key = block_key(blocks.keys[-1] if blocks.keys else blocks.salt, tokens[i * bs : (i + 1) * bs], extra)
            blocks.keys.append(key)
            block = blocks.table[i]
            # the same text computed twice at once (two sequences prefilling it together): keep the first
            if self.prefix_caching and block not in self.key_of and key not in self.by_key:
                self.key_of[block], self.by_key[key] = key, block

    def release(self, blocks: Blocks) -> None:
        """A sequence ended: drop its blocks (cached ones stay findable until evicted) and its reservation."""
        self.reserved -= blocks.reserved
        blocks.reserved = 0
        for block in blocks.table:
            self.refs[block] -= 1
            if self.refs[block] == 0:
                if block in self.key_of:
                    self.idle[block] = None
                else:
                    self.free.append(block)
        blocks.table.clear()

    def _take(self, block: int) -> None:
        if self.refs[block] == 0:
            self.idle.pop(block, None)
        self.refs[block] += 1

    def _allocate(self) -> int:
        if self.free:
            block = self.free.pop()
        else:  # the least recently used cached block with no user
            block, _ = self.idle.popitem(last=False)
            del self.by_key[self.key_of.pop(block)]
        self.refs[block] = 1
        return block
