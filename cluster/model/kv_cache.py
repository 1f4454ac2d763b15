"""Block-paged KV cache: a pool of fixed-size blocks, reference-counted so that parallel samples share
their prompt's blocks (copy-on-write when one of them writes into a shared block), with automatic prefix caching:
every full block is known by a chained hash of the tokens up to its end, so a later request whose context starts
with the same tokens reuses the blocks instead of computing them again (vLLM v1's design).

  * ``BlockAllocator``  - reference counts, the free blocks in LRU order, and the prefix cache's hash -> block map.
    A freed block keeps its hash and stays reusable until its memory is handed out again (least recently freed
    first; blocks holding nothing cached go before any cached one);
  * ``KVCacheManager``  - every block decision: cached prefixes at admission, slots for a step's new tokens (with
    copy-on-write), caching the blocks a step filled, forks, release, scratch tables. The scheduler asks it and
    never touches a block itself (vLLM v1's split);
  * ``PagedKVCache``    - the tensors.

What a block's keys and values depend on: the token ids at and before it, and their positions (implied by the
chain), through one engine's weights and dtype. The chained hash covers the first two; the cache lives and dies
with its engine, so the others never change under it. Sliding-window layers keep every block (attention reads
only the window), so a cached block is valid whatever the window.

Shape legend: N blocks, B block size (tokens), KV key/value heads, D head dim, L layers.
A cache *slot* is one token position inside one block: slot = block * B + offset.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from cluster.model.config import ModelConfig

BlockHash = bytes


def chain_block_hash(parent: BlockHash | None, tokens: Sequence[int]) -> BlockHash:
    """The hash of a full block: its tokens chained to the hash of the block before it (so equal hashes mean
    equal contexts from position 0, not just equal tokens). 128-bit BLAKE2b: collisions are not a concern."""
    h = hashlib.blake2b(parent or b"", digest_size=16)
    h.update(array("q", tokens).tobytes())
    return h.digest()


class BlockAllocator:
    """Reference counts, free blocks in LRU order and the prefix cache's map. Invariant: a block is free iff its
    count is 0; a free block may still be cached (it is evicted from the cache when handed out again)."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # first out first
        self._refs = [0] * num_blocks
        self._hash_of: dict[int, BlockHash] = {}
        self._block_of: dict[BlockHash, int] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached(self) -> int:
        """Blocks the prefix cache knows (in use or free)."""
        return len(self._block_of)

    def refcount(self, block: int) -> int:
        return self._refs[block]

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError("KV cache out of blocks (the scheduler should have checked)")
        block, _ = self._free.popitem(last=False)
        assert self._refs[block] == 0
        evicted = self._hash_of.pop(block, None)
        if evicted is not None:
            del self._block_of[evicted]
        self._refs[block] = 1
        return block

    def share(self, block: int) -> None:
        assert self._refs[block] > 0, f"sharing free block {block}"
        self._refs[block] += 1

    def touch(self, block: int) -> None:
        """Take a reference on a cached block, taking it off the free list if nobody held it."""
        assert block in self._hash_of, f"block {block} is not cached"
        if self._refs[block] == 0:
            del self._free[block]
        self._refs[block] += 1

    def release(self, block: int) -> None:
        assert self._refs[block] > 0, f"releasing free block {block}"
        self._refs[block] -= 1
        if self._refs[block] == 0:
            self._free[block] = None  # cached: most recently used, evicted last
            if block not in self._hash_of:
                self._free.move_to_end(block, last=False)  # nothing worth keeping: handed out first

    def release_all(self, blocks: list[int]) -> None:
        """Release a table's blocks, last first: a context's tail is the least likely to be shared, so it is
        evicted before its head."""
        for block in reversed(blocks):
            self.release(block)
        blocks.clear()

    def cached(self, block_hash: BlockHash) -> int | None:
        return self._block_of.get(block_hash)

    def is_cached(self, block: int) -> bool:
        return block in self._hash_of

    def register(self, block: int, block_hash: BlockHash) -> None:
        """Make a full, held block findable by its hash; a duplicate of a block already cached stays private."""
        assert self._refs[block] > 0, f"caching free block {block}"
        if block_hash not in self._block_of and block not in self._hash_of:
            self._block_of[block_hash] = block
            self._hash_of[block] = block_hash


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class HasBlocks(Protocol):
    """What the manager needs of a sequence: its block table, tokens, how many are in the cache, the hashes of
    its full blocks (filled in by the manager) and how many of its blocks are in the prefix cache."""

    block_table: list[int]
    num_computed: int
    block_hashes: list[BlockHash]
    num_cached_blocks: int

    @property
    def token_ids(self) -> list[int]: ...


@dataclass
class PrefixCacheStats:
    """Prefix cache lookups at admission, in tokens (vLLM's prefix_cache_queries / prefix_cache_hits)."""

    queries: int = 0  # context tokens of admitted sequences looked up
    hits: int = 0  # of those, tokens found in the cache (not computed again)


class KVCacheManager:
    """Owns every allocation decision. ``allocate_slots`` is the one way a step gets room for new tokens."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.allocator = BlockAllocator(num_blocks)
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.prefix_stats = PrefixCacheStats()

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

    # ---------------------------------------------------------------------------------------- prefix cache

    def block_hashes(self, seq: HasBlocks, num_blocks: int) -> list[BlockHash]:
        """The chained hashes of the first ``num_blocks`` full blocks of ``seq`` (computed once, kept on it)."""
        hashes, bs = seq.block_hashes, self.block_size
        while len(hashes) < num_blocks:
            i = len(hashes)
            hashes.append(chain_block_hash(hashes[-1] if hashes else None, seq.token_ids[i * bs:(i + 1) * bs]))
        return hashes[:num_blocks]

    def cached_prefix(self, seq: HasBlocks, max_tokens: int) -> list[int]:
        """The cached blocks holding the longest prefix of ``seq``'s context, at most ``max_tokens`` tokens (the
        caller keeps back what must be computed: at least the last token, whose logits are sampled from)."""
        if not self.enable_prefix_caching or seq.block_table or max_tokens < self.block_size:
            return []
        blocks = []
        for block_hash in self.block_hashes(seq, max_tokens // self.block_size):
            block = self.allocator.cached(block_hash)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def blocks_being_computed(self, seqs: Iterable[HasBlocks]) -> set[BlockHash]:
        """Hashes of the full blocks of their current context that ``seqs`` have not yet computed (their
        prefills in flight): each becomes findable once the step that computes it is done."""
        if not self.enable_prefix_caching:
            return set()
        pending: set[BlockHash] = set()
        for seq in seqs:
            full = len(seq.token_ids) // self.block_size
            first = seq.num_computed // self.block_size
            if first < full:
                pending.update(self.block_hashes(seq, full)[first:])
        return pending

    def next_block_in(self, seq: HasBlocks, num_cached_blocks: int, max_tokens: int,
                      hashes: set[BlockHash]) -> bool:
        """Whether the block of ``seq`` after its ``num_cached_blocks`` cached ones (one it could take from the
        cache, within ``max_tokens``) is among ``hashes``."""
        if not hashes or (num_cached_blocks + 1) * self.block_size > max_tokens:
            return False
        return self.block_hashes(seq, num_cached_blocks + 1)[num_cached_blocks] in hashes

    def take_cached(self, seq: HasBlocks, blocks: list[int]) -> None:
        """Admit ``seq`` with the cached ``blocks`` (from ``cached_prefix``) as the start of its table."""
        assert not seq.block_table and seq.num_computed == 0
        for block in blocks:
            self.allocator.touch(block)
        seq.block_table = list(blocks)
        seq.num_cached_blocks = len(blocks)
        seq.num_computed = len(blocks) * self.block_size
        if self.enable_prefix_caching:
            self.prefix_stats.queries += len(seq.token_ids)
            self.prefix_stats.hits += seq.num_computed

    def cache_full_blocks(self, seq: HasBlocks) -> None:
        """After a step wrote them: make every block of ``seq`` now full of computed tokens findable."""
        full = seq.num_computed // self.block_size
        if not self.enable_prefix_caching or full <= seq.num_cached_blocks:
            return
        hashes = self.block_hashes(seq, full)
        for i in range(seq.num_cached_blocks, full):
            self.allocator.register(seq.block_table[i], hashes[i])
        seq.num_cached_blocks = full

    # ------------------------------------------------------------------------------------------ allocation

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

    def can_admit(self, seq: HasBlocks, reserved: int, cached: Sequence[int] = ()) -> bool:
        """Whether a waiting sequence's whole context fits in the free blocks beyond ``reserved``, given the
        ``cached`` blocks it would start from (those nobody holds are free blocks it would take)."""
        revived = sum(1 for block in cached if self.allocator.refcount(block) == 0)
        need = self.blocks_for(len(seq.token_ids)) - len(cached)
        return need <= self.allocator.num_free - revived - reserved

    def fork(self, parent: HasBlocks, child: HasBlocks) -> None:
        """The child shares every block of the parent (copy-on-write when either writes into a shared one)."""
        child.block_table = list(parent.block_table)
        child.block_hashes = list(parent.block_hashes)
        child.num_cached_blocks = parent.num_cached_blocks
        for block in child.block_table:
            self.allocator.share(block)

    def free(self, seq: HasBlocks) -> None:
        """Release the sequence's blocks; the cached ones stay findable until their memory is needed."""
        self.allocator.release_all(seq.block_table)
        seq.num_cached_blocks = 0

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
