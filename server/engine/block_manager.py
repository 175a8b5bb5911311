"""KV cache block bookkeeping: which blocks are free, which a sequence holds. Plain Python."""

from __future__ import annotations


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage_ratio(self) -> float:
        return 1 - len(self._free) / self.num_blocks

    def blocks_needed(self, num_tokens: int, held: int = 0) -> int:
        return max(0, -(-num_tokens // self.block_size) - held)

    def can_allocate(self, count: int) -> bool:
        return count <= len(self._free)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise RuntimeError(f"asked for {count} KV blocks, {len(self._free)} free")
        return [self._free.pop() for _ in range(count)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))
