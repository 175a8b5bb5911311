"""The fused elementwise kernels (RMSNorm with the residual add, SiLU-and-mul, RoPE of q and k)
against their references under the CPU interpreter: fresh random inputs, strided views as the
model passes them, outputs poisoned beforehand; bit for bit but for the roundings in the
tolerances below. At Llama-2-7B sizes and in a CUDA graph: tests/test_fused_elementwise_gpu.py."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the kernels' definition
if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("no CUDA and TRITON_INTERPRET is set to something other than 1", allow_module_level=True)
pytest.importorskip("triton", reason="triton is not installed")

import kernels  # noqa: E402
from kernels.triton_activation import silu_and_mul, silu_and_mul_reference  # noqa: E402
from kernels.triton_norm import rms_norm, rms_norm_reference  # noqa: E402
from kernels.attention_reference import write_kv_reference  # noqa: E402
from kernels.triton_kv_write import write_kv  # noqa: E402
from kernels.triton_rope import apply_rope_and_write_kv, apply_rope_qk, apply_rope_qk_reference  # noqa: E402
from tests.kernel_checks import assert_matches  # noqa: E402  (the tolerances, in one place)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

def randn(gen, *shape, dtype, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(DEVICE)


def poisoned(*shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("hidden", [64, 96, 576])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_the_reference(hidden, dtype, with_residual):
    gen = torch.Generator().manual_seed(hidden + with_residual)
    num_tokens = 37
    x = randn(gen, num_tokens, hidden + 24, dtype=dtype, scale=3.0)[:, 5 : 5 + hidden]  # row-strided, offset
    residual = randn(gen, 2 * num_tokens, hidden, dtype=dtype)[::2] if with_residual else None  # every other row
    weight = randn(gen, hidden, dtype=dtype)
    before = (x.clone(), None if residual is None else residual.clone())
    out, residual_out = poisoned(num_tokens, hidden, dtype=dtype), poisoned(num_tokens, hidden, dtype=dtype)
    got = rms_norm(x, weight, 1e-5, residual, out=out, residual_out=residual_out)
    expected = rms_norm_reference(x, weight, 1e-5, residual)
    if with_residual:
        assert got[0] is out and got[1] is residual_out
        assert torch.equal(residual_out, expected[1])  # the residual stream: one rounded add, always exact
        assert_matches(out, expected[0])
    else:
        assert got is out
        assert_matches(out, expected)
    assert torch.equal(x, before[0]) and (residual is None or torch.equal(residual, before[1]))


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # the interpreter's exp(120)
@pytest.mark.parametrize("size", [96, 576, 1100])  # 1100: two column blocks, the second ragged
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul_matches_the_reference(size, dtype):
    gen = torch.Generator().manual_seed(size)
    num_tokens = 23
    gate_up = randn(gen, num_tokens, 2 * size + 16, dtype=dtype, scale=4.0)[:, : 2 * size]  # row-strided
    gate_up[0, :4] = torch.tensor([-120.0, -88.0, 90.0, 1e-3], dtype=dtype)  # exp overflows, saturates, tiny
    out = poisoned(num_tokens, size, dtype=dtype)
    assert silu_and_mul(gate_up, out=out) is out
    assert_matches(out, silu_and_mul_reference(gate_up))
    assert_matches(silu_and_mul(gate_up), silu_and_mul_reference(gate_up))  # allocating its own output


def _inv_freq(head_dim, theta, slow_factor=1.0):
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    inv_freq[head_dim // 4 :] /= slow_factor  # the long wavelengths slowed, as Llama 3's scaling does
    return inv_freq.to(DEVICE)


def _qkv(gen, num_tokens, q_heads, kv_heads, head_dim, dtype):
    """q and k as the model has them: strided views of one fused projection output."""
    qkv = randn(gen, num_tokens, (q_heads + 2 * kv_heads) * head_dim, dtype=dtype, scale=2.0)
    q = qkv[:, : q_heads * head_dim].view(num_tokens, q_heads, head_dim)
    k = qkv[:, q_heads * head_dim : (q_heads + kv_heads) * head_dim].view(num_tokens, kv_heads, head_dim)
    return qkv, q, k


def _pair_magnitude(x):
    """|x1| + |x2| of each rotated pair, for both halves: a bound on each product in the sum."""
    half = x.shape[-1] // 2
    pair = x[..., :half].float().abs() + x[..., half:].float().abs()
    return torch.cat((pair, pair), dim=-1)


@pytest.mark.parametrize("q_heads, kv_heads, head_dim, theta, slow_factor", [
    (4, 2, 16, 10000.0, 1.0), (3, 1, 64, 500000.0, 8.0), (8, 8, 64, 10000.0, 2.0),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("positions_dtype", [torch.int32, torch.int64])
def test_rope_matches_the_reference(q_heads, kv_heads, head_dim, theta, slow_factor, dtype, positions_dtype):
    gen = torch.Generator().manual_seed(q_heads * head_dim + kv_heads)
    num_tokens = 29
    positions = torch.randint(0, 8192, (num_tokens,), generator=gen)
    positions[:3] = torch.tensor([0, 1, 131071])
    positions = positions.to(positions_dtype).to(DEVICE)
    inv_freq = _inv_freq(head_dim, theta, slow_factor)
    qkv, q, k = _qkv(gen, num_tokens, q_heads, kv_heads, head_dim, dtype)
    before = qkv.clone()
    q_out, k_out = poisoned(*q.shape, dtype=dtype), poisoned(*k.shape, dtype=dtype)
    got = apply_rope_qk(q, k, positions, inv_freq, q_out=q_out, k_out=k_out)
    assert got[0] is q_out and got[1] is k_out
    q_ref, k_ref = apply_rope_qk_reference(q, k, positions, inv_freq)
    assert_matches(q_out, q_ref, scale=_pair_magnitude(q))
    assert_matches(k_out, k_ref, scale=_pair_magnitude(k))
    assert torch.equal(qkv, before)
    # allocating its own outputs: contiguous, the same values
    q_new, k_new = apply_rope_qk(q, k, positions, inv_freq)
    assert q_new.is_contiguous() and k_new.is_contiguous()
    assert torch.equal(q_new, q_out) and torch.equal(k_new, k_out)


@pytest.mark.parametrize("q_heads, kv_heads, head_dim", [(4, 2, 16), (3, 1, 64), (8, 8, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_with_the_cache_write_stores_what_the_two_kernels_store(q_heads, kv_heads, head_dim, dtype):
    """The fused launch against rope then the KV write (Triton, bit for bit) and against the
    references (the rope tolerance): q returned, k rotated and v copied into their slots, every
    other slot of the caches untouched, padding tokens (-1) writing nothing."""
    gen = torch.Generator().manual_seed(q_heads * 31 + head_dim)
    num_tokens, num_blocks, block_size = 21, 7, 4
    positions = torch.randint(0, 8192, (num_tokens,), generator=gen, dtype=torch.int32).to(DEVICE)
    inv_freq = _inv_freq(head_dim, 10000.0)
    qkv, q, k = _qkv(gen, num_tokens, q_heads, kv_heads, head_dim, dtype)
    v = qkv[:, (q_heads + kv_heads) * head_dim :].view(num_tokens, kv_heads, head_dim)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens].to(torch.int32)
    slots[[0, 7, 20]] = -1
    slots = slots.to(DEVICE)
    cache_shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache, v_cache = randn(gen, *cache_shape, dtype=dtype), randn(gen, *cache_shape, dtype=dtype)
    k_two, v_two = k_cache.clone(), v_cache.clone()
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    before = qkv.clone()

    q_fused = apply_rope_and_write_kv(q, k, v, positions, inv_freq, k_cache, v_cache, slots)
    q_two, k_rot = apply_rope_qk(q, k, positions, inv_freq)
    write_kv(k_two, v_two, slots, k_rot, v)
    assert torch.equal(q_fused, q_two)
    assert torch.equal(k_cache, k_two) and torch.equal(v_cache, v_two)
    assert torch.equal(qkv, before)

    q_expected, k_expected = apply_rope_qk_reference(q, k, positions, inv_freq)
    write_kv_reference(k_ref, v_ref, slots, k_expected, v)
    assert_matches(q_fused, q_expected, scale=_pair_magnitude(q))
    assert_matches(k_cache, k_ref, scale=_pair_magnitude(k_ref))
    assert torch.equal(v_cache, v_ref)
    # through the dispatcher (the model's call): the same on CUDA, the references on the CPU
    k_again, v_again = k_ref.clone(), v_ref.clone()
    q_again = kernels.apply_rope_and_write_kv(q, k, v, positions, inv_freq, k_again, v_again, slots)
    assert_matches(q_again, q_expected, scale=_pair_magnitude(q))
    assert_matches(k_again, k_ref, scale=_pair_magnitude(k_ref))
    assert torch.equal(v_again, v_ref)


def test_rope_with_the_cache_write_refuses_mismatched_caches():
    gen = torch.Generator().manual_seed(3)
    qkv, q, k = _qkv(gen, 5, 2, 1, 16, torch.float32)
    v = k.clone()
    positions = torch.arange(5, dtype=torch.int32, device=DEVICE)
    cache = torch.zeros(2, 4, 2, 16, device=DEVICE)  # two kv heads, k has one
    with pytest.raises(ValueError, match="caches"):
        apply_rope_and_write_kv(q, k, v, positions, _inv_freq(16, 10000.0), cache, cache.clone(),
                                torch.zeros(5, dtype=torch.int32, device=DEVICE))


def test_rope_in_place_rotates_q_and_k_and_leaves_v():
    gen = torch.Generator().manual_seed(5)
    num_tokens, q_heads, kv_heads, head_dim = 19, 4, 2, 32
    positions = torch.randint(0, 4096, (num_tokens,), generator=gen, dtype=torch.int32).to(DEVICE)
    inv_freq = _inv_freq(head_dim, 10000.0)
    qkv, q, k = _qkv(gen, num_tokens, q_heads, kv_heads, head_dim, torch.bfloat16)
    v_before = qkv[:, (q_heads + kv_heads) * head_dim :].clone()
    expected = apply_rope_qk(q, k, positions, inv_freq)
    apply_rope_qk(q, k, positions, inv_freq, q_out=q, k_out=k)
    assert torch.equal(q, expected[0]) and torch.equal(k, expected[1])
    assert torch.equal(qkv[:, (q_heads + kv_heads) * head_dim :], v_before)


def test_empty_batches_and_bad_inputs():
    x = torch.randn(0, 64, device=DEVICE)
    assert rms_norm(x, torch.randn(64, device=DEVICE), 1e-6).shape == (0, 64)
    assert silu_and_mul(torch.randn(0, 32, device=DEVICE)).shape == (0, 16)
    with pytest.raises(ValueError, match="dtype"):
        rms_norm(torch.randn(3, 64, device=DEVICE), torch.randn(64, device=DEVICE).bfloat16(), 1e-6)
    with pytest.raises(ValueError, match="contiguous"):
        silu_and_mul(torch.randn(32, 3, device=DEVICE).t())
    q, positions, inv_freq = (torch.randn(3, 2, 16, device=DEVICE), torch.zeros(3, dtype=torch.int32, device=DEVICE),
                              torch.ones(8, device=DEVICE))
    with pytest.raises(ValueError, match="contiguous"):
        apply_rope_qk(torch.randn(3, 16, 2, device=DEVICE).transpose(1, 2), q, positions, inv_freq)  # head_dim strided
    with pytest.raises(ValueError, match="int32 or int64"):
        apply_rope_qk(q, q, positions.float(), inv_freq)


def test_cpu_dispatch_runs_the_references():
    gen = torch.Generator().manual_seed(9)
    x, r, w = (torch.randn(5, 64, generator=gen).bfloat16() for _ in range(3))
    out, h = kernels.rms_norm(x, w[0], 1e-6, r)
    expected = rms_norm_reference(x, w[0], 1e-6, r)
    assert torch.equal(out, expected[0]) and torch.equal(h, expected[1])
    assert torch.equal(kernels.silu_and_mul(x), silu_and_mul_reference(x))
    q, k = x.view(5, 4, 16), r.view(5, 4, 16)
    positions, inv_freq = torch.arange(5, dtype=torch.int32), 1.0 / 10000 ** (torch.arange(8) / 8)
    expected = apply_rope_qk_reference(q, k, positions, inv_freq)
    for got, want in zip(kernels.apply_rope_qk(q, k, positions, inv_freq), expected):
        assert torch.equal(got, want)
    for op in (kernels.rms_norm, kernels.silu_and_mul, kernels.apply_rope_qk):
        assert op.__module__ == "kernels"


@pytest.mark.skipif(DEVICE == "cuda", reason="runs the CPU model; on CUDA the engine's GPU tests run it")
def test_model_forward_through_the_kernels_matches_the_reference_path(monkeypatch, tmp_path):
    """The tiny model's forward with the Triton kernels in place of the references (what CUDA
    runs): the model hands them shapes and strides they take, and the fused residual adds plumb
    through; prefill then decode, fp32."""
    from server.model.kv_cache import KVCache
    from server.model.loader import load_model
    from server.model.runner import ModelRunner, SequenceChunk
    from tests.tiny_models import build_tiny

    build_tiny("llama-gqa").save_pretrained(tmp_path)
    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, 128, (n,), generator=gen).tolist() for n in (7, 12, 3)]
    tables = [[4 * i + j for j in range(4)] for i in range(len(prompts))]
    steps = [[SequenceChunk(p[:-1], 0, t) for p, t in zip(prompts, tables)],
             [SequenceChunk(p[-1:], len(p) - 1, t) for p, t in zip(prompts, tables)]]

    def run_steps():
        model = load_model(tmp_path, torch.float32, "cpu")
        c = model.config
        kv_cache = KVCache(c.num_layers, 16, 4, c.num_kv_heads, c.head_dim, torch.float32, "cpu")
        runner = ModelRunner(model, kv_cache, "cpu")
        return [runner.run(chunks) for chunks in steps]

    expected = run_steps()
    calls = []

    def counted(name, fn):
        return lambda *args: calls.append(name) or fn(*args)

    monkeypatch.setattr(kernels, "rms_norm", counted("rms_norm", rms_norm))
    monkeypatch.setattr(kernels, "silu_and_mul", counted("silu_and_mul", silu_and_mul))
    monkeypatch.setattr(kernels, "apply_rope_qk", counted("rope", lambda q, k, pos, inv_freq, cos_sin: apply_rope_qk(
        q, k, pos, inv_freq)))
    got = run_steps()
    num_layers, num_steps = 2, 2
    assert calls.count("rms_norm") == num_steps * (2 * num_layers + 1)
    assert calls.count("rope") == calls.count("silu_and_mul") == num_steps * num_layers
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-4)
