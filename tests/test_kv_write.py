"""The KV cache write (Triton, one launch for k and v) against plain indexing, on fresh random inputs."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the kernel's definition
if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("no CUDA and TRITON_INTERPRET is set to something other than 1", allow_module_level=True)
pytest.importorskip("triton", reason="triton is not installed")

from kernels.attention_reference import write_kv_reference  # noqa: E402
from kernels.triton_kv_write import write_kv  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("kv_heads, head_dim", [(2, 16), (3, 64), (1, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("implementation", [write_kv, write_kv_reference])
def test_writes_each_token_at_its_slot_and_nothing_else(kv_heads, head_dim, dtype, implementation):
    gen = torch.Generator().manual_seed(kv_heads * 100 + head_dim)
    num_blocks, block_size, num_tokens = 6, 4, 9
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype).to(DEVICE)
    v_cache = torch.randn(shape, generator=gen).to(dtype).to(DEVICE)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens].to(torch.int32)
    slots[[2, 5]] = -1  # padding tokens of a captured batch write nothing
    # k and v as the model has them: strided views of one fused projection output
    fused = torch.randn(num_tokens, 3 * kv_heads * head_dim, generator=gen).to(dtype).to(DEVICE)
    k = fused[:, : kv_heads * head_dim].view(num_tokens, kv_heads, head_dim)
    v = fused[:, 2 * kv_heads * head_dim :].view(num_tokens, kv_heads, head_dim)
    implementation(k_cache, v_cache, slots.to(DEVICE), k, v)

    expected_k, expected_v = before_k.view(-1, kv_heads, head_dim), before_v.view(-1, kv_heads, head_dim)
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            expected_k[slot], expected_v[slot] = k[t], v[t]
    assert torch.equal(k_cache.view(-1, kv_heads, head_dim), expected_k)
    assert torch.equal(v_cache.view(-1, kv_heads, head_dim), expected_v)


def test_mismatched_shapes_are_refused():
    cache = torch.zeros(2, 4, 2, 16, device=DEVICE)
    k = torch.randn(3, 2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="caches"):
        write_kv(cache, cache.clone(), torch.zeros(3, dtype=torch.int32, device=DEVICE), k, k.clone())
