"""Our NF4 quantize/dequantize (kernels/nf4.py) against bitsandbytes' own, on fresh random tensors.

bitsandbytes runs here on its CPU backend (pip package `bitsandbytes`, a dev dependency: the
reference only, never imported by the server). What is compared, and how exactly:
- the 4-bit codes (packed bytes) and the float32 absmax of every 64-block: bit for bit
  (`compress_statistics=False`, and the packed bytes with it on);
- dequantization: given bitsandbytes' own state (nested statistics included), our
  dequantize_nf4 returns bitsandbytes' dequantize_4bit bit for bit, in fp32, bf16 and fp16;
- the nested (double) quantization of the absmax constants: ours takes the nearest code of the
  dynamic map (the first of equals), as bitsandbytes' C++ CPU code documents; its search is
  approximate, and for a few constants in a thousand, all near-ties, its CPU build takes the
  neighbouring code (its CUDA kernel searches differently again). So there the check is: the same
  offset and absmax2 bit for bit, every code of ours the nearest, and bitsandbytes' codes other in at most 1% of the
  constants (3 in a small tensor), each less than 3% of a step (or 3e-5
  near zero) farther than ours.
The dynamic map itself is compared with bitsandbytes' create_dynamic_map, the code book with get_4bit_type.
"""

from __future__ import annotations

import os
import pytest
import torch

from kernels.nf4 import (NF4_CODE, NF4FormatError, NF4Weight, dequantize_absmax, dequantize_nf4, dequantize_nf4_compute, dynamic_map,
                         nf4_linear_reference, quantize_nf4)

if not torch.cuda.is_available():
    # bitsandbytes imports triton: Triton's own library functions are defined then, interpreted or
    # not, so the CPU interpreter must be chosen before (as the kernel test modules do)
    os.environ.setdefault("TRITON_INTERPRET", "1")
bnb_functional = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is the reference (dev extra)")

SHAPES = [(64, 128), (300, 576), (1000, 192), (7, 64 * 513), (96, 1536)]  # 1536 = SmolLM2's intermediate
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _weight(shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen) * 0.02
    w[0, :7] = 0.0  # a run of zeros inside a block
    w[-1, -64:] *= 40  # one block far larger than the rest (absmax spread for the nested statistics)
    return w.to(dtype)


def test_code_books_are_bitsandbytes():
    assert torch.equal(torch.tensor(NF4_CODE), bnb_functional.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(dynamic_map(), bnb_functional.create_dynamic_map())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_codes_and_absmax_bit_for_bit(shape, dtype):
    w = _weight(shape, dtype, seed=sum(shape))
    packed, state = bnb_functional.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    ours = quantize_nf4(w, nested=False)
    assert torch.equal(ours.packed.reshape(-1), packed.reshape(-1))
    assert torch.equal(ours.absmax, state.absmax)
    assert torch.equal(dequantize_nf4(ours), bnb_functional.dequantize_4bit(packed, state))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_nested_statistics(shape, dtype):
    w = _weight(shape, dtype, seed=7 * sum(shape))
    packed, state = bnb_functional.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    ours = quantize_nf4(w)
    assert torch.equal(ours.packed.reshape(-1), packed.reshape(-1))
    assert torch.equal(ours.offsets, state.offset.reshape(1))
    assert torch.equal(ours.absmax2, state.state2.absmax)
    # ours: the nearest code of the dynamic map to each normalised constant
    absmax = bnb_functional.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")[1].absmax
    groups = torch.arange(absmax.numel()) // 256
    normed = (absmax - state.offset) / state.state2.absmax[groups]
    code = dynamic_map()
    best = (normed[:, None] - code[None, :]).abs().min(dim=1).values
    assert torch.equal((normed - code[ours.absmax.long()]).abs(), best)
    differ = ours.absmax != state.absmax
    assert int(differ.sum()) <= max(3, differ.numel() // 100), f"{int(differ.sum())} of {differ.numel()} codes differ"
    # where they differ it is a near-tie: bnb's code is less than 3% of a step, or 3e-5 (its search's
    # resolution near zero, where steps are 1e-4), farther than the nearest
    step = (code[state.absmax.long()] - code[ours.absmax.long()]).abs()
    gap = (normed - code[state.absmax.long()]).abs() - best
    assert (gap[differ] <= torch.clamp(0.03 * step[differ], min=3e-5)).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES[:3])
def test_dequantize_of_bitsandbytes_state_bit_for_bit(shape, dtype):
    """Our dequantization (what the kernels compute) of bitsandbytes' own nested state."""
    w = _weight(shape, dtype, seed=3 * sum(shape))
    packed, state = bnb_functional.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    ours = from_bitsandbytes(packed, state)
    assert torch.equal(dequantize_nf4(ours), bnb_functional.dequantize_4bit(packed, state))


def test_fused_slices_dequantize_to_each_module():
    """q, k, v quantized on their own and fused into one NF4Weight: each slice keeps its own nested
    statistics, so the fused weight dequantizes to the three modules' own dequantizations."""
    parts = [_weight((n, 192), torch.bfloat16, seed=n) for n in (192, 64, 64)]
    states = [bnb_functional.quantize_4bit(p, blocksize=64, compress_statistics=True, quant_type="nf4") for p in parts]
    fused = NF4Weight.cat([from_bitsandbytes(*s) for s in states])
    expected = torch.cat([bnb_functional.dequantize_4bit(*s) for s in states])
    assert torch.equal(dequantize_nf4(fused), expected)
    assert torch.equal(dequantize_nf4(fused.slice(1)), expected[192:256])
    assert dequantize_absmax(fused).shape == (320 * 192 // 64,)


def test_linear_reference_is_dequantize_then_matmul():
    w = _weight((128, 256), torch.float32, seed=1)
    x = torch.randn(5, 256)
    q = quantize_nf4(w)
    torch.testing.assert_close(nf4_linear_reference(x, q), x @ dequantize_nf4(q).T, rtol=1e-6, atol=1e-6)
    # and the quantization error is NF4's: small against the weights, never zero
    error = (dequantize_nf4(q) - w).abs().max() / w.abs().max()
    assert 0 < error < 0.2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_kernels_16_bit_decode_is_within_two_ulps_of_bitsandbytes(dtype):
    """dequantize_nf4_compute (the Triton kernels' decode: code book and absmax rounded to the model
    dtype, their product rounded once, as bitsandbytes' own 4-bit inference kernel computes it) is
    bitsandbytes' dequantize_4bit for fp32; in 16 bits within two ulps of its float32 product (three
    roundings against one: about a quarter of the weights land one ulp from bitsandbytes' own
    rounding, which shows the check compares two different computations)."""
    q = quantize_nf4(_weight((96, 512), dtype, seed=3))
    ours, exact = dequantize_nf4_compute(q, dtype).float(), dequantize_nf4(q, torch.float32)
    if dtype == torch.float32:
        assert torch.equal(ours, exact)
        return
    ulp = torch.finfo(dtype).eps * torch.exp2(torch.floor(torch.log2(exact.abs().clamp(min=1e-30))))
    assert (ours - exact).abs().le(2 * ulp).all()
    assert (ours != dequantize_nf4(q, dtype).float()).any()


def test_widths_that_are_not_whole_blocks_are_refused():
    with pytest.raises(NF4FormatError, match="multiple of the block size"):
        quantize_nf4(torch.randn(8, 96))


def from_bitsandbytes(packed: torch.Tensor, state) -> NF4Weight:
    """bitsandbytes' (packed, QuantState) of one (N, K) module as our NF4Weight."""
    n, k = state.shape
    extra = {}
    if state.nested:
        extra = dict(absmax2=state.state2.absmax, code2=state.state2.code, offsets=state.offset.reshape(1).float(),
                     group_starts=torch.zeros(1, dtype=torch.int32), nested_blocksize=state.state2.blocksize)
    return NF4Weight(packed.reshape(n, k // 2), state.absmax, (n, k), state.dtype, (0, n), state.blocksize, **extra)
