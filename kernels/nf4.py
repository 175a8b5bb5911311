"""NF4 base weights as bitsandbytes defines them (QLoRA): the format, quantize, dequantize, and
the plain-PyTorch `x W^T` over it, the reference (CPU path and test oracle) of triton_nf4.py.

bitsandbytes' `quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True)`:

    for each block b of 64 consecutive elements of W.flatten() (row-major):
        absmax[b] = max |W[block b]|                                      (float32)
        q[i] = the NF4 code nearest W[i] * (1 / absmax[b]), clamped to [-1, 1]; a value exactly
               half-way between two codes takes the lower one
    packed byte j = q[2j] << 4 | q[2j + 1]                               (the first element high)
    double quantization of the absmax constants ("nested"):
        offset = mean(absmax)
        for each group g of 256 consecutive blocks:
            absmax2[g] = max |absmax[group g] - offset|                   (float32)
            qabsmax[b] = index of the dynamic-map code nearest (absmax[b] - offset) / absmax2[g]
                         (first of equals on a tie)

and `dequantize_4bit`: absmax[b] = dynamic[qabsmax[b]] * absmax2[g] + offset (float32), then
W[i] = NF4[q[i]] * absmax[b] in float32, rounded once to the weight's dtype.

Every HF linear (q_proj, k_proj, ...) is quantized on its own, as transformers quantizes a model
for QLoRA; our fused projections (qkv, gate_up) are those modules' weights side by side, rows
after rows: the packed bytes and the absmax codes simply concatenate (a row of K elements is K/64
whole blocks: K % blocksize == 0 is required), while each slice keeps its own offset and its
own absmax2 groups (`NF4Weight.slice_rows`, `group_starts`, `offsets`). So a fused projection
dequantizes to exactly the modules bitsandbytes would have made.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The NF4 code book (QLoRA, appendix E; bitsandbytes' get_4bit_type("nf4")): quantiles of N(0, 1)
# normalised to [-1, 1], with an exact zero.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256


class NF4FormatError(ValueError):
    """A weight cannot be held in our NF4 layout (or a stored NF4 state is inconsistent)."""


def nf4_code(device=None) -> torch.Tensor:
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


def dynamic_map(device=None) -> torch.Tensor:
    """The signed 8-bit dynamic quantization map (Dettmers 2015; bitsandbytes' create_dynamic_map
    with its defaults): for exponents e = 0..6, 2^e fractions of 10^(e-6), both signs, then 0 and 1,
    sorted: 256 distinct values from -0.993 to 1."""
    data: list[float] = []
    for i in range(7):
        fraction_items = 2**i + 1
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0.0, 1.0]
    data.sort()
    return torch.tensor(data, dtype=torch.float32, device=device)


@dataclass
class NF4Weight:
    """An (N, K) weight in NF4, made of one or more slices (the HF modules of a fused projection).

    packed: (N, K // 2) uint8, two codes a byte (even column in the high nibble)
    absmax: nested: (N * K // blocksize,) uint8 codes into `code2`; else float32 absmax per block
    absmax2: (groups,) float32, each slice's groups of NESTED_BLOCKSIZE blocks one after the other
    code2: (256,) float32, the dynamic map
    offsets: (slices,) float32, each slice's mean absmax
    group_starts: (slices,) int32, each slice's first group in absmax2
    slice_rows: row where each slice starts, plus N
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: tuple[int, int]
    dtype: torch.dtype  # what it dequantizes to (the model's dtype)
    slice_rows: tuple[int, ...]
    blocksize: int = BLOCKSIZE
    absmax2: torch.Tensor | None = None
    code2: torch.Tensor | None = None
    offsets: torch.Tensor | None = None
    group_starts: torch.Tensor | None = None
    nested_blocksize: int = NESTED_BLOCKSIZE
    code: torch.Tensor | None = None  # (16,) float32 NF4 code book, on the weight's device

    def __post_init__(self):
        if self.code is None:
            self.code = nf4_code(self.packed.device)

    @property
    def nested(self) -> bool:
        return self.absmax2 is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def nbytes(self) -> int:
        tensors = (self.packed, self.absmax, self.absmax2, self.code2, self.offsets, self.group_starts, self.code)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def slice(self, i: int) -> "NF4Weight":
        """Slice i on its own (a view of the packed rows): what bitsandbytes made of that module."""
        start, stop = self.slice_rows[i], self.slice_rows[i + 1]
        k = self.shape[1]
        blocks = slice(start * k // self.blocksize, stop * k // self.blocksize)
        extra = {}
        if self.nested:
            first = int(self.group_starts[i])
            last = int(self.group_starts[i + 1]) if i + 1 < len(self.slice_rows) - 1 else self.absmax2.numel()
            extra = dict(absmax2=self.absmax2[first:last], code2=self.code2, offsets=self.offsets[i : i + 1],
                         group_starts=torch.zeros(1, dtype=torch.int32, device=self.device),
                         nested_blocksize=self.nested_blocksize)
        return NF4Weight(self.packed[start:stop], self.absmax[blocks], (stop - start, k), self.dtype, (0, stop - start),
                         self.blocksize, code=self.code, **extra)

    @staticmethod
    def cat(parts: list["NF4Weight"]) -> "NF4Weight":
        """Slices side by side in rows (q, k, v -> qkv): each keeps its own nested statistics."""
        first = parts[0]
        k = first.shape[1]
        if any(p.shape[1] != k or p.blocksize != first.blocksize or p.nested != first.nested
               or len(p.slice_rows) != 2 for p in parts):
            raise NF4FormatError("fused NF4 slices must share K, the block size and nesting, one slice each")
        rows = [0]
        for p in parts:
            rows.append(rows[-1] + p.shape[0])
        extra = {}
        if first.nested:
            sizes = [p.absmax2.numel() for p in parts]
            starts = [sum(sizes[:i]) for i in range(len(parts))]
            extra = dict(absmax2=torch.cat([p.absmax2 for p in parts]), code2=first.code2,
                         offsets=torch.cat([p.offsets for p in parts]),
                         group_starts=torch.tensor(starts, dtype=torch.int32, device=first.device),
                         nested_blocksize=first.nested_blocksize)
        return NF4Weight(torch.cat([p.packed for p in parts]), torch.cat([p.absmax for p in parts]),
                         (rows[-1], k), first.dtype, tuple(rows), first.blocksize, **extra)


def quantize_nf4(weight: torch.Tensor, blocksize: int = BLOCKSIZE, nested: bool = True,
                 nested_blocksize: int = NESTED_BLOCKSIZE) -> NF4Weight:
    """One module's (N, K) weight -> NF4, as bitsandbytes' quantize_4bit(quant_type="nf4",
    compress_statistics=nested) computes it (see the module docstring); on the weight's device,
    any float dtype (the arithmetic is float32, as bitsandbytes')."""
    if weight.dim() != 2:
        raise NF4FormatError(f"NF4 quantizes 2-D weights, not shape {tuple(weight.shape)}")
    n, k = weight.shape
    if k % blocksize:
        raise NF4FormatError(f"NF4 needs the input width ({k}) to be a multiple of the block size ({blocksize}), "
                             "so that blocks do not straddle rows")
    device = weight.device
    blocks = weight.reshape(-1, blocksize).float()  # (N*K/bs, bs)
    absmax = blocks.abs().amax(dim=1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1), -1, 1).reshape(-1)
    code = nf4_code(device)
    midpoints = (code[:-1] + code[1:]) / 2
    q = torch.bucketize(scaled, midpoints, out_int32=True).to(torch.uint8)  # ties: the lower code
    packed = (q[0::2] << 4 | q[1::2]).reshape(n, k // 2)
    if not nested:
        return NF4Weight(packed, absmax, (n, k), weight.dtype, (0, n), blocksize, code=code)
    offset = absmax.mean()
    qabsmax, absmax2 = quantize_blockwise_8bit(absmax - offset, nested_blocksize)
    return NF4Weight(packed, qabsmax, (n, k), weight.dtype, (0, n), blocksize, absmax2=absmax2,
                     code2=dynamic_map(device), offsets=offset.reshape(1),
                     group_starts=torch.zeros(1, dtype=torch.int32, device=device),
                     nested_blocksize=nested_blocksize, code=code)


def quantize_blockwise_8bit(values: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' quantize_blockwise with the dynamic map: per block of `blocksize`, absmax2 =
    max |v|, and each v / absmax2 to the nearest code (the first of equals). Returns (codes uint8, absmax2)."""
    code = dynamic_map(values.device)
    n = values.numel()
    groups = -(-n // blocksize)
    padded = torch.zeros(groups * blocksize, dtype=torch.float32, device=values.device)
    padded[:n] = values.float()
    padded = padded.view(groups, blocksize)
    absmax2 = padded.abs().amax(dim=1)
    normed = (padded / absmax2.unsqueeze(1)).reshape(-1)[:n]
    # the sorted map's nearest entry: bucketize gives the right neighbour, then compare distances
    right = torch.bucketize(normed, code).clamp(max=255)  # the first code >= normed
    left = (right - 1).clamp(min=0)
    d_left, d_right = (normed - code[left]).abs(), (normed - code[right]).abs()
    idx = torch.where(d_right < d_left, right, left)
    return idx.to(torch.uint8), absmax2


def dequantize_absmax(w: NF4Weight) -> torch.Tensor:
    """The float32 absmax of every block: nested ones are code2[q] * absmax2[group] + offset."""
    if not w.nested:
        return w.absmax.float()
    k = w.shape[1]
    out = torch.empty(w.absmax.numel(), dtype=torch.float32, device=w.device)
    for i in range(len(w.slice_rows) - 1):
        b0, b1 = w.slice_rows[i] * k // w.blocksize, w.slice_rows[i + 1] * k // w.blocksize
        local = torch.arange(b1 - b0, device=w.device)
        groups = int(w.group_starts[i]) + local // w.nested_blocksize
        out[b0:b1] = w.code2[w.absmax[b0:b1].long()] * w.absmax2[groups] + w.offsets[i]
    return out


def dequantize_nf4(w: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The (N, K) weight bitsandbytes' dequantize_4bit returns: NF4[q] * absmax in float32, rounded
    once to `dtype` (default: the weight's own)."""
    n, k = w.shape
    q = torch.stack((w.packed >> 4, w.packed & 0xF), dim=-1).reshape(-1).long()  # (N*K,) in row-major order
    values = w.code[q].view(-1, w.blocksize) * dequantize_absmax(w).unsqueeze(1)
    return values.reshape(n, k).to(dtype or w.dtype)


def dequantize_nf4_compute(w: NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    """The (N, K) weight as the Triton kernels decode it (kernels/triton_nf4.py): the code book and
    the float32 absmax each rounded to `dtype`, their product rounded once to it, as bitsandbytes'
    own 4-bit inference kernel computes in 16 bits: within two ulps of the float32 product
    (dequantize_nf4 rounds it once), and equal to dequantize_nf4 for float32."""
    n, k = w.shape
    q = torch.stack((w.packed >> 4, w.packed & 0xF), dim=-1).reshape(-1).long()
    code = w.code.to(dtype).float()  # a product of two 16-bit values is exact in float32: one rounding
    absmax = dequantize_absmax(w).to(dtype).float()
    return (code[q].view(-1, w.blocksize) * absmax.unsqueeze(1)).reshape(n, k).to(dtype)


def dense_cached(w: NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    """dequantize_nf4(w, dtype), made once and kept on the weight (the CPU path only)."""
    cache = w.__dict__.setdefault("_dense", {})
    if dtype not in cache:
        cache[dtype] = dequantize_nf4(w, dtype)
    return cache[dtype]


def nf4_linear_reference(x: torch.Tensor, w: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T (+ bias) with W dequantized to x's dtype: what the Triton kernels compute."""
    return torch.nn.functional.linear(x, dequantize_nf4(w, x.dtype), bias)
