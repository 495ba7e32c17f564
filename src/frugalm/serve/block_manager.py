"""Paged latent cache bookkeeping: fixed-size blocks, reference counts, and prefix caching by block hash.

The cache tensor itself lives in the model runner; this class only decides which block ids a sequence
owns. A full block whose latents are final gets a hash chained through its predecessor's hash, so the
same prompt prefix maps to the same block chain and a later request can share those blocks instead of
recomputing them. The stored key (parent hash, tokens) is compared on every hit, so a 64-bit hash
collision can never hand a sequence someone else's cache.

Freed blocks keep their hash and go to the back of an LRU free list: a finished conversation's prefix
stays reusable until the memory is actually needed.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional

from frugalm.serve.sequence import Sequence


class Block:
    __slots__ = ("id", "ref_count", "hash", "key")

    def __init__(self, block_id: int):
        self.id = block_id
        self.ref_count = 0
        self.hash: Optional[int] = None
        self.key: Optional[tuple] = None


class BlockManager:
    """Allocates cache blocks to sequences; shares full, identical prefix blocks between them.

    `hash_next_token` is set when an MTP draft layer is cached too: its entry at a block's last position
    was computed from the token *after* the block, so that token is part of the block's identity.
    """

    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True,
                 hash_next_token: bool = False):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.hash_next_token = hash_next_token
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # block hash -> block id
        # Counters for metrics: prompt tokens looked up / found in the prefix cache.
        self.query_tokens = 0
        self.hit_tokens = 0

    # ------------------------------------------------------------------ state
    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by live sequences (cached-but-free blocks count as free)."""
        return 1.0 - len(self.free) / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ------------------------------------------------------------------ hashing
    def _key(self, token_ids: list[int], index: int, parent: Optional[int]) -> tuple:
        bs = self.block_size
        tokens = tuple(token_ids[index * bs:(index + 1) * bs])
        nxt = token_ids[(index + 1) * bs] if self.hash_next_token else None
        return (parent, tokens, nxt)

    def match_prefix(self, token_ids: list[int]) -> tuple[list[int], list[int]]:
        """Leading cached blocks for `token_ids`: (block ids, their hashes).

        At most (len - 1) // block_size blocks, so at least one token is always left to compute (its logits
        give the first sampled token), and with `hash_next_token` the token after each block exists.
        """
        if not self.enable_prefix_caching:
            return [], []
        ids: list[int] = []
        hashes: list[int] = []
        parent: Optional[int] = None
        for j in range((len(token_ids) - 1) // self.block_size):
            key = self._key(token_ids, j, parent)
            h = hash(key)
            block_id = self.cached.get(h)
            if block_id is None or self.blocks[block_id].key != key:
                break
            ids.append(block_id)
            hashes.append(h)
            parent = h
        return ids, hashes

    # ------------------------------------------------------------------ allocation
    def _take_fresh(self) -> int:
        block_id, _ = self.free.popitem(last=False)  # least recently freed first
        block = self.blocks[block_id]
        if block.hash is not None:  # evict its prefix-cache entry: the memory is being reused
            if self.cached.get(block.hash) == block_id:
                del self.cached[block.hash]
            block.hash = block.key = None
        block.ref_count = 1
        return block_id

    def can_admit(self, hits: list[int], num_tokens: int) -> bool:
        """Whether a new sequence sharing `hits` can get blocks for its first `num_tokens` tokens."""
        reviving = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        fresh = self.blocks_needed(num_tokens) - len(hits)
        return fresh + reviving <= len(self.free)

    def admit(self, seq: Sequence, hits: list[int], hashes: list[int], num_tokens: int) -> None:
        """Give a waiting sequence its shared prefix blocks plus fresh ones covering `num_tokens` tokens."""
        assert not seq.block_table, "admit() on a sequence that already holds blocks"
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free[block_id]
            block.ref_count += 1
        seq.block_table = list(hits)
        seq.block_hashes = list(hashes)
        seq.num_hashed_blocks = len(hits)
        seq.num_computed = len(hits) * self.block_size
        self.query_tokens += len(seq.token_ids)
        self.hit_tokens += seq.num_computed
        if not self.ensure(seq, num_tokens):
            raise RuntimeError("admit() without can_admit(): out of cache blocks")

    def ensure(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow `seq`'s block table to hold `num_tokens` positions; all or nothing."""
        need = self.blocks_needed(num_tokens) - len(seq.block_table)
        if need <= 0:
            return True
        if need > len(self.free):
            return False
        seq.block_table.extend(self._take_fresh() for _ in range(need))
        return True

    def free_sequence(self, seq: Sequence) -> None:
        """Release a sequence's blocks; its registered blocks stay findable until evicted."""
        for block_id in reversed(seq.block_table):  # tail first: a prefix outlives its continuation
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
        seq.block_table = []
        seq.block_hashes = []
        seq.num_hashed_blocks = 0

    def register(self, seq: Sequence) -> None:
        """Publish the sequence's newly completed full blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        full = min(seq.num_computed, len(seq.token_ids) - (1 if self.hash_next_token else 0)) // bs
        hashes = seq.block_hashes
        for j in range(seq.num_hashed_blocks, full):
            parent = hashes[j - 1] if j else None
            key = self._key(seq.token_ids, j, parent)
            h = hash(key)
            hashes.append(h)
            block = self.blocks[seq.block_table[j]]
            if h not in self.cached and block.hash is None:
                self.cached[h] = block.id
                block.hash, block.key = h, key
        seq.num_hashed_blocks = max(seq.num_hashed_blocks, full)
