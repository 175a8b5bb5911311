"""Triton paged attention and its PyTorch reference against a dense fp64 oracle, on fresh random inputs.

On a machine without CUDA the kernel runs under Triton's CPU interpreter (TRITON_INTERPRET=1, set
here before the kernel is defined when nobody set it); shapes stay small (a few sequences, head_dim
16/32/64, pages of 4 or 16 keys). The oracle below shares no code with either implementation: per
sequence, it reads every key by its position through the block table and masks by positions.

Every batch is built to make mistakes show: physical pages shuffled, pages no sequence owns full of
values ~1e3 (a stray read swamps the softmax), stale block-table entries pointing at those pages,
NaN in the unused rows of each sequence's last page, q a strided view of a fused qkv tensor, out
poisoned with NaN (every covered row must be written, rows of no sequence must stay NaN).
tests/test_paged_attention_gpu.py runs Llama sizes on the H200.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the kernel's definition
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("no CUDA and TRITON_INTERPRET is set to something other than 1", allow_module_level=True)
pytest.importorskip("triton", reason="triton is not installed")

import kernels.triton_attention as triton_attention  # noqa: E402
from kernels.attention_reference import paged_attention_reference  # noqa: E402
from kernels.triton_attention import paged_attention  # noqa: E402

DEVICE = "cpu" if INTERPRET else "cuda"
TOLERANCES = {torch.float32: (1e-4, 1e-4), torch.float16: (5e-3, 5e-3), torch.bfloat16: (2e-2, 2e-2)}  # (rtol, atol)
POISON_SCALE = 1e3  # values in pages no sequence owns

# (context_len, query_len): decodes at context 1, on a page boundary and past it, a whole-prompt
# prefill, chunked prefills (one ending on a page boundary), padding sequences with no tokens
MIXED = [(1, 1), (16, 1), (17, 1), (20, 20), (45, 13), (0, 0), (32, 16), (7, 0), (64, 1)]


@dataclass
class Batch:
    q: torch.Tensor  # (T, heads, head_dim), a strided view
    k_cache: torch.Tensor  # (num_blocks, block_size, kv_heads, head_dim)
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # (B, max_blocks) int32
    query_starts: torch.Tensor  # (B+1,) int32
    context_lens: torch.Tensor  # (B,) int32
    max_query_len: int

    def args(self):
        return (self.q, self.k_cache, self.v_cache, self.block_tables, self.query_starts, self.context_lens,
                self.max_query_len)


def make_batch(specs, num_heads, num_kv_heads, head_dim, block_size, dtype, gen, *, lead_rows=0, trail_rows=2,
               max_query_len=None) -> Batch:
    """specs: (context_len, query_len) per sequence; rows before and after the sequences' belong to none."""
    pages_of = [-(-ctx // block_size) for ctx, _ in specs]
    num_blocks = sum(pages_of) + 3  # three spare pages that no sequence owns
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen) * POISON_SCALE
    v_cache = torch.randn(shape, generator=gen) * POISON_SCALE
    physical = torch.randperm(num_blocks, generator=gen).tolist()
    spare = physical[sum(pages_of):]
    max_blocks = max(pages_of) + 2
    block_tables = torch.tensor(spare, dtype=torch.int32)[torch.randint(3, (len(specs), max_blocks), generator=gen)]
    for i, (ctx, _) in enumerate(specs):
        pages = [physical.pop(0) for _ in range(pages_of[i])]
        block_tables[i, : len(pages)] = torch.tensor(pages, dtype=torch.int32)
        for cache in (k_cache, v_cache):
            rows = cache[pages].flatten(0, 1)  # (pages * block_size, kv_heads, head_dim), a copy
            rows[:ctx] = torch.randn(ctx, num_kv_heads, head_dim, generator=gen)
            rows[ctx:] = float("nan")  # stale rows of the last page
            cache[pages] = rows.view(len(pages), block_size, num_kv_heads, head_dim)
    q_lens = [n for _, n in specs]
    starts = torch.tensor([0] + q_lens).cumsum(0) + lead_rows
    num_tokens = lead_rows + sum(q_lens) + trail_rows
    qkv = 2 * torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=gen)
    q = qkv.to(dtype).to(DEVICE)[:, : num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    context_lens = torch.tensor([c for c, _ in specs], dtype=torch.int32, device=DEVICE)
    return Batch(q, k_cache.to(dtype).to(DEVICE), v_cache.to(dtype).to(DEVICE), block_tables.to(DEVICE),
                 starts.to(torch.int32).to(DEVICE), context_lens, max_query_len or max(max(q_lens), 1))


def dense_attention(b: Batch, scale: float, window: int | None) -> dict[int, torch.Tensor]:
    """fp64 oracle: {row of q: (heads, head_dim)} for every row that belongs to a sequence."""
    block_size, num_kv_heads = b.k_cache.shape[1:3]
    group = b.q.shape[1] // num_kv_heads
    starts, lens = b.query_starts.tolist(), b.context_lens.tolist()
    rows = {}
    for i, ctx in enumerate(lens):
        n = starts[i + 1] - starts[i]
        if n == 0:
            continue
        k_pos = torch.arange(ctx)
        pages = b.block_tables[i].cpu().long()[k_pos // block_size]
        # (ctx, heads, head_dim): key p read where the table says; head h reads kv head h // group
        k = b.k_cache.cpu()[pages, k_pos % block_size].double().repeat_interleave(group, dim=1)
        v = b.v_cache.cpu()[pages, k_pos % block_size].double().repeat_interleave(group, dim=1)
        q_pos = torch.arange(ctx - n, ctx)  # the sequence's last n positions
        seen = k_pos[None, :] <= q_pos[:, None]  # (n, ctx)
        if window is not None:
            seen &= k_pos[None, :] > q_pos[:, None] - window
        q = b.q[starts[i] : starts[i + 1]].cpu().double()  # (n, heads, head_dim)
        scores = torch.einsum("qhd,khd->qhk", q, k) * scale
        probs = scores.masked_fill(~seen[:, None, :], float("-inf")).softmax(-1)
        for j, o in enumerate(torch.einsum("qhk,khd->qhd", probs, v)):
            rows[starts[i] + j] = o
    return rows


def check(b: Batch, window: int | None = None, scale: float | None = None, prefill_slots: int | None = None) -> None:
    """Both implementations against the oracle; rows of no sequence must come back NaN. With
    `prefill_slots`, the Triton kernel is given the list of sequences of several query tokens,
    -1 padded to that many entries (as a CUDA graph's step buffers hold it)."""
    scale = scale if scale is not None else b.q.shape[2] ** -0.5
    expected = dense_attention(b, scale, window)
    covered = torch.zeros(b.q.shape[0], dtype=torch.bool)
    covered[list(expected)] = True
    want = torch.stack([expected[row] for row in sorted(expected)])  # (covered rows, heads, head_dim)
    rtol, atol = TOLERANCES[b.q.dtype]
    extra = {}
    if prefill_slots is not None:
        lengths = (b.query_starts[1:] - b.query_starts[:-1]).cpu()
        listed = torch.nonzero(lengths > 1).flatten().tolist()
        assert len(listed) <= prefill_slots
        extra["prefill_seqs"] = torch.tensor(listed + [-1] * (prefill_slots - len(listed)), dtype=torch.int32,
                                             device=DEVICE)
    for name, fn in (("triton", paged_attention), ("reference", paged_attention_reference)):
        out = torch.full(b.q.shape, float("nan"), dtype=b.q.dtype, device=DEVICE)
        result = fn(*b.args(), scale, window, out, **(extra if name == "triton" else {}))
        assert result is out, name
        out = out.cpu()
        assert bool(out[~covered].isnan().all()), f"{name}: a row of no sequence was written"
        torch.testing.assert_close(out[covered].double(), want, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def seeded(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(parts).encode()))


# (group, head_dim, block_size, dtype, window): every group meets both dtypes, head dims and page sizes
MIXED_CASES = [
    (1, 64, 16, torch.float32, None),
    (1, 16, 4, torch.bfloat16, 7),
    (3, 64, 4, torch.bfloat16, None),
    (3, 16, 16, torch.float32, 7),
    (4, 16, 16, torch.bfloat16, None),
    (4, 64, 4, torch.float32, None),
    (4, 32, 16, torch.float16, 5),
]


@pytest.mark.parametrize("launches", ["two, prefill list", "two", "one"])
@pytest.mark.parametrize("group,head_dim,block_size,dtype,window", MIXED_CASES)
def test_mixed_prefill_and_decode(group, head_dim, block_size, dtype, window, launches, monkeypatch):
    """Decodes, a whole prompt, chunked prefills and padding sequences; leading and trailing rows
    of no sequence; max_query_len an upper bound, not the exact maximum. In one launch, and in
    two (decode tiles for the one-token sequences, prefill tiles for the others), the prefill
    launch over every sequence or over a padded list of the prompts."""
    monkeypatch.setattr(triton_attention, "MIXED_TWO_LAUNCHES", launches != "one")
    gen = seeded("mixed", group, head_dim, block_size, dtype, window)
    b = make_batch(MIXED, 2 * group, 2, head_dim, block_size, dtype, gen, lead_rows=1, max_query_len=23)
    check(b, window, prefill_slots=6 if launches == "two, prefill list" else None)


@pytest.mark.parametrize("split", [True, False])
@pytest.mark.parametrize("group,dtype", [(1, torch.float32), (3, torch.bfloat16), (4, torch.float32)])
def test_decode_batch(group, dtype, split, monkeypatch):
    """max_query_len == 1, ragged contexts around page and key-tile edges, padded like a CUDA-graph
    batch (sequences with no tokens at the end); with and without split-KV."""
    monkeypatch.setattr(triton_attention, "SPLIT_KV", split)
    gen = seeded("decode", group, dtype, split)
    specs = [(1, 1), (4, 1), (16, 1), (33, 1), (64, 1), (65, 1), (129, 1), (0, 0), (0, 0)]
    b = make_batch(specs, 2 * group, 2, 32, 4, dtype, gen, trail_rows=2)
    assert b.max_query_len == 1
    check(b)


@pytest.mark.parametrize("window", [1, 4, 16, 100])
def test_sliding_window(window, monkeypatch):
    """Windows narrower than a page, than a key tile, and wider than every context."""
    gen = seeded("window", window)
    specs = [(90, 1), (70, 30), (33, 33), (5, 1)]
    check(make_batch(specs, 6, 2, 16, 4, torch.float32, gen), window)
    decode = [(90, 1), (17, 1), (1, 1)]  # split-KV spans start past the window
    monkeypatch.setattr(triton_attention, "SPLIT_KV", True)
    check(make_batch(decode, 6, 2, 16, 4, torch.float32, gen), window)


@pytest.mark.parametrize("group,dtype", [(1, torch.bfloat16), (3, torch.float32), (4, torch.bfloat16)])
def test_prefill_over_several_query_tiles(group, dtype):
    """Prompts longer than a query tile: causal tiles skip the keys past their last query."""
    gen = seeded("tiles", group, dtype)
    specs = [(150, 150), (160, 75), (5, 1)]
    check(make_batch(specs, group, 1, 16, 16, dtype, gen))


def test_long_context_many_pages(monkeypatch):
    """300 keys in pages of 4: a decode (split 16 ways) and a chunk, many key tiles each."""
    monkeypatch.setattr(triton_attention, "SPLIT_KV", True)
    gen = seeded("long")
    check(make_batch([(300, 1)], 4, 1, 32, 4, torch.float32, gen))
    check(make_batch([(300, 40), (299, 1)], 4, 1, 32, 4, torch.float32, gen))


def test_contiguous_q_and_other_scale():
    gen = seeded("contiguous")
    b = make_batch(MIXED, 3, 1, 64, 16, torch.float32, gen)
    b.q = b.q.contiguous()
    check(b, scale=0.05)


def test_nothing_to_do_leaves_out_alone():
    gen = seeded("empty")
    b = make_batch([(0, 0), (5, 0)], 4, 2, 16, 4, torch.float32, gen)
    for fn in (paged_attention, paged_attention_reference):
        out = torch.full(b.q.shape, float("nan"), device=DEVICE)
        fn(*b.args()[:-1], 0, 0.25, None, out)
        assert bool(out.isnan().all())


def test_bad_arguments_are_refused():
    gen = seeded("bad")
    b = make_batch([(8, 2)], 4, 2, 16, 4, torch.float32, gen)
    q, k, v, tables, starts, lens, max_q = b.args()
    bad = {
        "heads": (q[:, :3], k, v, tables, starts, lens, max_q),
        "dtype": (q.to(torch.bfloat16), k, v, tables, starts, lens, max_q),
        "int64": (q, k, v, tables.long(), starts, lens, max_q),
        "starts": (q, k, v, tables, starts[:-1], lens, max_q),
    }
    for name, args in bad.items():
        for fn in (paged_attention, paged_attention_reference):
            with pytest.raises(ValueError):
                fn(*args, 0.25)
    with pytest.raises(ValueError):
        paged_attention(*b.args(), 0.25, None, torch.empty(1, 4, 16))
    with pytest.raises(ValueError, match="query tokens"):  # the reference checks the host bound
        paged_attention_reference(q, k, v, tables, starts, lens, 1, 0.25)
