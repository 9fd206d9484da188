"""Paged KV cache: the device tensors and the host-side block manager.

Device layout (shared with the attention kernels): one tensor per layer,
    kv[layer]: [2, num_blocks, block_size, num_kv_heads, head_dim]     (index 0 = K, 1 = V)
Token t of a sequence lives in block block_table[t // block_size] at offset t % block_size,
i.e. flat slot block * block_size + offset of kv[layer][i].view(-1, kv_heads, head_dim).
Block 0 is never handed out: it is the scratch block that padding rows of a batch write to
and that unused block-table entries point at.

Block manager invariants (checked by `check()`, driven by property and soak tests):
  * every block other than 0 is in exactly one of: free (ref 0, no hash), cached (ref 0,
    has a hash, in the LRU), used (ref > 0);
  * a used block's ref count equals the number of live tables that name it;
  * the hash table maps each hash to one block carrying that hash;
  * when no request holds blocks, used is empty and free + cached = num_blocks - 1;
  * a pending copy-on-write copy targets a used block.
A block gets a hash when it is full: hash(parent block's hash, its tokens), so equal hashes
mean equal whole prefixes; its tokens are kept and compared on lookup as well.

Forks (beam search): `fork` gives a new sequence every block of another (ref + 1 each, nothing
copied). A sequence about to write into a partial last block that others also hold gets a
private block instead, and the copy of that one block's K/V is queued (`take_copies`) for the
engine to run on the device before the step's forward: copy-on-write, at most one block per
sequence and step.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from anygpt_engine.config import ModelConfig

NULL_BLOCK = 0


class PagedKVCache:
    """The KV tensors: one [2, num_blocks, block_size, kv_heads, head_dim] tensor per layer."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, device, dtype):
        if block_size <= 0 or block_size & (block_size - 1):
            raise ValueError(f"block_size={block_size}, expected a power of two")
        if num_blocks < 2:
            raise ValueError(f"num_blocks={num_blocks}, expected >= 2 (block 0 is the scratch block)")
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (2, num_blocks, block_size, config.num_kv_heads, config.head_dim)
        self.layers = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """K and V of block src into block dst, every layer, for each (src, dst) pair (the
        block manager's copy-on-write queue: distinct destinations, none of them a source)."""
        if not pairs:
            return
        device = self.layers[0].device
        src = torch.tensor([s for s, _ in pairs], device=device)
        dst = torch.tensor([d for _, d in pairs], device=device)
        for layer in self.layers:
            layer.index_copy_(1, dst, layer.index_select(1, src))

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        return 2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim * dtype.itemsize


@dataclass
class _Block:
    ref: int = 0
    hash: int | None = None
    parent: int | None = None  # hash of the previous block of the prefix (None for the first)
    tokens: tuple = ()


@dataclass
class BlockTable:
    """One sequence's blocks and how many of its tokens are in the cache."""

    blocks: list[int] = field(default_factory=list)
    num_tokens: int = 0  # tokens whose K/V are (or are being) written
    num_hashed: int = 0  # leading blocks that are full and registered


class BlockManager:
    """Allocates cache blocks to sequences, shares full blocks of identical prefixes, and keeps
    freed full blocks as an LRU cache until their space is needed."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._blocks = [_Block() for _ in range(num_blocks)]
        self._free = list(range(num_blocks - 1, NULL_BLOCK, -1))  # pop() hands out low ids first
        self._lru: OrderedDict[int, None] = OrderedDict()  # cached blocks, least recently used first
        self._by_hash: dict[int, int] = {}
        self.tables: dict[object, BlockTable] = {}
        self._copies: list[tuple[int, int]] = []  # copy-on-write (src, dst) pairs not yet run
        self.hit_tokens = 0
        self.queried_tokens = 0

    # -- counts ------------------------------------------------------------------------------------
    @property
    def usable_blocks(self) -> int:
        return self.num_blocks - 1

    def num_free(self) -> int:
        return len(self._free)

    def num_cached(self) -> int:
        return len(self._lru)

    def num_used(self) -> int:
        return self.usable_blocks - len(self._free) - len(self._lru)

    def num_available(self) -> int:
        """Blocks that can be handed out now (free, or cached and evictable)."""
        return len(self._free) + len(self._lru)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- allocation ---------------------------------------------------------------------------------
    def _take(self) -> int:
        if self._free:
            block = self._free.pop()
        elif self._lru:
            block, _ = self._lru.popitem(last=False)
            meta = self._blocks[block]
            del self._by_hash[meta.hash]
            meta.hash, meta.parent, meta.tokens = None, None, ()
        else:
            raise RuntimeError("KV cache pool exhausted")  # callers check num_available first
        self._blocks[block].ref = 1
        return block

    def _release(self, block: int) -> None:
        meta = self._blocks[block]
        meta.ref -= 1
        if meta.ref == 0:
            if self._copies:  # a copy into a block nobody holds any more is moot
                self._copies = [(src, dst) for src, dst in self._copies if dst != block]
            if meta.hash is not None:
                self._lru[block] = None
            else:
                self._free.append(block)

    @staticmethod
    def _hash(parent: int | None, tokens: tuple) -> int:
        return hash((parent, tokens))

    def match_prefix(self, tokens: list[int]) -> list[int]:
        """Cached blocks holding a prefix of `tokens`, never covering the last token (its
        logits are needed, so at least one token is always computed)."""
        if not self.enable_prefix_caching:
            return []
        matched, parent = [], None
        for start in range(0, len(tokens) - 1 - self.block_size + 1, self.block_size):
            chunk = tuple(tokens[start:start + self.block_size])
            h = self._hash(parent, chunk)
            block = self._by_hash.get(h)
            if block is None or self._blocks[block].tokens != chunk or self._blocks[block].parent != parent:
                break
            matched.append(block)
            parent = h
        return matched

    def can_admit(self, tokens: list[int], num_new_tokens: int) -> bool:
        """Whether a new sequence with these tokens can take its cached prefix and room for
        `num_new_tokens` more tokens after it."""
        cached = self.match_prefix(tokens)
        revived = sum(1 for b in cached if self._blocks[b].ref == 0)  # leave the LRU when taken
        need = self.blocks_for(len(cached) * self.block_size + num_new_tokens) - len(cached)
        return need + revived <= self.num_available()

    def admit(self, seq_id, tokens: list[int]) -> int:
        """Starts a sequence's table with the cached blocks of its prefix; returns how many of
        its tokens are already in the cache."""
        if seq_id in self.tables:
            raise ValueError(f"sequence {seq_id!r} already holds blocks")
        table = self.tables[seq_id] = BlockTable()
        for block in self.match_prefix(tokens):
            meta = self._blocks[block]
            if meta.ref == 0:
                del self._lru[block]
            meta.ref += 1
            table.blocks.append(block)
        table.num_hashed = len(table.blocks)
        table.num_tokens = len(table.blocks) * self.block_size
        self.hit_tokens += table.num_tokens
        self.queried_tokens += len(tokens)
        return table.num_tokens

    def _shared_tail(self, table: BlockTable, num_new_tokens: int) -> int | None:
        """The partial last block the next token would be written into, when others hold it too."""
        if num_new_tokens and table.num_tokens % self.block_size:
            block = table.blocks[-1]
            if self._blocks[block].ref > 1:
                return block
        return None

    def blocks_needed(self, seq_ids, num_new_tokens: int) -> int:
        """Blocks the pool must hand out to grow every sequence in seq_ids by num_new_tokens,
        copies-on-write included (of k holders of a shared partial block that all grow, k - 1
        copy when nobody else holds it: the last keeps the original)."""
        need, tails = 0, {}
        for seq_id in seq_ids:
            table = self.tables[seq_id]
            need += self.blocks_for(table.num_tokens + num_new_tokens) - len(table.blocks)
            block = self._shared_tail(table, num_new_tokens)
            if block is not None:
                tails[block] = tails.get(block, 0) + 1
        for block, growing in tails.items():
            need += growing - (self._blocks[block].ref == growing)
        return need

    def can_grow(self, seq_id, num_new_tokens: int) -> bool:
        return self.blocks_needed((seq_id,), num_new_tokens) <= self.num_available()

    def grow(self, seq_id, num_new_tokens: int) -> None:
        """Makes room for `num_new_tokens` more tokens (callers check can_grow first). A shared
        partial last block is replaced by a private copy first (queued for take_copies)."""
        table = self.tables[seq_id]
        shared = self._shared_tail(table, num_new_tokens)
        if shared is not None:
            private = self._take()
            self._release(shared)
            table.blocks[-1] = private
            self._copies.append((shared, private))
        table.num_tokens += num_new_tokens
        while len(table.blocks) < self.blocks_for(table.num_tokens):
            table.blocks.append(self._take())

    def fork(self, parent_id, child_id) -> None:
        """Starts sequence child_id with all of parent_id's blocks, shared (nothing is copied)."""
        if child_id in self.tables:
            raise ValueError(f"sequence {child_id!r} already holds blocks")
        parent = self.tables[parent_id]
        for block in parent.blocks:
            self._blocks[block].ref += 1
        self.tables[child_id] = BlockTable(list(parent.blocks), parent.num_tokens, parent.num_hashed)

    def take_copies(self) -> list[tuple[int, int]]:
        """The queued copy-on-write (src, dst) block pairs, to run before the next forward."""
        copies, self._copies = self._copies, []
        return copies

    def commit(self, seq_id, tokens: list[int]) -> None:
        """Registers the hashes of blocks that `tokens` (the sequence's tokens whose K/V are now
        written) filled, so later prompts can share them."""
        if not self.enable_prefix_caching:
            return
        table = self.tables[seq_id]
        full = min(len(tokens), table.num_tokens) // self.block_size
        parent = self._blocks[table.blocks[table.num_hashed - 1]].hash if table.num_hashed else None
        for i in range(table.num_hashed, full):
            chunk = tuple(tokens[i * self.block_size:(i + 1) * self.block_size])
            h = self._hash(parent, chunk)
            block = table.blocks[i]
            meta = self._blocks[block]
            if h not in self._by_hash:
                meta.hash, meta.parent, meta.tokens = h, parent, chunk
                self._by_hash[h] = block
            # else: an identical block is already registered; this copy stays private.
            parent = h
        table.num_hashed = max(table.num_hashed, full)

    def free(self, seq_id) -> None:
        """Releases a sequence's blocks (shared ones stay with their other users)."""
        table = self.tables.pop(seq_id)
        for block in reversed(table.blocks):  # the tail goes to the LRU first, evicted first
            self._release(block)

    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0

    # -- invariants ---------------------------------------------------------------------------------
    def check(self) -> None:
        """Raises AssertionError if any invariant in the module docstring is broken."""
        refs = [0] * self.num_blocks
        for table in self.tables.values():
            assert len(table.blocks) == self.blocks_for(table.num_tokens), "table size != its token count"
            for block in table.blocks:
                assert block != NULL_BLOCK, "the scratch block was handed out"
                refs[block] += 1
        free, cached = set(self._free), set(self._lru)
        assert len(free) == len(self._free) and not (free & cached), "a block is listed twice"
        assert NULL_BLOCK not in free and NULL_BLOCK not in cached
        for block in range(1, self.num_blocks):
            meta = self._blocks[block]
            assert meta.ref == refs[block], f"block {block}: ref {meta.ref}, named by {refs[block]} tables"
            states = (block in free) + (block in cached) + (meta.ref > 0)
            assert states == 1, f"block {block} is in {states} states"
            if block in free:
                assert meta.hash is None, f"free block {block} still has a hash"
            if block in cached:
                assert meta.hash is not None and self._by_hash.get(meta.hash) == block
        for h, block in self._by_hash.items():
            assert self._blocks[block].hash == h
        for src, dst in self._copies:
            assert self._blocks[dst].ref > 0 and src != dst, f"copy-on-write {src} -> {dst} targets a free block"
        if not self.tables:
            assert len(free) + len(cached) == self.usable_blocks, "blocks leaked"
