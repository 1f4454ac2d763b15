"""Block-paged KV cache: a pool of fixed-size blocks, reference-counted so that parallel samples share
their prompt's blocks (copy-on-write when one of them writes into a shared block).

Shape legend: N blocks, B block size (tokens), KV key/value heads, D head dim, L layers.
A cache *slot* is one token position inside one block: slot = block * B + offset.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

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
