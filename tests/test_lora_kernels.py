"""Triton LoRA shrink/expand against the plain-PyTorch reference, on fresh random inputs.

On a machine without CUDA the kernels run under Triton's CPU interpreter (TRITON_INTERPRET=1,
set here before the kernels are defined when nobody set it); shapes stay small so the file
runs in well under three minutes on two cores, with a few points at the default model's real
widths (576, 192, 1536). Every check poisons what the kernel writes (NaN), so an unwritten
element fails, and poisons the rows of slot -1 tokens in y, which must come back bit for bit.
tests/test_lora_kernels_gpu.py runs the same checks at Llama sizes on the H200.
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the kernels' definition
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("no CUDA and TRITON_INTERPRET is set to something other than 1", allow_module_level=True)
pytest.importorskip("triton", reason="triton is not installed")

from kernels import lora_expand_reference, lora_shrink_reference  # noqa: E402
from kernels.triton_expand import lora_expand  # noqa: E402
from kernels.triton_fused_decode import lora_fused_decode  # noqa: E402
from kernels.triton_shrink import lora_shrink, shrink_config  # noqa: E402
from kernels.metadata import TILE_SIZES, LoRABatchMeta, max_tiles  # noqa: E402

DEVICE = "cpu" if INTERPRET else "cuda"

# (rtol, atol) per dtype, for y; v is an fp32 sum of exact products in every dtype
TOLERANCES = {torch.float32: (1e-4, 1e-4), torch.float16: (5e-3, 5e-3), torch.bfloat16: (3e-2, 3e-2)}
V_TOLERANCE = (1e-4, 1e-4)

POPULARITIES = ("identical", "distinct", "uniform", "zipf", "skewed")
# projection name -> (h_in, slice widths); small widths for the sweep, real ones below
SMALL = {"o": (192, (192,)), "qkv": (192, (192, 64, 64)), "gate_up": (96, (192, 192))}
DECODE_16 = dict(BLOCK_T=16, BLOCK_R=16, BLOCK_K=128, num_warps=4, num_stages=2)
PREFILL_64 = dict(BLOCK_T=64, BLOCK_R=64, BLOCK_K=128, num_warps=4, num_stages=2)


def make_slots(popularity: str, num_tokens: int, num_slots: int, gen: torch.Generator, base_share=0.15):
    """Each token's slot under one popularity pattern; about `base_share` of tokens get -1."""
    if popularity == "identical":
        slots = torch.full((num_tokens,), int(torch.randint(num_slots, (1,), generator=gen)))
    elif popularity == "distinct":
        assert num_slots >= num_tokens
        slots = torch.randperm(num_slots, generator=gen)[:num_tokens]
    elif popularity == "uniform":
        slots = torch.randint(num_slots, (num_tokens,), generator=gen)
    elif popularity == "zipf":
        weights = 1.0 / torch.arange(1, num_slots + 1, dtype=torch.float64) ** 1.1
        slots = torch.multinomial(weights, num_tokens, replacement=True, generator=gen)
    elif popularity == "skewed":  # one hot adapter, a long tail of others
        slots = torch.where(torch.rand(num_tokens, generator=gen) < 0.8, 0, torch.randint(num_slots, (num_tokens,), generator=gen))
    else:
        raise ValueError(popularity)
    base = torch.rand(num_tokens, generator=gen) < base_share
    return torch.where(base, -1, slots).tolist()


def make_pool(num_slots, h_in, widths, ranks, dtype, gen, *, rank_major=False, pad_value=0.0):
    """A zero-padded slot pool (the reference's view) and the kernels' view of the same weights.

    ranks: (num_slots, n_slices) int32, 0 = slice not targeted. The kernels' copy may carry
    `pad_value` (NaN) in the padding: with slot_ranks they must never read it.
    """
    max_rank = int(ranks.max().clamp(min=1))
    dev_gen = device_generator(gen)
    ranks = ranks.to(torch.int32).to(DEVICE)
    a_ref, b_ref, a_ker, b_ker = [], [], [], []
    for i, h_out in enumerate(widths):
        a = torch.randn(num_slots, max_rank, h_in, generator=dev_gen, device=DEVICE) / h_in**0.5
        b = torch.randn(num_slots, h_out, max_rank, generator=dev_gen, device=DEVICE) / max_rank**0.5
        keep = torch.arange(max_rank, device=DEVICE)[None, :] < ranks[:, i : i + 1]  # (S, R)
        a_ref.append(torch.where(keep[:, :, None], a, 0.0).to(dtype))
        b_ref.append(torch.where(keep[:, None, :], b, 0.0).to(dtype))
        a_ker.append(torch.where(keep[:, :, None], a, pad_value).to(dtype))
        bk = torch.where(keep[:, None, :], b, pad_value).to(dtype)
        if rank_major:  # stored (S, R, h_out), seen as (S, h_out, R)
            bk = bk.transpose(1, 2).contiguous().transpose(1, 2)
        b_ker.append(bk)
    scales = torch.rand(num_slots, len(widths), generator=dev_gen, device=DEVICE) + 0.5
    return a_ref, b_ref, a_ker, b_ker, scales, ranks


def device_generator(gen: torch.Generator) -> torch.Generator:
    """A generator on DEVICE seeded from the test's CPU one (large pools are drawn in place)."""
    return torch.Generator(device=DEVICE).manual_seed(int(torch.randint(2**62, (1,), generator=gen)))


def rank_table(rank, num_slots, n_slices, gen):
    if rank == "mixed":  # 1..64 side by side, and some slices left untargeted (rank 0)
        choices = torch.tensor([1, 8, 16, 64, 0, 8, 64, 16])
        return choices[torch.randint(len(choices), (num_slots, n_slices), generator=gen)]
    return torch.full((num_slots, n_slices), rank)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


def check(slots, h_in, widths, ranks, dtype, gen, *, shrink_cfg=None, expand_cfg=None, rank_major=False,
          pass_ranks=True, meta=None, fused_cfg=None):
    """The pair against the reference; with `fused_cfg` ("default" or a configuration) also the
    one-launch decode kernel on the same inputs."""
    num_tokens = len(slots)
    num_slots = ranks.shape[0]
    pad = float("nan") if pass_ranks else 0.0
    a_ref, b_ref, a_ker, b_ker, scales, slot_ranks = make_pool(
        num_slots, h_in, widths, ranks, dtype, gen, rank_major=rank_major, pad_value=pad)
    meta = meta or LoRABatchMeta.build(slots, DEVICE)
    dev_gen = device_generator(gen)
    x = torch.randn(num_tokens, h_in, generator=dev_gen, device=DEVICE).to(dtype)
    kw = dict(slot_ranks=slot_ranks) if pass_ranks else {}

    v = torch.full((len(widths), num_tokens, a_ker[0].shape[1]), float("nan"), device=DEVICE)
    lora_shrink(x, a_ker, meta, v, config=shrink_cfg, **kw)
    v_ref = lora_shrink_reference(x, a_ref, meta)
    torch.testing.assert_close(v, v_ref, rtol=V_TOLERANCE[0], atol=V_TOLERANCE[1])

    y0 = torch.randn(num_tokens, sum(widths), generator=dev_gen, device=DEVICE).to(dtype)
    base_rows = torch.tensor([s < 0 for s in slots], device=DEVICE)
    y0[base_rows] = float("nan")  # poison: slot -1 rows must be left exactly as they are
    y, y_ref = y0.clone(), y0.clone()
    lora_expand(y, v, b_ker, scales, meta, config=expand_cfg, **kw)
    lora_expand_reference(y_ref, v_ref, b_ref, scales, meta)
    rtol, atol = TOLERANCES[dtype]
    targeted = torch.tensor([s >= 0 and bool(ranks[s].any()) for s in slots], device=DEVICE)
    outputs = {"pair": y}
    if fused_cfg is not None:
        outputs["one launch"] = y0.clone()
        lora_fused_decode(outputs["one launch"], x, a_ker, b_ker, scales, meta,
                          config=None if fused_cfg == "default" else fused_cfg, **kw)
    for name, out in outputs.items():
        assert torch.equal(bits(out[base_rows]), bits(y0[base_rows])), f"{name}: a slot -1 row was written"
        torch.testing.assert_close(out[~base_rows], y_ref[~base_rows], rtol=rtol, atol=atol, msg=name)
        assert bool((out != y0).any(dim=1)[targeted].all()), f"{name}: a LoRA row was never written"
        assert int(meta.split_counters.abs().sum()) == 0, f"{name}: counters not re-armed"
    return meta


# --- the sweep: popularity x rank, odd token counts, all three dtypes, every fused shape ------

TOKEN_COUNTS = (1, 7, 33, 67, 133)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
SWEEP = [  # every popularity meets every rank; token counts, dtypes and shapes rotate across them
    (pop, rank, TOKEN_COUNTS[(3 * ri + pi) % 5], DTYPES[(pi + ri) % 3], ("o", "qkv", "gate_up")[(pi + 2 * ri) % 3])
    for pi, pop in enumerate(POPULARITIES)
    for ri, rank in enumerate((1, 8, 16, 64, "mixed"))
]


@pytest.mark.parametrize("popularity,rank,num_tokens,dtype,proj", SWEEP)
def test_sweep_default_config(popularity, rank, num_tokens, dtype, proj):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{popularity}{rank}{num_tokens}".encode()))
    h_in, widths = SMALL[proj]
    if popularity == "distinct":  # keeps the interpreter quick; distinct at 65 is the split-K test's
        num_tokens = min(num_tokens, 33)
    num_slots = (num_tokens if popularity == "distinct" else 12) + 3  # unused slots: empty groups
    slots = make_slots(popularity, num_tokens, num_slots, gen)
    check(slots, h_in, widths, rank_table(rank, num_slots, len(widths), gen), dtype, gen,
          rank_major=num_tokens % 2 == 1)


@pytest.mark.parametrize("popularity,rank,num_tokens,dtype,proj", SWEEP[1::3])
def test_sweep_sixteen_token_tiles_for_decode(popularity, rank, num_tokens, dtype, proj):
    """The tl.dot tiles the shrink takes for decode batches without GEMV_DECODE."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"t16{popularity}{rank}{num_tokens}".encode()))
    h_in, widths = SMALL[proj]
    num_tokens = min(num_tokens, 33)
    num_slots = (num_tokens if popularity == "distinct" else 12) + 3
    slots = make_slots(popularity, num_tokens, num_slots, gen)
    ranks = rank_table(rank, num_slots, len(widths), gen)
    r_pad = max(16, 1 << (int(ranks.max()) - 1).bit_length())
    check(slots, h_in, widths, ranks, dtype, gen, shrink_cfg=dict(DECODE_16, SPLIT_K=2),
          expand_cfg=dict(BLOCK_T=16, BLOCK_N=64, N_SUB=2, BLOCK_R=r_pad, num_warps=4, num_stages=1))
    # and the expand's one-block decode configuration (256 columns, B loaded before any PDL wait)
    check(slots, h_in, widths, ranks, dtype, gen,
          expand_cfg=dict(BLOCK_T=16, BLOCK_N=256, N_SUB=1, BLOCK_R=r_pad, num_warps=4, num_stages=1))


FUSED_SWEEP = [case for case in SWEEP if case[0] in ("distinct", "uniform")]


@pytest.mark.parametrize("popularity,rank,num_tokens,dtype,proj", FUSED_SWEEP)
def test_one_launch_decode(popularity, rank, num_tokens, dtype, proj):
    """Shrink and expand programs in one grid (kernels/triton_fused_decode.py): several column
    blocks per slice, widths they do not divide, split K of 1 to 3, rank chunks of 8 and 16."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"fused{popularity}{rank}{num_tokens}".encode()))
    h_in, widths = SMALL[proj]
    num_tokens = min(num_tokens, 33)
    num_slots = num_tokens + 3
    slots = make_slots(popularity, num_tokens, num_slots, gen)
    ranks = rank_table(rank, num_slots, len(widths), gen)
    cfg = dict(BLOCK_R=8 if int(ranks.max()) <= 8 else 16, BLOCK_K=32, SPLIT_K=1 + num_tokens % 3, BLOCK_N=(32, 128)[num_tokens % 2],
               num_warps=4)
    check(slots, h_in, widths, ranks, dtype, gen, rank_major=True, fused_cfg=cfg)


def test_one_launch_decode_default_config_and_routing(monkeypatch):
    """The default configuration (one wide column block, split K at the default model's widths),
    and the Triton lora_apply sending large distinct batches to one launch, others to the pair."""
    from kernels import triton_fused_decode

    gen = torch.Generator().manual_seed(31)
    slots = make_slots("distinct", 13, 16, gen)
    check(slots, 1536, (576,), rank_table("mixed", 16, 1, gen), torch.bfloat16, gen, rank_major=True,
          fused_cfg="default")
    calls = []
    original = triton_fused_decode.lora_fused_decode
    monkeypatch.setattr(triton_fused_decode, "lora_fused_decode",
                        lambda *args, **kw: calls.append(1) or original(*args, **kw))
    # over PDL_MAX_TOKENS (64) distinct tokens: one launch; a long run of one adapter, or a
    # small batch: the pair
    for popularity, num_tokens, expected in (("distinct", 70, [1]), ("identical", 70, []), ("distinct", 9, [])):
        calls.clear()
        slots = make_slots(popularity, num_tokens, 72, gen, base_share=0.0)
        a_ref, b_ref, a, b, scales, ranks = make_pool(72, 32, (32,), rank_table(8, 72, 1, gen), torch.float16, gen)
        meta = LoRABatchMeta.build(slots, DEVICE)
        x = torch.randn(num_tokens, 32, generator=device_generator(gen), device=DEVICE).to(torch.float16)
        y = torch.zeros(num_tokens, 32, dtype=torch.float16, device=DEVICE)
        triton_fused_decode.lora_apply(y, x, a, b, scales, meta, ranks)
        y_ref = lora_expand_reference(torch.zeros_like(y), lora_shrink_reference(x, a_ref, meta), b_ref, scales, meta)
        torch.testing.assert_close(y, y_ref, rtol=5e-3, atol=5e-3)
        assert calls == expected, popularity


def test_decode_shrink_takes_one_token_tiles_only_when_adapters_are_mostly_distinct(monkeypatch):
    """The launch rule (kernels/triton_shrink.py shrink_config), from the metadata's hints alone."""
    import kernels.triton_shrink as shrink_module

    cpu = torch.device("cpu")
    distinct = LoRABatchMeta.build(list(range(60)) + [-1] * 4, "cpu")
    shared = LoRABatchMeta.build([t % 8 for t in range(64)], "cpu")
    prefill = LoRABatchMeta.build([1] * 100 + [2] * 28, "cpu")
    assert shrink_config(64, 1, 16, 4096, distinct, cpu)["BLOCK_T"] == 1
    assert shrink_config(64, 3, 8, 4096, distinct, cpu)["BLOCK_R"] == 8  # ranks up to 8: chunks of 8
    assert shrink_config(64, 1, 16, 4096, shared, cpu)["BLOCK_T"] == 16
    assert shrink_config(128, 1, 16, 4096, prefill, cpu)["BLOCK_T"] == 64
    monkeypatch.setattr(shrink_module, "GEMV_DECODE", False)
    assert shrink_config(64, 1, 16, 4096, distinct, cpu)["BLOCK_T"] == 16


def test_dot_tiles_need_sixteen_rank_rows():
    gen = torch.Generator().manual_seed(13)
    slots = make_slots("distinct", 5, 8, gen)
    with pytest.raises(ValueError, match="BLOCK_R >= 16"):
        check(slots, 64, (64,), rank_table(8, 8, 1, gen), torch.float16, gen,
              shrink_cfg=dict(DECODE_16, BLOCK_R=8, SPLIT_K=1))


@pytest.mark.parametrize("split_k", [2, 3, 8])
def test_split_k_reduction(split_k):
    """Partials meet through the counters; the last program reduces and re-arms them."""
    gen = torch.Generator().manual_seed(split_k)
    slots = make_slots("distinct", 65, 70, gen, base_share=0.1)
    cfg = dict(DECODE_16, BLOCK_R=64, BLOCK_K=16, SPLIT_K=split_k)
    check(slots, 96, (32,), rank_table("mixed", 70, 1, gen), torch.bfloat16, gen, shrink_cfg=cfg)
    slots = make_slots("zipf", 45, 8, gen)
    check(slots, 192, (192, 64, 64), rank_table(16, 8, 3, gen), torch.float16, gen, shrink_cfg=cfg)


@pytest.mark.parametrize("proj,h_in,widths,popularity,num_tokens", [
    ("o", 576, (576,), "uniform", 29),
    ("qkv", 576, (576, 192, 192), "zipf", 45),
    ("gate_up", 576, (1536, 1536), "skewed", 21),
    ("down", 1536, (576,), "distinct", 13),
])
def test_default_model_widths(proj, h_in, widths, popularity, num_tokens):
    gen = torch.Generator().manual_seed(num_tokens)
    slots = make_slots(popularity, num_tokens, 16, gen)
    check(slots, h_in, widths, rank_table("mixed", 16, len(widths), gen), torch.bfloat16, gen, rank_major=True)


def test_prefill_tiles_and_mixed_batch():
    """64-token tiles (chosen for long runs), a chunked prefill beside decode tokens."""
    gen = torch.Generator().manual_seed(7)
    slots = [3] * 100 + [-1] * 5 + [0, 5, 5, 1, 7, 3, -1, 2] + [6] * 19
    h_in, widths = SMALL["qkv"]
    meta = check(slots, h_in, widths, rank_table("mixed", 8, 3, gen), torch.bfloat16, gen)
    assert meta.max_group_tokens >= 64  # so the default configuration took 64-token tiles
    check(slots, h_in, widths, rank_table(8, 8, 3, gen), torch.float16, gen, shrink_cfg=dict(PREFILL_64, SPLIT_K=2),
          expand_cfg=dict(BLOCK_T=64, BLOCK_N=64, BLOCK_R=16, num_warps=4, num_stages=2))
    # column blocks walked in a loop, ranks in chunks of 16, widths that do not divide evenly
    check(slots, h_in, widths, rank_table("mixed", 8, 3, gen), torch.float16, gen,
          expand_cfg=dict(BLOCK_T=16, BLOCK_N=32, N_SUB=3, BLOCK_R=16, num_warps=4, num_stages=2))


def test_without_slot_ranks_uses_padding():
    """No slot_ranks: every slot counts as max_rank, exact through the zero padding."""
    gen = torch.Generator().manual_seed(11)
    slots = make_slots("uniform", 23, 6, gen)
    check(slots, 192, (192, 64, 64), rank_table("mixed", 6, 3, gen), torch.bfloat16, gen, pass_ranks=False)


def test_metadata_update_in_place():
    """A graph-style reuse: one preallocated meta, refilled for a new batch, same buffers."""
    gen = torch.Generator().manual_seed(3)
    meta = LoRABatchMeta.build([0] * 40, DEVICE, capacity=40)
    pointers = (meta.packed.data_ptr(), meta.tiles[16].data_ptr(), meta.split_counters.data_ptr())
    for popularity in ("distinct", "zipf"):
        slots = make_slots(popularity, 40, 48, gen)
        meta.update(slots)
        check(slots, 96, (96, 32, 32), rank_table(16, 48, 3, gen), torch.float16, gen, meta=meta)
    assert pointers == (meta.packed.data_ptr(), meta.tiles[16].data_ptr(), meta.split_counters.data_ptr())


def test_metadata_views_match_the_token_slots():
    gen = torch.Generator().manual_seed(5)
    for popularity in POPULARITIES:
        slots = make_slots(popularity, 77, 80, gen)
        meta = LoRABatchMeta.build(slots, "cpu")
        assert meta.token_slots.tolist() == slots
        assert meta.active_slots == sorted({s for s in slots if s >= 0})
        for slot, idx in meta.groups():
            assert idx.dtype == torch.int64 and idx.tolist() == [t for t, s in enumerate(slots) if s == slot]
        for bt in TILE_SIZES:
            tiles = meta.tiles[bt][meta.tiles[bt][:, 2] > 0].tolist()
            assert len(tiles) == meta.num_tiles_hint[bt] <= max_tiles(77, 80, bt)
            covered = sorted(t for slot, start, n in tiles for t in meta.sorted_tokens[start : start + n].tolist())
            assert covered == list(range(77)) and all(1 <= n <= bt for _, _, n in tiles)
            assert all(slots[t] == slot or (slot == -1 and slots[t] < 0)
                       for slot, start, n in tiles for t in meta.sorted_tokens[start : start + n].tolist())


def test_empty_batch_and_base_only_batch():
    gen = torch.Generator().manual_seed(9)
    a_ref, b_ref, a_ker, b_ker, scales, ranks = make_pool(4, 64, (64,), rank_table(8, 4, 1, gen), torch.float16, gen)
    empty = LoRABatchMeta.build([], DEVICE)
    v = lora_shrink(torch.empty(0, 64, dtype=torch.float16, device=DEVICE), a_ker, empty, slot_ranks=ranks)
    assert v.shape == (1, 0, 8)
    check([-1] * 5, 64, (64,), rank_table(8, 4, 1, gen), torch.float16, gen)
