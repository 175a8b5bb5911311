"""Disk -> host: a stored adapter read straight into its packed buffer (server/lora/adapter.py).

The adapter cache's loader threads call `read_stored_adapter`. The safetensors header is
parsed and checked here as strictly as safetensors checks it (known dtypes, sizes that match
the shapes, data offsets that tile the data section exactly), then against the base model
with the same rules as at upload (`peft.check_adapter_tensors`). The data is then read with
`os.preadv` straight to where the packed layout wants it: A blocks of the serving dtype land in
the final buffer (page-locked when the pool is on CUDA); B blocks, and anything of another
dtype, land in a scratch buffer kept per loader thread, from which one batched copy per run of
same-shaped modules transposes (B is kept rank-major) or casts them into place. One read of
the file, one pass over B: about the cost of reading the file.

The values are not checked again (finite, etc.): they were checked at upload, and the store
hands out only files whose sha256 is the upload's (hashed on the first load after start-up
and after any change on disk; see store.py). Everything that depends on the serving side
(the base model's shapes, max_rank) is checked at every load.
"""

from __future__ import annotations

import json
import math
import os
import threading
from dataclasses import dataclass

import torch

from server.lora.adapter import LoRAAdapter, LoRAModuleWeights, RowGroup, layout_views, packed_layout
from server.lora.peft import (
    AdapterValidationError,
    ModuleSpec,
    adapter_from_config,
    check_adapter_tensors,
    parse_adapter_config,
)
from server.lora.store import AdapterRecord, AdapterStore
from server.model.config import ModelConfig

# safetensors' dtype names; the float ones can be served, the others are refused by the checks
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U64": torch.uint64,
    "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E5M2": torch.float8_e5m2, "F8_E4M3": torch.float8_e4m3fn,
}
_MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit
_IOV_MAX = 1024  # Linux's; preadv takes at most this many buffers per call


@dataclass(frozen=True)
class _Entry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # byte offsets in the data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass
class _Run:
    """Consecutive members of a row group read into scratch, copied into place by one batched copy."""

    group: RowGroup
    offset: int  # element offset of the first member's rows in the packed buffer
    rank: int
    dtype: torch.dtype  # in the file
    shape: tuple[int, ...]  # one member's tensor in the file: (rank, in) for A, (out, rank) for B
    scratch_start: int  # byte offset of the first member in scratch
    count: int = 1

    @property
    def end(self) -> int:
        return self.offset + self.count * self.rank * self.group.width


class _Scratch(threading.local):
    """A loader thread's scratch bytes, grown as needed and reused by its next loads."""

    buffer: torch.Tensor | None = None

    def get(self, nbytes: int) -> torch.Tensor:
        if self.buffer is None or self.buffer.numel() < nbytes:
            self.buffer = torch.empty(nbytes, dtype=torch.uint8)
        return self.buffer[:nbytes]


_scratch = _Scratch()


def read_stored_adapter(store: AdapterStore, record: AdapterRecord, model: ModelConfig, *, max_rank: int,
                        dtype: torch.dtype, pin_memory: bool = False) -> LoRAAdapter:
    """The stored adapter, checked against `model` and `max_rank`, packed in `dtype` (page-locked
    with `pin_memory`). Raises AdapterStoreCorrupt (files) or AdapterValidationError (content)."""
    with store.open_verified(record) as files:
        cfg = parse_adapter_config(files.config)
        data_start, entries = read_safetensors_header(files.weights_fd, files.weights_size)
        specs = check_adapter_tensors(cfg, {k: (e.dtype, e.shape) for k, e in entries.items()}, model,
                                      max_rank=max_rank)
        layout = packed_layout({(s.layer, s.module): (s.rank, entries[s.a_key].shape[1], entries[s.b_key].shape[0])
                                for s in specs})
        buffer = torch.empty(sum(g.numel for g in layout), dtype=dtype, pin_memory=pin_memory)
        # DoRA magnitudes: read as they are into tensors of their own, beside the packed buffer
        raw = {s.m_key: torch.empty(entries[s.m_key].nbytes, dtype=torch.uint8) for s in specs if s.m_key}
        _read_packed(files.weights_fd, data_start, entries, specs, layout, buffer,
                     {name: memoryview(t.numpy()) for name, t in raw.items()})
    views = layout_views(buffer, layout)
    magnitudes = {name: t.view(entries[name].dtype).float() for name, t in raw.items()}
    modules = {(s.layer, s.module): LoRAModuleWeights(*views[(s.layer, s.module)], s.scale, magnitudes.get(s.m_key))
               for s in specs}
    return adapter_from_config(cfg, modules, buffer=buffer, layout=layout)


def read_safetensors_header(fd: int, size: int) -> tuple[int, dict[str, _Entry]]:
    """(offset of the data section, tensor name -> entry), checked as safetensors checks it."""
    if size < 8:
        raise _invalid("shorter than its 8-byte header length")
    header_len = int.from_bytes(os.pread(fd, 8, 0), "little")
    if header_len > min(size - 8, _MAX_HEADER_BYTES):
        raise _invalid(f"header length {header_len} exceeds the file")
    try:
        header = json.loads(os.pread(fd, header_len, 8))
    except (ValueError, RecursionError) as e:
        raise _invalid(f"header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise _invalid("header is not a JSON object")
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = tuple(info["shape"])
            begin, end = info["data_offsets"]
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (*shape, begin, end)):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise _invalid(f"bad header entry for {name!r}") from None
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise _invalid(f"{name!r}: {end - begin} bytes for shape {list(shape)} of {info['dtype']}")
        entries[name] = _Entry(dtype, shape, begin, end)
    position = 0
    for entry in sorted(entries.values(), key=lambda e: (e.begin, e.end)):
        if entry.begin != position:
            raise _invalid("tensor data overlaps or leaves gaps")
        position = entry.end
    if position != size - 8 - header_len:
        raise _invalid(f"tensor data covers {position} bytes of a {size - 8 - header_len}-byte data section")
    return 8 + header_len, entries


def _invalid(problem: str) -> AdapterValidationError:
    return AdapterValidationError(f"adapter_model is not a valid safetensors file: {problem}", "adapter_model")


def _read_packed(fd: int, data_start: int, entries: dict[str, _Entry], specs: list[ModuleSpec],
                 layout: tuple[RowGroup, ...], buffer: torch.Tensor, extra: dict[str, memoryview]) -> None:
    """Fill `buffer` (packed as `layout`) from the file: one preadv, then one copy per run;
    tensors outside the layout (DoRA magnitudes) go as they are to their `extra` bytes."""
    names = {(s.layer, s.module): {"a": s.a_key, "b": s.b_key} for s in specs}
    final = memoryview(buffer.view(torch.uint8).numpy())
    itemsize = buffer.element_size()
    destinations: dict[str, memoryview | tuple[int, int]] = dict(extra)  # name -> final bytes, or (scratch start, length)
    runs: list[_Run] = []
    scratch_bytes = 0
    for group in layout:
        offset = group.offset
        for layer, module, rank in group.members:
            name = names[(layer, module)][group.kind]
            entry = entries[name]
            if group.kind == "a" and entry.dtype == buffer.dtype:
                destinations[name] = final[offset * itemsize : offset * itemsize + entry.nbytes]
            else:
                last = runs[-1] if runs else None
                if last and last.group is group and (last.rank, last.dtype, last.end) == (rank, entry.dtype, offset):
                    last.count += 1
                else:
                    scratch_bytes = -(-scratch_bytes // 16) * 16  # each run aligned for its dtype
                    runs.append(_Run(group, offset, rank, entry.dtype, entry.shape, scratch_bytes))
                destinations[name] = (scratch_bytes, entry.nbytes)
                scratch_bytes += entry.nbytes
            offset += rank * group.width
    scratch = _scratch.get(scratch_bytes)
    in_scratch = memoryview(scratch.numpy())
    views = []
    for name, _ in sorted(entries.items(), key=lambda item: item[1].begin):  # file order
        target = destinations[name]
        views.append(in_scratch[target[0] : target[0] + target[1]] if isinstance(target, tuple) else target)
    _preadv_fully(fd, views, data_start)
    for run in runs:
        nbytes = run.count * math.prod(run.shape) * run.dtype.itemsize
        source = scratch[run.scratch_start : run.scratch_start + nbytes].view(run.dtype).view(run.count, *run.shape)
        if run.group.kind == "b":
            source = source.transpose(1, 2)  # (count, out, r) -> (count, r, out): rank-major
        buffer[run.offset : run.end].view(run.count, run.rank, run.group.width).copy_(source)


def _preadv_fully(fd: int, views: list[memoryview], offset: int) -> None:
    """Read consecutive file bytes from `offset` into `views`, in order, however the kernel splits it."""
    views, first = [v for v in views if len(v)], 0
    while first < len(views):
        n = os.preadv(fd, views[first : first + _IOV_MAX], offset)
        if n == 0:
            raise _invalid("truncated")
        offset += n
        while first < len(views) and n >= len(views[first]):
            n -= len(views[first])
            first += 1
        if n:
            views[first] = views[first][n:]
