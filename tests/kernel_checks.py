"""Helpers shared by the kernel test modules (CPU interpreter and GPU twins alike): the fused
elementwise kernels' tolerance, and capturing a step in a CUDA graph."""

from __future__ import annotations

import warnings

import torch

# Where a fused elementwise kernel may differ from its reference, and by how much. rms_norm
# reduces its sum of squares in another order than torch's mean, and under the interpreter
# numpy's exp, cos and sin stand in for torch's; either can move an fp32 intermediate by its
# last bit, which flips the rounding to a 16-bit dtype of a rare element: 1 ulp off, or 2 after
# one more rounded product (the norm's weight; RoPE's cos/sin, counted in ulps of the larger
# operand since RoPE's sum may cancel). Everything else is bit for bit.
MAX_ULPS = 2
MAX_MISMATCH_FRACTION = 1e-3
FP32_TOLERANCE = dict(rtol=1e-5, atol=1e-6)
MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10}


def assert_matches(actual, expected, what: str = "", scale=None) -> None:
    """16-bit: equal but for MAX_MISMATCH_FRACTION of the elements, each within MAX_ULPS ulps of
    max(|expected|, scale), any such element reported as a warning; fp32: within FP32_TOLERANCE."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert not actual.isnan().any(), f"{what}: an output element was not written"
    bits = MANTISSA_BITS.get(actual.dtype)
    actual, expected = actual.float(), expected.float()
    magnitude = expected.abs() if scale is None else torch.maximum(expected.abs(), scale.float())
    error = (actual - expected).abs()
    if bits is None:
        bound = FP32_TOLERANCE["atol"] + FP32_TOLERANCE["rtol"] * magnitude
        assert (error <= bound).all(), f"{what}: max error {error.max().item():.3g}"
        return
    ulps = error / torch.ldexp(torch.ones_like(magnitude), torch.frexp(magnitude).exponent - bits - 1)
    mismatches = int((error > 0).sum())
    if mismatches:
        warnings.warn(f"{what}: {mismatches} of {error.numel()} elements differ from the reference, "
                      f"at most {ulps.max().item():.2f} ulps")
    assert mismatches <= MAX_MISMATCH_FRACTION * error.numel(), f"{what}: {mismatches} elements differ"
    assert (ulps <= MAX_ULPS).all(), f"{what}: an element is {ulps.max().item():.1f} ulps off"


def capture_graph(step):
    """Run `step()` once on a side stream (Triton compiles, allocators warm up: neither may
    happen inside a capture), then capture it; returns (graph, what the captured call returned)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = step()
    return graph, result
