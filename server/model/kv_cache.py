"""Paged KV cache storage: fixed-size blocks of token slots, shared by all sequences.

Which blocks belong to which sequence is the engine's business (block tables); the model
only writes new keys/values into the flat slots it is given and reads through block tables.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's (k, v) storage, (num_blocks, block_size, num_kv_heads, head_dim) each."""
        return self.k[layer], self.v[layer]
