"""Block-paged KV cache: a pool of fixed-size blocks, reference-counted so that parallel samples share
their prompt's blocks (copy-on-write when one of them writes into a shared block).

  * ``BlockAllocator``  - free list and reference counts;
  * ``KVCacheManager``  - every block decision: slots for a step's new tokens (with copy-on-write), admission,
    forks, release, scratch tables. The scheduler asks it and never touches a block itself (vLLM v1's split);
  * ``PagedKVCache``    - the tensors.

Shape legend: N blocks, B block size (tokens), KV key/value heads, D head dim, L layers.
A cache *slot* is one token position inside one block: slot = block * B + offset.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from cluster.config import ModelConfig


class BlockAllocator:
    """Free list plus reference counts. Invariant: a block is free iff its count is 0."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._refs = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def refcount(self, block: int) -> int:
        return self._refs[block]

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError("KV cache out of blocks (the scheduler should have checked)")
        block = self._free.popleft()
        assert self._refs[block] == 0
        self._refs[block] = 1
        return block

    def share(self, block: int) -> None:
        assert self._refs[block] > 0, f"sharing free block {block}"
        self._refs[block] += 1

    def release(self, block: int) -> None:
        assert self._refs[block] > 0, f"releasing free block {block}"
        self._refs[block] -= 1
        if self._refs[block] == 0:
            self._free.append(block)

    def release_all(self, blocks: list[int]) -> None:
        for block in blocks:
            self.release(block)
        blocks.clear()


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class HasBlocks(Protocol):
    """What the manager needs of a sequence: its block table, tokens and how many are in the cache."""

    block_table: list[int]
    num_computed: int

    @property
    def token_ids(self) -> list[int]: ...


class KVCacheManager:
    """Owns every allocation decision. ``allocate_slots`` is the one way a step gets room for new tokens."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.allocator = BlockAllocator(num_blocks)
        self.block_size = block_size

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def num_free(self) -> int:
        return self.allocator.num_free

    @property
    def num_used(self) -> int:
        return self.allocator.num_used

    def refcount(self, block: int) -> int:
        return self.allocator.refcount(block)

    def blocks_for(self, num_tokens: int) -> int:
        return blocks_for(num_tokens, self.block_size)

    def allocate_slots(self, seq: HasBlocks, num_new: int) -> list[tuple[int, int]] | None:
        """Room for ``num_new`` more tokens of ``seq``: new blocks, and a private copy of a shared block it would
        write into. Returns the (src, dst) block copies to make first, or None when the cache cannot hold them
        (the caller preempts someone and asks again)."""
        cow = self._shared_partial_block(seq)
        needed = self.blocks_for(seq.num_computed + num_new) - len(seq.block_table) + (cow is not None)
        if needed > self.allocator.num_free:
            return None
        copies = []
        if cow is not None:
            src, dst = seq.block_table[cow], self.allocator.allocate()
            self.allocator.release(src)
            seq.block_table[cow] = dst
            copies.append((src, dst))
        while len(seq.block_table) < self.blocks_for(seq.num_computed + num_new):
            seq.block_table.append(self.allocator.allocate())
        return copies

    def _shared_partial_block(self, seq: HasBlocks) -> int | None:
        """Index in the block table of a shared, partly filled block the next token would write into."""
        if seq.num_computed % self.block_size == 0:
            return None
        idx = seq.num_computed // self.block_size
        return idx if self.allocator.refcount(seq.block_table[idx]) > 1 else None

    def blocks_still_needed(self, seq: HasBlocks) -> int:
        """Blocks a sequence will claim before its whole current context is in the cache."""
        return self.blocks_for(len(seq.token_ids)) - len(seq.block_table)

    def can_admit(self, seq: HasBlocks, reserved: int) -> bool:
        """Whether a waiting sequence's whole context fits in the free blocks beyond ``reserved``."""
        return self.blocks_for(len(seq.token_ids)) <= self.allocator.num_free - reserved

    def fork(self, parent: HasBlocks, child: HasBlocks) -> None:
        """The child shares every block of the parent (copy-on-write when either writes into a shared one)."""
        child.block_table = list(parent.block_table)
        for block in child.block_table:
            self.allocator.share(block)

    def free(self, seq: HasBlocks) -> None:
        self.allocator.release_all(seq.block_table)

    def allocate_table(self, num_tokens: int) -> list[int]:
        """A scratch block table for ``num_tokens`` (scoring); give it back with ``free_table``."""
        need = self.blocks_for(num_tokens)
        if need > self.allocator.num_free:
            raise ValueError(f"scoring needs {need} free KV blocks, {self.allocator.num_free} are free")
        return [self.allocator.allocate() for _ in range(need)]

    def free_table(self, table: list[int]) -> None:
        self.allocator.release_all(table)


def kv_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * dtype.itemsize


@dataclass
class PagedKVCache:
    """Per layer, keys and values for every slot: k[l], v[l] of shape (N * B, KV, D)."""

    k: list[Tensor]
    v: list[Tensor]
    block_size: int

    @classmethod
    def allocate(cls, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str) -> PagedKVCache:
        shape = (num_blocks * block_size, cfg.num_kv_heads, cfg.head_dim)
        return cls(k=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)],
                   v=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)],
                   block_size=block_size)

    def write(self, layer: int, slots: Tensor, k: Tensor, v: Tensor) -> None:
        """slots (T,), k/v (T, KV, D)."""
        self.k[layer][slots] = k
        self.v[layer][slots] = v

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy whole blocks src -> dst in every layer (copy-on-write of shared blocks)."""
        if not pairs:
            return
        bs = self.block_size
        offsets = torch.arange(bs, device=self.k[0].device)
        src = torch.cat([s * bs + offsets for s, _ in pairs])
        dst = torch.cat([d * bs + offsets for _, d in pairs])
        for cache in (*self.k, *self.v):
            cache[dst] = cache[src]
