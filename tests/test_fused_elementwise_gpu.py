"""The fused elementwise kernels at Llama-2-7B sizes on a CUDA device, against their references
run by PyTorch on the same device (the ops the model ran before), and replayed in a CUDA graph.

Run on the H200 with `python3 -m pytest -m gpu tests/test_fused_elementwise_gpu.py`; skipped
where there is no CUDA device. Sizes: hidden 4096, intermediate 11008, 32 heads x 128 (and 8 kv
heads, Llama-3-8B's GQA), bf16; decode (1, 64) and prefill (257, 2048) token counts. Expected:
the residual stream, SiLU-and-mul and RoPE bit for bit; the norm but for rare 1-2 ulp roundings
where the sum of squares, reduced in another order than torch's mean, moves in its last fp32 bit.
Any inexact element is reported as a warning with its count.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device (runs on the H200 through the device tool)", allow_module_level=True)

import kernels  # noqa: E402
from kernels.triton_activation import silu_and_mul, silu_and_mul_reference  # noqa: E402
from kernels.triton_norm import _rms_norm_kernel, rms_norm, rms_norm_reference  # noqa: E402
from kernels.triton_rope import apply_rope_qk, apply_rope_qk_reference  # noqa: E402
from tests.kernel_checks import assert_matches, capture_graph  # noqa: E402

if type(_rms_norm_kernel).__name__ == "InterpretedFunction":
    pytest.skip("TRITON_INTERPRET=1 is set: the kernels were built for the CPU interpreter", allow_module_level=True)

HIDDEN, INTERMEDIATE, HEADS, HEAD_DIM = 4096, 11008, 32, 128  # Llama-2-7B
EPS = 1e-5
TOKENS = (1, 64, 257, 2048)

def randn(gen, *shape, dtype=torch.bfloat16, scale=1.0):
    return (torch.randn(*shape, generator=gen, device="cuda") * scale).to(dtype)


def poisoned(*shape, dtype=torch.bfloat16):
    return torch.full(shape, float("nan"), dtype=dtype, device="cuda")


def inv_freq_of(theta, head_dim=HEAD_DIM):
    return (1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)).cuda()


def pair_magnitude(x):
    """|x1| + |x2| of each rotated pair, for both halves: a bound on each product in RoPE's sum."""
    half = x.shape[-1] // 2
    pair = x[..., :half].float().abs() + x[..., half:].float().abs()
    return torch.cat((pair, pair), dim=-1)


def qkv_views(gen, num_tokens, q_heads, kv_heads, dtype=torch.bfloat16):
    """q and k as the model has them: strided views of the fused qkv projection's output."""
    qkv = randn(gen, num_tokens, (q_heads + 2 * kv_heads) * HEAD_DIM, dtype=dtype, scale=2.0)
    q = qkv[:, : q_heads * HEAD_DIM].view(num_tokens, q_heads, HEAD_DIM)
    k = qkv[:, q_heads * HEAD_DIM : (q_heads + kv_heads) * HEAD_DIM].view(num_tokens, kv_heads, HEAD_DIM)
    return q, k


@pytest.mark.parametrize("num_tokens", TOKENS)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(num_tokens, with_residual):
    gen = torch.Generator(device="cuda").manual_seed(num_tokens + with_residual)
    x = randn(gen, num_tokens, HIDDEN + 64, scale=3.0)[:, :HIDDEN]  # row-strided
    residual = randn(gen, num_tokens, HIDDEN, scale=10.0) if with_residual else None
    weight = randn(gen, HIDDEN, scale=0.5)
    out, residual_out = poisoned(num_tokens, HIDDEN), poisoned(num_tokens, HIDDEN)
    rms_norm(x, weight, EPS, residual, out=out, residual_out=residual_out)
    expected = rms_norm_reference(x, weight, EPS, residual)
    if with_residual:
        assert torch.equal(residual_out, expected[1])
        expected = expected[0]
    assert_matches(out, expected, f"rms_norm T={num_tokens} residual={with_residual}")


@pytest.mark.parametrize("num_tokens", TOKENS)
def test_silu_and_mul(num_tokens):
    gen = torch.Generator(device="cuda").manual_seed(num_tokens)
    gate_up = randn(gen, num_tokens, 2 * INTERMEDIATE, scale=4.0)
    out = poisoned(num_tokens, INTERMEDIATE)
    silu_and_mul(gate_up, out=out)
    assert_matches(out, silu_and_mul_reference(gate_up), f"silu_and_mul T={num_tokens}")


@pytest.mark.parametrize("num_tokens, kv_heads, theta, max_position", [
    (1, HEADS, 10000.0, 4096), (64, HEADS, 10000.0, 4096), (257, HEADS, 10000.0, 4096),
    (2048, 8, 500000.0, 4096),  # Llama-3-8B's GQA
    (64, HEADS, 10000.0, 300_000),  # long contexts: angles past 105615 take cosf/sinf's slow reduction
])
def test_rope(num_tokens, kv_heads, theta, max_position):
    gen = torch.Generator(device="cuda").manual_seed(num_tokens + kv_heads)
    positions = torch.randint(0, max_position, (num_tokens,), generator=gen, device="cuda", dtype=torch.int32)
    inv_freq = inv_freq_of(theta)
    q, k = qkv_views(gen, num_tokens, HEADS, kv_heads)
    q_out, k_out = poisoned(*q.shape), poisoned(*k.shape)
    apply_rope_qk(q, k, positions, inv_freq, q_out=q_out, k_out=k_out)
    q_ref, k_ref = apply_rope_qk_reference(q, k, positions, inv_freq)
    what = f"rope T={num_tokens} kv_heads={kv_heads} positions<{max_position}"
    assert_matches(q_out, q_ref, what + " q", scale=pair_magnitude(q))
    assert_matches(k_out, k_ref, what + " k", scale=pair_magnitude(k))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_other_dtypes(dtype):
    gen = torch.Generator(device="cuda").manual_seed(3)
    num_tokens = 64
    x, residual = randn(gen, num_tokens, HIDDEN, dtype=dtype), randn(gen, num_tokens, HIDDEN, dtype=dtype)
    weight = randn(gen, HIDDEN, dtype=dtype)
    out, h = rms_norm(x, weight, EPS, residual)
    expected = rms_norm_reference(x, weight, EPS, residual)
    assert torch.equal(h, expected[1])
    assert_matches(out, expected[0], f"rms_norm {dtype}")
    gate_up = randn(gen, num_tokens, 2 * INTERMEDIATE, dtype=dtype, scale=4.0)
    assert_matches(silu_and_mul(gate_up), silu_and_mul_reference(gate_up), f"silu_and_mul {dtype}")
    positions = torch.randint(0, 4096, (num_tokens,), generator=gen, device="cuda", dtype=torch.int32)
    q, k = qkv_views(gen, num_tokens, HEADS, 8, dtype=dtype)
    got = apply_rope_qk(q, k, positions, inv_freq_of(10000.0))
    for g, e, x_in in zip(got, apply_rope_qk_reference(q, k, positions, inv_freq_of(10000.0)), (q, k)):
        assert_matches(g, e, f"rope {dtype}", scale=pair_magnitude(x_in))


def test_cuda_graph_replay_with_new_inputs():
    """One decode step's elementwise ops, through the dispatchers the model calls, captured once;
    new inputs copied into the static buffers before each replay; every replay equals both an
    eager launch and the references."""
    gen = torch.Generator(device="cuda").manual_seed(17)
    num_tokens = 64
    x, residual = randn(gen, num_tokens, HIDDEN), randn(gen, num_tokens, HIDDEN)
    weight = randn(gen, HIDDEN)
    qkv = randn(gen, num_tokens, 3 * HEADS * HEAD_DIM)
    q = qkv[:, : HEADS * HEAD_DIM].view(num_tokens, HEADS, HEAD_DIM)
    k = qkv[:, HEADS * HEAD_DIM : 2 * HEADS * HEAD_DIM].view(num_tokens, HEADS, HEAD_DIM)
    gate_up = randn(gen, num_tokens, 2 * INTERMEDIATE)
    positions = torch.zeros(num_tokens, dtype=torch.int32, device="cuda")
    inv_freq = inv_freq_of(10000.0)

    def step():
        normed, h = kernels.rms_norm(x, weight, EPS, residual)
        q_rot, k_rot = kernels.apply_rope_qk(q, k, positions, inv_freq)
        return normed, h, q_rot, k_rot, kernels.silu_and_mul(gate_up)

    graph, outputs = capture_graph(step)

    for _ in range(3):
        for buffer, scale in ((x, 3.0), (residual, 1.0), (qkv, 2.0), (gate_up, 4.0)):
            buffer.copy_(randn(gen, *buffer.shape, scale=scale))
        positions.copy_(torch.randint(0, 4096, (num_tokens,), generator=gen, device="cuda", dtype=torch.int32))
        for out in outputs:
            out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        for replayed, eager in zip(outputs, step()):
            assert torch.equal(replayed, eager)
        normed_ref, h_ref = rms_norm_reference(x, weight, EPS, residual)
        q_ref, k_ref = apply_rope_qk_reference(q, k, positions, inv_freq)
        assert torch.equal(outputs[1], h_ref)
        assert_matches(outputs[0], normed_ref, "graph rms_norm")
        assert_matches(outputs[2], q_ref, "graph rope q", scale=pair_magnitude(q))
        assert_matches(outputs[3], k_ref, "graph rope k", scale=pair_magnitude(k))
        assert_matches(outputs[4], silu_and_mul_reference(gate_up), "graph silu_and_mul")
