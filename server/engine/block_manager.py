"""KV cache block bookkeeping: which blocks are free, which sequences hold each, and which hold
a known prefix (prefix caching). Plain Python, no torch.

Prefix caching (on unless made with `prefix_caching=False`): a block whose `block_size` tokens
all have their keys and values computed is content-addressed by `block_hash` — sha256 over the
previous block's hash, the cache namespace and the block's token ids — so a block stands for
its whole prefix, never for its tokens alone. The namespace is the identity of the weights
that computed the keys and values: the adapter's (customer id and version in the server), or
None for the base model. Another namespace never finds a block, so a tenant never reads KV that
another tenant's adapter (or a replaced version of its own) computed.

Blocks are reference-counted: a sequence that finds its prefix cached holds those blocks
with their other users (`take`) and computes only what follows. A block whose last holder
frees it stays findable, in an LRU of unreferenced cached blocks; an allocation uses blocks
that hold no known prefix first, then evicts the least recently freed cached block (its hash
forgotten). A sequence frees its blocks tail first, so the ends of long prompts are evicted
before their shared beginnings. A sequence never writes into a cached block: it shares only
full blocks and writes after them.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from typing import Hashable, Sequence


def block_hash(parent: bytes | None, namespace: Hashable, token_ids: Sequence[int]) -> bytes:
    """The key of a full block: its tokens, after the prefix `parent` stands for, under `namespace`
    (repr() of plain data: str, int, tuples of them). A cryptographic hash, as vLLM's: a crafted
    collision would let one tenant read another's cached keys and values."""
    h = hashlib.sha256(parent or b"\x00root")
    name = repr(namespace).encode()
    h.update(len(name).to_bytes(4, "little"))
    h.update(name)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self._free = list(range(num_blocks - 1, -1, -1))  # free blocks holding no known prefix (a stack)
        self._free_cached: OrderedDict[int, None] = OrderedDict()  # free cached blocks, least recently freed first
        self._refs = [0] * num_blocks
        self._hash_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}
        # prefix cache counters, in tokens: looked up at admission, and found
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0

    @property
    def num_free(self) -> int:
        """Blocks an allocation can take: free ones and unreferenced cached ones."""
        return len(self._free) + len(self._free_cached)

    @property
    def num_cached(self) -> int:
        return len(self._block_of)

    @property
    def usage_ratio(self) -> float:
        return 1 - self.num_free / self.num_blocks

    def blocks_needed(self, num_tokens: int, held: int = 0) -> int:
        return max(0, -(-num_tokens // self.block_size) - held)

    def can_allocate(self, count: int) -> bool:
        return count <= self.num_free

    def allocate(self, count: int) -> list[int]:
        if count > self.num_free:
            raise RuntimeError(f"asked for {count} KV blocks, {self.num_free} free")
        blocks = []
        for _ in range(count):
            if self._free:
                block = self._free.pop()
            else:  # evict the least recently freed cached block
                block, _ = self._free_cached.popitem(last=False)
                del self._block_of[self._hash_of.pop(block)]
            self._refs[block] = 1
            blocks.append(block)
        return blocks

    def free(self, blocks: list[int]) -> None:
        for block in reversed(blocks):  # the tail first: evicted before the prefix it extends
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._hash_of:
                    self._free_cached[block] = None
                else:
                    self._free.append(block)

    # -- prefix caching ---------------------------------------------------------------------

    def match_prefix(self, hashes: Sequence[bytes]) -> list[int]:
        """The blocks holding the longest cached prefix of a sequence whose full blocks have these hashes."""
        blocks = []
        for h in hashes:
            block = self._block_of.get(h)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def num_unreferenced(self, blocks: list[int]) -> int:
        """How many of these cached blocks `take` would remove from the free ones."""
        return sum(self._refs[b] == 0 for b in blocks)

    def take(self, blocks: list[int]) -> list[int]:
        """Hold cached blocks (found by match_prefix) for one more sequence."""
        for block in blocks:
            if self._refs[block] == 0:
                del self._free_cached[block]
            self._refs[block] += 1
        return list(blocks)

    def cache(self, block: int, h: bytes) -> None:
        """A block held by a sequence is full and computed: findable by its hash from now on
        (unless another block already holds that prefix; this one then stays unshared)."""
        if self.prefix_caching and h not in self._block_of and block not in self._hash_of:
            self._block_of[h] = block
            self._hash_of[block] = h

    def count_lookup(self, queried_tokens: int, hit_tokens: int) -> None:
        self.num_queried_tokens += queried_tokens
        self.num_hit_tokens += hit_tokens
