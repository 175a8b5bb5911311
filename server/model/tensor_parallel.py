"""Tensor parallelism over the GPUs of one host: the process group, each rank's shard of the
model (`ShardPlan`), reading that shard from safetensors, and the one collective the forward needs.

Megatron's split of the Llama family over N ranks, rank r of N:

- column-parallel, q/k/v and gate/up: rank r holds the output rows of its own attention heads
  (of q, and of k and v) and of its own slice of the intermediate channels, slice by slice of
  our fused projections, so its fused qkv_proj is [its q heads | its k heads | its v heads] and
  attention runs over its heads alone, with a KV cache of its KV heads (sharded by head).
  Biases are sharded with the rows. No communication.
- row-parallel, o and down: rank r holds the input columns matching those heads / channels, so
  its `x W^T` is a partial sum: one all-reduce of the (T, hidden) output each, then the bias
  (whole on every rank), added once after the sum.
- KV heads: with num_kv_heads >= N each rank holds num_kv_heads / N of them; with fewer (GQA,
  e.g. one KV head on two ranks) each rank holds the one KV head its query heads read, so that
  head is replicated on N / num_kv_heads ranks.
- In this first increment the embedding, the final norm and the LM head are replicated: every
  rank holds the whole vocabulary and computes the same full logits (no all-gather at the end).
  A vocabulary-parallel embedding and head are a later step.

LoRA follows S-LoRA / Punica. Column-parallel: A whole (it reads the whole input), B sharded by
output rows exactly as the base weight's slice. Row-parallel: A sharded by input columns as the
base weight, so the shrink `x A^T` is a partial sum too. S-LoRA all-reduces that (tokens x rank)
result before the expand; we expand each rank's partial shrink with B whole into the rank's
partial base output instead, so the projection's one all-reduce sums both (the expand is linear):
LoRA adds no collective to a step (server/model/llama.py, Projection). DoRA factors are sharded
with the output rows of column-parallel projections; for row-parallel ones each rank holds every
row but only some columns, so the squared row norms are all-reduced when an adapter is loaded
(server/lora/dora.py). Each rank's shard of an adapter: server/lora/sharding.py.

Quantized weights: with --quantize each rank quantizes its own shard as it loads (NF4's blocks
and FP8's scales are then those of the shard: a row-parallel module's per-channel FP8 scale
covers the rank's columns only). Checkpoints saved quantized (bitsandbytes NF4, FP8) are not
split yet: the loader refuses them under tensor parallelism.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass, replace
from datetime import timedelta

import torch
import torch.distributed as dist

from server.model.config import ModelConfig

# HF module short names by how they are split
COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_PARALLEL = ("o_proj", "down_proj")
_PROJECTION_KEY = re.compile(r"model\.layers\.\d+\.(?:self_attn|mlp)\.(\w+_proj)\.(weight|bias)")


class TensorParallelError(ValueError):
    """The model cannot be split over this many ranks."""


@dataclass(frozen=True)
class ShardPlan:
    """Which rows (column-parallel) and columns (row-parallel) of each projection rank `rank` holds."""

    config: ModelConfig  # the whole model
    rank: int
    world_size: int

    def __post_init__(self):
        c, n = self.config, self.world_size
        if not 0 <= self.rank < n:
            raise TensorParallelError(f"rank {self.rank} is outside a group of {n}")
        if c.num_heads % n:
            raise TensorParallelError(f"{c.num_heads} attention heads do not divide over {n} ranks")
        if (c.num_kv_heads % n) if c.num_kv_heads >= n else (n % c.num_kv_heads):
            raise TensorParallelError(f"{c.num_kv_heads} KV heads neither divide over {n} ranks nor divide {n} "
                                      "(for replication)")
        if c.intermediate_size % n:
            raise TensorParallelError(f"intermediate size {c.intermediate_size} does not divide over {n} ranks")

    def _share(self, total: int) -> range:
        """This rank's equal share of `total` (heads or channels; the plan checked it divides)."""
        per_rank = total // self.world_size
        return range(self.rank * per_rank, (self.rank + 1) * per_rank)

    @property
    def q_heads(self) -> range:
        return self._share(self.config.num_heads)

    @property
    def kv_heads(self) -> range:
        """The KV heads this rank's query heads read (one, replicated, when there are fewer than ranks)."""
        kv, n = self.config.num_kv_heads, self.world_size
        if kv < n:
            head = self.rank * kv // n
            return range(head, head + 1)
        return range(self.rank * kv // n, (self.rank + 1) * kv // n)

    @property
    def intermediate(self) -> range:
        return self._share(self.config.intermediate_size)

    @property
    def local_config(self) -> ModelConfig:
        """The shapes this rank holds: its heads and intermediate channels (head_dim unchanged)."""
        return replace(self.config, num_heads=len(self.q_heads), num_kv_heads=len(self.kv_heads),
                       intermediate_size=len(self.intermediate))

    def rows(self, module: str) -> slice | None:
        """Output rows of a column-parallel module (HF short name) this rank holds; None otherwise."""
        hd = self.config.head_dim
        if module == "q_proj":
            return slice(self.q_heads.start * hd, self.q_heads.stop * hd)
        if module in ("k_proj", "v_proj"):
            return slice(self.kv_heads.start * hd, self.kv_heads.stop * hd)
        if module in ("gate_proj", "up_proj"):
            return slice(self.intermediate.start, self.intermediate.stop)
        return None

    def cols(self, module: str) -> slice | None:
        """Input columns of a row-parallel module this rank holds; None otherwise."""
        if module == "o_proj":
            return self.rows("q_proj")
        if module == "down_proj":
            return self.rows("gate_proj")
        return None

    def read(self, f, key: str) -> torch.Tensor:
        """This rank's part of checkpoint tensor `key` from an open `safe_open` file: only those
        rows / columns are read, never the whole projection; anything else whole (replicated)."""
        m = _PROJECTION_KEY.fullmatch(key)
        if m is None:
            return f.get_tensor(key)
        module, kind = m.groups()
        rows, cols = self.rows(module), self.cols(module)
        if rows is not None:
            return f.get_slice(key)[rows]
        if cols is not None and kind == "weight":
            return f.get_slice(key)[:, cols]
        return f.get_tensor(key)  # a row-parallel bias: whole, added once after the all-reduce


# A worker waits in its command group's broadcast for as long as the server is idle: no timeout
# there (a rank 0 that dies is seen by the workers' parent watch, server/engine/tp_group.py).
COMMAND_TIMEOUT = timedelta(days=365)


@dataclass(frozen=True)
class TensorParallel:
    """This process's place in the group (torch.distributed, already initialised)."""

    rank: int
    world_size: int
    group: object = None  # a torch.distributed ProcessGroup for the forward's tensors; None = the default group
    # gloo group of the same ranks for rank 0's commands and the ranks' agreements (host objects:
    # they never touch a device, so under NCCL they do not queue behind a step); None = `group`
    commands: object = None

    def plan(self, config: ModelConfig) -> ShardPlan:
        return ShardPlan(config, self.rank, self.world_size)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the group, in place (it must be contiguous)."""
        dist.all_reduce(tensor, group=self.group)
        return tensor

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's `tensor` into every rank's (same shape and dtype), in place, on the forward's group."""
        dist.broadcast(tensor, src=0, group=self.group)
        return tensor

    def smallest(self, value: int) -> int:
        """The smallest of every rank's `value` (sizes the ranks must agree on: KV blocks, pool slots)."""
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.commands)
        return int(t.item())


def init_tensor_parallel(rank: int, world_size: int, init_method: str, backend: str | None = None,
                         timeout: timedelta | None = None, device_index: int | None = None) -> TensorParallel:
    """Join the group: NCCL when CUDA is there (one GPU per rank: `device_index`, by default the
    rank), else gloo; and the gloo command group beside it. `timeout`: how long a collective of
    the forward may wait for the other ranks before it fails."""
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(rank if device_index is None else device_index)
    kwargs = {} if timeout is None else {"timeout": timeout}
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size, **kwargs)
    commands = dist.new_group(backend="gloo", timeout=COMMAND_TIMEOUT)
    return TensorParallel(rank, world_size, commands=commands)


def free_tcp_address(host: str = "127.0.0.1") -> str:
    """A tcp:// init address on a port free now (for a group started on this host)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return f"tcp://{host}:{s.getsockname()[1]}"
