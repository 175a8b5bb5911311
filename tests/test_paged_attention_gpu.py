"""Paged attention at Llama sizes on a CUDA device, and CUDA-graph capture and replay.

Run on the H200 with `PYTHONPATH=. python3 -m pytest -m gpu tests/test_paged_attention_gpu.py`;
skipped where there is no CUDA device. Head shapes are Llama-2-7B's (32 heads, 32 kv heads, 128)
and Llama-3-8B's (32 / 8 / 128), pages of 16 keys. The kernel runs in bf16 (a few cases in fp16
and fp32) against the PyTorch reference run in fp32 on the same values. Batches are built as in
tests/test_paged_attention.py: shuffled pages, pages no sequence owns full of values ~1e3 with
stale block-table entries pointing at them, NaN in the unused rows of each sequence's last page,
q a strided view of a fused qkv tensor, out poisoned with NaN. Imports only torch, pytest,
triton and kernels (the device machine has no server dependencies).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device (runs on the H200 through the device tool)", allow_module_level=True)

import kernels.triton_attention as triton_attention  # noqa: E402
from kernels.attention_reference import paged_attention_reference  # noqa: E402
from kernels.triton_attention import _paged_attention_kernel, paged_attention  # noqa: E402
from tests.kernel_checks import capture_graph  # noqa: E402

if type(_paged_attention_kernel).__name__ == "InterpretedFunction":
    pytest.skip("TRITON_INTERPRET=1 is set: the kernels were built for the CPU interpreter", allow_module_level=True)

SHAPES = {"llama2-7b": (32, 32, 128), "llama3-8b": (32, 8, 128)}  # (heads, kv_heads, head_dim)
PAGE = 16
TOLERANCES = {torch.bfloat16: (2e-2, 2e-2), torch.float16: (5e-3, 5e-3), torch.float32: (2e-4, 2e-4)}  # (rtol, atol)
POISON_SCALE = 1e3
SPARE_PAGES = 8


class Batch:
    """Static device buffers for up to `max_seqs` sequences, refilled in place by `fill`."""

    def __init__(self, shape, dtype, *, max_seqs, max_blocks, num_blocks, num_tokens):
        heads, kv_heads, head_dim = shape
        self.qkv = torch.empty(num_tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, device="cuda")
        self.q = self.qkv[:, : heads * head_dim].view(num_tokens, heads, head_dim)  # strided, as from a fused qkv
        self.k_cache = torch.empty(num_blocks, PAGE, kv_heads, head_dim, dtype=dtype, device="cuda")
        self.v_cache = torch.empty_like(self.k_cache)
        self.block_tables = torch.empty(max_seqs, max_blocks, dtype=torch.int32, device="cuda")
        self.query_starts = torch.empty(max_seqs + 1, dtype=torch.int32, device="cuda")
        self.context_lens = torch.empty(max_seqs, dtype=torch.int32, device="cuda")
        self.covered = torch.zeros(num_tokens, dtype=torch.bool, device="cuda")

    @classmethod
    def sized_for(cls, specs, shape, dtype, trail_rows=3):
        pages = sum(-(-ctx // PAGE) for ctx, _ in specs)
        return cls(shape, dtype, max_seqs=len(specs), max_blocks=max(-(-ctx // PAGE) for ctx, _ in specs) + 2,
                   num_blocks=pages + SPARE_PAGES, num_tokens=sum(n for _, n in specs) + trail_rows)

    def fill(self, specs, seed):
        """specs: (context_len, query_len) per sequence; sequences past them are padding (no tokens)."""
        gen = torch.Generator(device="cuda").manual_seed(seed)
        specs = list(specs) + [(0, 0)] * (self.context_lens.shape[0] - len(specs))
        num_blocks, _, kv_heads, head_dim = self.k_cache.shape
        for cache in (self.k_cache, self.v_cache):
            cache.copy_(torch.randn(cache.shape, generator=gen, device="cuda") * POISON_SCALE)
        physical = torch.randperm(num_blocks, generator=gen, device="cuda").int()
        used = sum(-(-ctx // PAGE) for ctx, _ in specs)
        assert used + SPARE_PAGES <= num_blocks and sum(n for _, n in specs) <= self.q.shape[0]
        spare = physical[used:]
        tables = spare[torch.randint(len(spare), self.block_tables.shape, generator=gen, device="cuda")]
        slots, stale = [], []
        offset = 0
        for i, (ctx, _) in enumerate(specs):
            n_pages = -(-ctx // PAGE)
            pages = physical[offset : offset + n_pages]
            offset += n_pages
            tables[i, :n_pages] = pages
            pos = torch.arange(n_pages * PAGE, device="cuda")
            flat = pages.long()[pos // PAGE] * PAGE + pos % PAGE  # flat slot of every row of its pages
            slots.append(flat[:ctx])
            stale.append(flat[ctx:])
        slots, stale = torch.cat(slots), torch.cat(stale)
        for cache in (self.k_cache, self.v_cache):
            flat_cache = cache.view(-1, kv_heads, head_dim)
            fresh = torch.randn(len(slots), kv_heads, head_dim, generator=gen, device="cuda")
            flat_cache[slots] = fresh.to(cache.dtype)
            flat_cache[stale] = float("nan")
        self.block_tables.copy_(tables)
        q_lens = torch.tensor([n for _, n in specs])
        self.query_starts.copy_(torch.cat([torch.zeros(1, dtype=torch.long), q_lens.cumsum(0)]).int())
        self.context_lens.copy_(torch.tensor([c for c, _ in specs], dtype=torch.int32))
        self.qkv.copy_(2 * torch.randn(self.qkv.shape, generator=gen, device="cuda"))
        self.covered.zero_()
        self.covered[: int(q_lens.sum())] = True
        self.max_query_len = max(int(q_lens.max()), 1)
        return self

    def args(self, max_query_len=None):
        return (self.q, self.k_cache, self.v_cache, self.block_tables, self.query_starts, self.context_lens,
                max_query_len or self.max_query_len)


def run_kernel(b: Batch, window=None, max_query_len=None) -> torch.Tensor:
    out = torch.full(b.q.shape, float("nan"), dtype=b.q.dtype, device="cuda")
    assert paged_attention(*b.args(max_query_len), b.q.shape[2] ** -0.5, window, out) is out
    return out


def check(b: Batch, window=None, out=None) -> None:
    """The kernel's output (computed here unless given) against the fp32 reference on the same values."""
    out = run_kernel(b, window) if out is None else out
    q, k, v, *meta = b.args()
    want = paged_attention_reference(q.float(), k.float(), v.float(), *meta, q.shape[2] ** -0.5, window)
    rtol, atol = TOLERANCES[q.dtype]
    assert bool(out[~b.covered].isnan().all()), "a row of no sequence was written"
    torch.testing.assert_close(out[b.covered].float(), want[b.covered], rtol=rtol, atol=atol)


def contexts(low, high, count, seed):
    return torch.randint(low, high + 1, (count,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("model", SHAPES)
def test_decode_batch_64(model):
    specs = [(ctx, 1) for ctx in contexts(100, 300, 64, seed=1)]
    check(Batch.sized_for(specs, SHAPES[model], torch.bfloat16).fill(specs, seed=2))


@pytest.mark.parametrize("split", [True, False])
@pytest.mark.parametrize("model", SHAPES)
def test_decode_few_long_sequences(model, split, monkeypatch):
    """A handful of sequences up to 4096 keys, and padding: split-KV territory (and without it)."""
    monkeypatch.setattr(triton_attention, "SPLIT_KV", split)
    specs = [(4096, 1), (1000, 1), (17, 1), (1, 1), (2048, 1), (0, 0), (0, 0)]
    check(Batch.sized_for(specs, SHAPES[model], torch.bfloat16).fill(specs, seed=3))


@pytest.mark.parametrize("model", SHAPES)
def test_mixed_prefill_and_decode(model):
    """Whole prompts, chunks at ragged offsets, 40 decodes and padding sequences in one launch."""
    specs = [(512, 512), (1000, 256), (2048, 100), (4096, 333), (77, 77)]
    specs += [(ctx, 1) for ctx in contexts(1, 2000, 40, seed=4)] + [(0, 0)] * 3
    check(Batch.sized_for(specs, SHAPES[model], torch.bfloat16).fill(specs, seed=5))


@pytest.mark.parametrize("model", SHAPES)
def test_whole_prompt_of_4096(model):
    specs = [(4096, 4096), (300, 1)]
    check(Batch.sized_for(specs, SHAPES[model], torch.bfloat16).fill(specs, seed=6))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_other_dtypes(dtype):
    specs = [(700, 700), (1500, 129), (33, 1), (4000, 1), (0, 0)]
    check(Batch.sized_for(specs, SHAPES["llama3-8b"], dtype).fill(specs, seed=7))


@pytest.mark.parametrize("window", [1, 300])
def test_sliding_window(window):
    specs = [(1200, 400), (2000, 1), (250, 250), (5, 1)]
    b = Batch.sized_for(specs, SHAPES["llama3-8b"], torch.bfloat16).fill(specs, seed=8)
    check(b, window)
    decode = [(2000, 1), (301, 1)]  # split spans start past the window
    check(Batch.sized_for(decode, SHAPES["llama3-8b"], torch.bfloat16).fill(decode, seed=9), window)


GRAPH_CASES = {  # name -> (model, max_seqs, max_query_len, per-round specs)
    "decode-48": ("llama3-8b", 48, 1, [
        [(ctx, 1) for ctx in contexts(1, 600, 48, seed=10)],
        [(ctx, 1) for ctx in contexts(100, 300, 20, seed=11)],  # 28 padding sequences
        [(600, 1)],
    ]),
    "decode-split-4": ("llama3-8b", 4, 1, [[(4000, 1), (1, 1), (640, 1), (129, 1)], [(3000, 1), (16, 1)]]),
    "decode-llama2-8": ("llama2-7b", 8, 1, [[(ctx, 1) for ctx in contexts(1, 1000, 8, seed=12)], [(17, 1)]]),
    "mixed-128": ("llama3-8b", 12, 128, [
        [(128, 128), (900, 100), (33, 1), (2000, 1), (64, 64)],
        [(500, 1)] * 6 + [(200, 128), (1000, 7), (129, 1)],
        [(300, 77)],
    ]),
}


@pytest.mark.parametrize("case", GRAPH_CASES)
def test_cuda_graph_replay_with_new_metadata(case):
    """Capture once; rewrite block tables, query starts, context lengths, q and the cache in place;
    every replay matches an eager launch on the same buffers bit for bit, and the reference."""
    model, max_seqs, max_query_len, rounds = GRAPH_CASES[case]
    max_ctx = max(ctx for specs in rounds for ctx, _ in specs)
    pages = max(sum(-(-ctx // PAGE) for ctx, _ in specs) for specs in rounds)
    b = Batch(SHAPES[model], torch.bfloat16, max_seqs=max_seqs, max_blocks=-(-max_ctx // PAGE) + 2,
              num_blocks=pages + SPARE_PAGES, num_tokens=max_seqs * max_query_len)
    b.fill(rounds[0], seed=13)
    out = torch.empty_like(b.q, memory_format=torch.contiguous_format)
    scale = b.q.shape[2] ** -0.5

    def step():
        paged_attention(*b.args(max_query_len), scale, None, out)

    graph, _ = capture_graph(step)

    for i, specs in enumerate(rounds):
        b.fill(specs, seed=100 + i)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        eager = run_kernel(b, max_query_len=max_query_len)
        assert torch.equal(out[b.covered], eager[b.covered]), f"round {i}: replay differs from eager"
        check(b, out=out)
