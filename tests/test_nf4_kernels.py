"""The Triton NF4 kernels (kernels/triton_nf4.py) against dequantize-then-matmul (kernels/nf4.py).

Runs under Triton's CPU interpreter when there is no CUDA (small shapes), on the GPU otherwise
(the same checks; tests/test_quantized_gpu.py adds Llama sizes, bitsandbytes-free graph replay
and FP8). Inputs are fresh random tensors; outputs are poisoned first (NaN), so an unwritten
element fails. The dequantize kernel must equal the kernels' decode, `dequantize_nf4_compute`
(bitsandbytes' dequantization for fp32, within one ulp of it in 16 bits: test_nf4_quantize.py),
bit for bit (under the interpreter, whose casts to bf16 truncate, within two ulps); the fused
kernels differ from dequantize-then-matmul only by the order of their fp32 sums (TOLERANCES).
On the GPU, bf16 and fp16 take the in-register look-up (PTX), fp32 and the interpreter the table.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the kernels' definition
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("no CUDA and TRITON_INTERPRET is set to something other than 1", allow_module_level=True)
pytest.importorskip("triton", reason="triton is not installed")

from kernels.nf4 import NF4Weight, dequantize_nf4, dequantize_nf4_compute, quantize_nf4  # noqa: E402
from kernels.triton_nf4 import FUSED_MAX_TOKENS, nf4_dequantize, nf4_linear, nf4_matmul  # noqa: E402

DEVICE = "cpu" if INTERPRET else "cuda"
DTYPES = [torch.float32, torch.bfloat16] if INTERPRET else [torch.float32, torch.bfloat16, torch.float16]
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-3, 2e-3)}
# (slices' rows, K): one module; a fused q/k/v of unequal slices; gate/up with K = 3 tiles and a tail
WEIGHTS = [((96,), 192), ((64, 32, 32), 128), ((80, 80), 320)]


def make_weight(rows, k, dtype, seed, nested=True):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    parts = []
    for i, n in enumerate(rows):
        w = torch.randn(n, k, generator=gen, device=DEVICE) * 0.02 * (1 + i)  # slices of different scales
        parts.append(quantize_nf4(w.to(dtype), nested=nested))
    return NF4Weight.cat(parts)


@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,k", WEIGHTS)
def test_dequantize_kernel_bit_for_bit(rows, k, dtype, nested):
    w = make_weight(rows, k, dtype, seed=k, nested=nested)
    out = torch.full(w.shape, float("nan"), dtype=dtype, device=DEVICE)
    got, expected = nf4_dequantize(w, dtype, out=out), dequantize_nf4_compute(w, dtype)
    if dtype == torch.float32:
        assert torch.equal(got, dequantize_nf4(w, dtype))  # bitsandbytes' own, exactly
    if INTERPRET and dtype != torch.float32:
        # the interpreter's casts to bf16 (of the absmax, then of the product) truncate (numpy has
        # no bf16): two ulps at most there; the GPU rounds to nearest as torch does, bit for bit
        assert (got.float() - expected.float()).abs().le(expected.float().abs() / 64).all()
        assert not got.isnan().any()
        return
    assert torch.equal(got, expected)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,k", WEIGHTS)
@pytest.mark.parametrize("tokens", [1, 3, 16, 37])
def test_fused_matmul_equals_dequantize_then_matmul(tokens, rows, k, dtype, bias):
    w = make_weight(rows, k, dtype, seed=tokens + k)
    gen = torch.Generator(device=DEVICE).manual_seed(tokens)
    x = torch.randn(tokens, k, generator=gen, device=DEVICE).to(dtype)
    b = torch.randn(w.shape[0], generator=gen, device=DEVICE).to(dtype) if bias else None
    out = torch.full((tokens, w.shape[0]), float("nan"), dtype=dtype, device=DEVICE)
    y = nf4_matmul(x, w, b, out=out)
    expected = torch.nn.functional.linear(x.float(), dequantize_nf4_compute(w, dtype).float(),
                                          None if b is None else b.float())
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(y.float(), expected, rtol=rtol, atol=atol)


def test_non_nested_weight_and_strided_rows():
    """A non-nested weight (bitsandbytes' compress_statistics=False) and x as a view with a row stride."""
    w = make_weight((64,), 256, torch.float32, seed=5, nested=False)
    wide = torch.randn(4, 512, device=DEVICE)
    x = wide[:, :256]
    torch.testing.assert_close(nf4_matmul(x, w), x @ dequantize_nf4(w).T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("split_k", [1, 2, 3])
def test_split_k_partial_sums(split_k):
    """K shared by 1, 2 or 3 programs (3 tiles of 128 over K = 320: the last share is short)."""
    w = make_weight((48, 16), 320, torch.float32, seed=split_k)
    x = torch.randn(5, 320, device=DEVICE)
    b = torch.randn(64, device=DEVICE)
    got = nf4_matmul(x, w, b, block_k=128, split_k=split_k)
    torch.testing.assert_close(got, x @ dequantize_nf4(w).T + b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gemv_path_row_by_row(dtype):
    """The GEMV variant (one row of x a program, fp32 multiply-adds; the default at one row) over
    three rows of a fused, nested weight with a bias."""
    w = make_weight((64, 32, 32), 192, dtype, seed=21)
    x = torch.randn(3, 192, device=DEVICE).to(dtype)
    b = torch.randn(128, device=DEVICE).to(dtype)
    expected = x.float() @ dequantize_nf4_compute(w, dtype).float().T + b.float()
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(nf4_matmul(x, w, b, gemv=True).float(), expected, rtol=rtol, atol=atol)


def test_long_batches_take_the_dequantize_path():
    w = make_weight((32,), 128, torch.float32, seed=9)
    x = torch.randn(FUSED_MAX_TOKENS + 3, 128, device=DEVICE)
    torch.testing.assert_close(nf4_linear(x, w), x @ dequantize_nf4(w).T, rtol=1e-5, atol=1e-5)
