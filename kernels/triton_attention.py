"""Triton paged attention: prefill chunks and decode tokens of many sequences in one launch.

Semantics are those of `paged_attention_reference` (kernels/attention_reference.py):

    for i in range(B):
        n, L = query_starts[i+1] - query_starts[i], context_lens[i]
        for j in range(n):                              # n == 0: a padding sequence, nothing
            t, pos = query_starts[i] + j, L - n + j       # row of q, position in the sequence
            keys = [p for p in range(L) if p <= pos and (w is None or p > pos - w)]
            for h in range(num_heads):
                K = [k_cache[block_tables[i, p // bs], p % bs, h // G] for p in keys]  # same for V
                out[t, h] = softmax(scale * K @ q[t, h]) @ V

Tiles. A program owns one (sequence, query tile, kv head). The G = num_heads / num_kv_heads
query heads that share a kv head are packed into the rows of the tile: row r is query token
r // G of the tile, head r % G (G need not be a power of two; the BLOCK_M - TILE_Q * G rows
left over are masked), so each K/V element is read once per kv head and tile. The program
walks its keys BLOCK_N at a time straight from the paged cache: key position p is read at
row p % block_size of page block_tables[seq, p // block_size] (a key tile may span several
pages), never from a gathered copy. Scores go through an fp32 online softmax in base 2
(scale * log2(e) folded into one multiply), the output is cast once at the end. Key tiles
past the tile's last query position (causal) and, with a sliding window, before the window of
its first query are never visited; the tile where the diagonal or window edge falls is masked
per element. K/V loads are masked to the visible range, so stale pages, and stale rows of a
sequence's last page, are never read.

Launch shapes (`attention_config`, from static shapes; chosen by reasoning, not yet tuned on
the H200: loadtest/bench_attention.py --tune sweeps the alternatives):
- decode (max_query_len == 1): one token per tile, BLOCK_M = max(16, G) rows (tl.dot needs 16;
  the padding rows are free since decode is bound by reading K/V), BLOCK_N = 64, 4 warps,
  3 stages: the pipeliner then fetches block-table entries two key tiles ahead and K/V one
  tile ahead with cp.async (seen in the sm_90 PTX), ~39 KB of shared memory per program.
- prefill or mixed batches: BLOCK_M = the smallest power of two >= max_query_len * G within
  [16, 128], TILE_Q = BLOCK_M // G tokens per tile, BLOCK_N = 64, 8 warps at 128 rows else 4,
  2 stages (wgmma on sm_90, ~96 KB of shared memory). In a mixed batch (the decodes of a
  running batch beside a new prompt: every other step of a busy server) a decode token would
  get a whole, mostly masked 128-row tile of its own, at two programs per multiprocessor; so
  mixed batches take two launches over the same arguments (MIXED_TWO_LAUNCHES): the decode
  configuration for the sequences of one query token, unsplit, then this one for the others,
  each launch skipping the other's sequences (the SEQS filter). Given `prefill_seqs` (the
  indices of the sequences of several tokens, -1 padded; a CUDA graph's step buffers hold a
  fixed number of entries), the prefill launch has programs for those entries alone: over every
  padded sequence, it was mostly programs that exit at once (17 waves a layer, measured 2.2 ms of
  a 7B mixed step at 72 sequences for the whole attention, against 1.7 ms for the decodes alone).
- fp32 (and head_dim > 128) halve BLOCK_N and cap BLOCK_M at 64 to stay within shared memory.
Query tiles run longest first (causal tiles late in a sequence see the most keys).

Split-KV (flash-decoding). A decode batch whose (sequence, kv head) programs would fill under
half the multiprocessors (one long context; 8 sequences of Llama-3-8B) splits every sequence's
keys into NUM_SPLITS contiguous spans of whole key tiles, one program each: the largest power
of two <= 2 * SMs / programs, at most 16 (about two programs per multiprocessor; powers of two
keep the compiled variants few). The programs leave an unnormalised (max, sum, acc) per row in
an fp32 workspace and a second small kernel merges the spans into out. Context lengths are
device data, so the split count comes from static shapes only: spans past a short context stay
empty, and a short-context batch pays the second launch for nothing. SPLIT_KV = False launches
unsplit (the bench times both). Prefill batches are never split.

Not done: programmatic dependent launch (see kernels/triton_shrink.py), fp8 caches, ALiBi or
logit soft-capping, and a merge done by the last split to arrive instead of a second launch.

CUDA graphs: the grid depends only on (B, max_query_len, num_kv_heads) and the shapes, every
per-step value is read on the device, nothing synchronises with the host. The workspace is
allocated per call (inside a capture it comes from the graph's pool).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kernels.attention_reference import check_attention_args
from kernels.triton_shrink import dot_in_fp32, num_sms

SPLIT_KV = True  # split decode batches that leave most multiprocessors idle; the bench can clear it
MIXED_TWO_LAUNCHES = True  # mixed batches: decode tiles for one-token sequences (see module docstring)
_ALL, _SINGLE, _MULTI = 0, 1, 2  # which sequences a launch serves: all, one query token, several
MAX_SPLITS = 16
_LOG2E = 1.4426950408889634


@triton.jit
def _paged_attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, ws_acc_ptr, ws_ml_ptr,
    block_tables_ptr, query_starts_ptr, context_lens_ptr, seq_list_ptr,
    qk_scale, window,
    stride_qt, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_ot, stride_oh, stride_od,
    stride_bts, stride_btb,
    stride_was, stride_wat, stride_wah,
    stride_wms, stride_wmt, stride_wmh,
    NUM_GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGE_SIZE: tl.constexpr,
    TILE_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
    SLIDING: tl.constexpr, DOT_FP32: tl.constexpr, SEQS: tl.constexpr, INDIRECT: tl.constexpr,
):
    # axis 0: (query tile, split), split fastest; tiles in reverse so the longest run first
    pid = tl.program_id(0)
    split = pid % NUM_SPLITS
    tile = tl.num_programs(0) // NUM_SPLITS - 1 - pid // NUM_SPLITS
    seq = tl.program_id(1)
    listed = True
    if INDIRECT:  # axis 1 walks a list of sequences (-1: an empty entry)
        seq = tl.load(seq_list_ptr + seq)
        listed = seq >= 0
        seq = tl.maximum(seq, 0)
    kv_head = tl.program_id(2)

    q_start = tl.load(query_starts_ptr + seq)
    q_len = tl.load(query_starts_ptr + seq + 1) - q_start
    first_tok = tile * TILE_Q
    run = (first_tok < q_len) & listed  # tiles past the sequence's tokens (and padding sequences) do nothing
    if SEQS == 1:
        run = run & (q_len == 1)
    elif SEQS == 2:
        run = run & (q_len > 1)
    if run:
        ctx = tl.load(context_lens_ptr + seq)
        rows = tl.arange(0, BLOCK_M)
        tok = first_tok + rows // NUM_GROUP  # (BLOCK_M,) token of the sequence
        head = kv_head * NUM_GROUP + rows % NUM_GROUP  # (BLOCK_M,) query head
        row_ok = (rows < TILE_Q * NUM_GROUP) & (tok < q_len)
        q_pos = ctx - q_len + tok  # (BLOCK_M,) position of each row's token
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        q_rows = q_start + tok
        q_ptrs = q_ptr + q_rows[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :] * stride_qd
        q_tile = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
        if DOT_FP32:
            q_tile = q_tile.to(tl.float32)

        # keys [lo, hi): up to the last query of the tile, from the window start of its first
        hi = ctx - q_len + tl.minimum(first_tok + TILE_Q, q_len)
        lo = 0
        if SLIDING:
            lo = tl.maximum(ctx - q_len + first_tok - window + 1, 0)
        if NUM_SPLITS > 1:  # this program's span: a whole number of key tiles
            span = tl.cdiv(tl.cdiv(hi - lo, NUM_SPLITS), BLOCK_N) * BLOCK_N
            lo = lo + split * span
            hi = tl.minimum(hi, lo + span)

        # a finite start: a row with no visible key yet keeps exp2(m_i - m_new) == 1, never NaN
        m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        table = block_tables_ptr + seq.to(tl.int64) * stride_bts
        kv_off_k = kv_head * stride_kh + offs_d[None, :] * stride_kd
        kv_off_v = kv_head * stride_vh + offs_d[None, :] * stride_vd
        for start in range(lo, hi, BLOCK_N):
            pos = start + tl.arange(0, BLOCK_N)  # (BLOCK_N,) key positions
            key_ok = pos < hi
            page = tl.load(table + (pos // PAGE_SIZE) * stride_btb, mask=key_ok, other=0).to(tl.int64)
            slot = pos % PAGE_SIZE
            kv_mask = key_ok[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + page[:, None] * stride_kb + slot[:, None] * stride_ks + kv_off_k,
                        mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
            v = tl.load(v_ptr + page[:, None] * stride_vb + slot[:, None] * stride_vs + kv_off_v,
                        mask=kv_mask, other=0.0)
            if DOT_FP32:
                s = tl.dot(q_tile, tl.trans(k.to(tl.float32)), input_precision="ieee")
            else:
                s = tl.dot(q_tile, tl.trans(k))
            s = s * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
            visible = key_ok[None, :] & (pos[None, :] <= q_pos[:, None])
            if SLIDING:
                visible = visible & (pos[None, :] > q_pos[:, None] - window)
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.math.exp2(m_i - m_new)
            p = tl.math.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            if DOT_FP32:
                acc = tl.dot(p, v.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(p.to(v.dtype), v, acc)
            m_i = m_new

        store_mask = row_ok[:, None] & d_ok[None, :]
        if NUM_SPLITS == 1:
            l_safe = tl.where(l_i > 0, l_i, 1.0)  # padding rows (or a row without keys) give 0, not NaN
            o = acc / l_safe[:, None]
            out_ptrs = out_ptr + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :] * stride_od
            tl.store(out_ptrs, o.to(out_ptr.dtype.element_ty), mask=store_mask)
        else:  # an empty span still writes (-1e30, 0, 0): the merge reads every split
            ws_rows = split * stride_was + q_rows[:, None] * stride_wat + head[:, None] * stride_wah
            tl.store(ws_acc_ptr + ws_rows + offs_d[None, :], acc, mask=store_mask)
            ml_rows = ws_ml_ptr + split * stride_wms + q_rows * stride_wmt + head * stride_wmh
            tl.store(ml_rows, m_i, mask=row_ok)
            tl.store(ml_rows + 1, l_i, mask=row_ok)


@triton.jit
def _merge_splits_kernel(
    ws_acc_ptr, ws_ml_ptr, out_ptr, query_starts_ptr, num_seqs,
    stride_was, stride_wat, stride_wah,
    stride_wms, stride_wmt, stride_wmh,
    stride_ot, stride_oh, stride_od,
    NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[t, h] = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s, M = max_s m_s, for rows of a sequence."""
    t = tl.program_id(0)
    h = tl.program_id(1)
    first = tl.load(query_starts_ptr)
    last = tl.load(query_starts_ptr + num_seqs)
    if (t >= first) & (t < last):  # rows of no sequence stay untouched
        splits = tl.arange(0, SPLITS_PAD)
        s_ok = splits < NUM_SPLITS
        ml = ws_ml_ptr + splits * stride_wms + t * stride_wmt + h * stride_wmh
        m = tl.load(ml, mask=s_ok, other=float("-inf"))
        l = tl.load(ml + 1, mask=s_ok, other=0.0)
        w = tl.math.exp2(m - tl.max(m, 0))  # (SPLITS_PAD,); padding splits weigh 0
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        acc = tl.load(ws_acc_ptr + splits[:, None] * stride_was + t * stride_wat + h * stride_wah + offs_d[None, :],
                      mask=s_ok[:, None] & d_ok[None, :], other=0.0)  # (SPLITS_PAD, BLOCK_D)
        total = tl.sum(l * w, 0)
        o = tl.sum(acc * w[:, None], 0) / tl.where(total > 0, total, 1.0)  # 0, not NaN, for a row with no keys
        tl.store(out_ptr + t * stride_ot + h * stride_oh + offs_d * stride_od, o.to(out_ptr.dtype.element_ty),
                 mask=d_ok)


def attention_config(num_seqs: int, max_query_len: int, num_kv_heads: int, group: int, head_dim: int,
                     dtype: torch.dtype, device: torch.device) -> dict:
    """Launch configuration from static shapes (see the module docstring for the rules)."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    small_smem = dtype == torch.float32 or block_d > 128  # 4-byte or wide rows: halve the K/V tiles
    block_n = 32 if small_smem else 64
    if max_query_len <= 1:
        block_m = max(16, triton.next_power_of_2(group))
        cfg = dict(TILE_Q=1, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4, num_stages=2 if small_smem else 3)
        programs = num_seqs * num_kv_heads
        splits = 1
        if SPLIT_KV and 2 * programs < num_sms(device):  # powers of two: few kernel variants
            wanted = triton.cdiv(2 * num_sms(device), programs)
            splits = min(MAX_SPLITS, 1 << (wanted.bit_length() - 1))
        cfg["NUM_SPLITS"] = splits
        return cfg
    cap = 64 if small_smem else 128
    block_m = min(cap, max(16, triton.next_power_of_2(max_query_len * group)))
    block_m = max(block_m, triton.next_power_of_2(group))  # at least one token per tile
    return dict(TILE_Q=block_m // group, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=8 if block_m >= 128 else 4,
                num_stages=2, NUM_SPLITS=1)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_starts: torch.Tensor,
    context_lens: torch.Tensor,
    max_query_len: int,
    scale: float,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,
    prefill_seqs: torch.Tensor | None = None,
) -> torch.Tensor:
    """out[t, h] = causal attention of query row t over its sequence's paged keys; see the module docstring.

    q (T, num_heads, head_dim), any strides; k_cache, v_cache (num_blocks, block_size,
    num_kv_heads, head_dim), any strides; block_tables (B, max_blocks), query_starts (B+1,),
    context_lens (B,) int32 on q's device; max_query_len a host bound on any sequence's query
    tokens (the grid is built from it). `prefill_seqs` (int32 on q's device, optional): the
    indices of every sequence with more than one query token, -1 padded; in a mixed batch the
    prefill launch then has programs for those entries only. Returns out (T, num_heads, head_dim)
    in q's dtype.
    """
    return launch_paged_attention(q, k_cache, v_cache, block_tables, query_starts, context_lens, max_query_len,
                                  scale, sliding_window, out, prefill_seqs=prefill_seqs)


def launch_paged_attention(q, k_cache, v_cache, block_tables, query_starts, context_lens, max_query_len: int,
                           scale: float, sliding_window: int | None = None, out: torch.Tensor | None = None, *,
                           config: dict | None = None, prefill_seqs: torch.Tensor | None = None) -> torch.Tensor:
    """`paged_attention` with an explicit launch configuration (None: `attention_config`'s choice);
    loadtest/bench_attention.py --tune sweeps it."""
    check_attention_args(q, k_cache, v_cache, block_tables, query_starts, context_lens, max_query_len,
                         sliding_window, out)
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    num_seqs = context_lens.shape[0]
    num_heads, head_dim = q.shape[1:]
    num_kv_heads = k_cache.shape[2]
    if num_seqs == 0 or max_query_len == 0 or q.shape[0] == 0:
        return out

    def config_for(query_len: int) -> dict:
        return attention_config(num_seqs, query_len, num_kv_heads, num_heads // num_kv_heads, head_dim, q.dtype,
                                q.device)

    launch = functools.partial(_launch, q, k_cache, v_cache, block_tables, query_starts, context_lens, scale,
                               sliding_window, out)
    if config is None and max_query_len > 1 and MIXED_TWO_LAUNCHES and num_seqs > 1:
        # one launch with decode tiles for the sequences of one query token, one with prefill
        # tiles for the others; each skips the other's sequences (splits would merge every row)
        launch(1, dict(config_for(1), NUM_SPLITS=1), _SINGLE)
        return launch(max_query_len, config_for(max_query_len), _MULTI, prefill_seqs)
    return launch(max_query_len, config or config_for(max_query_len), _ALL)


def _launch(q, k_cache, v_cache, block_tables, query_starts, context_lens, scale: float, sliding_window: int | None,
            out: torch.Tensor, max_query_len: int, config: dict, seqs: int,
            seq_list: torch.Tensor | None = None) -> torch.Tensor:
    num_seqs = context_lens.shape[0]
    num_heads, head_dim = q.shape[1:]
    page_size, num_kv_heads = k_cache.shape[1:3]
    group = num_heads // num_kv_heads
    cfg = dict(config)
    if not (cfg["BLOCK_M"] >= 16 and cfg["BLOCK_N"] >= 16 and 1 <= cfg["TILE_Q"] * group <= cfg["BLOCK_M"]):
        raise ValueError(f"config {cfg}: tl.dot needs BLOCK_M, BLOCK_N >= 16, and TILE_Q * {group} rows must "
                         "fit in BLOCK_M")
    splits = cfg["NUM_SPLITS"]
    block_d = max(16, triton.next_power_of_2(head_dim))
    if splits > 1:  # partial (max, sum) and accumulators per split, row and head
        ws_acc = torch.empty(splits, q.shape[0], num_heads, block_d, dtype=torch.float32, device=q.device)
        ws_ml = torch.empty(splits, q.shape[0], num_heads, 2, dtype=torch.float32, device=q.device)
    else:
        ws_acc = ws_ml = out  # never touched
    ws_strides = (*ws_acc.stride()[:3], *ws_ml.stride()[:3]) if splits > 1 else (0,) * 6
    num_tiles = triton.cdiv(max_query_len, cfg["TILE_Q"])
    grid = (num_tiles * splits, num_seqs if seq_list is None else seq_list.numel(), num_kv_heads)
    _paged_attention_kernel[grid](
        q, k_cache, v_cache, out, ws_acc, ws_ml, block_tables, query_starts, context_lens,
        query_starts if seq_list is None else seq_list,
        scale * _LOG2E, sliding_window or 0,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(), *block_tables.stride(), *ws_strides,
        NUM_GROUP=group, HEAD_DIM=head_dim, BLOCK_D=block_d, PAGE_SIZE=page_size,
        SLIDING=sliding_window is not None, DOT_FP32=dot_in_fp32(_paged_attention_kernel, q.dtype), SEQS=seqs,
        INDIRECT=seq_list is not None, **cfg,
    )
    if splits > 1:
        _merge_splits_kernel[(q.shape[0], num_heads)](
            ws_acc, ws_ml, out, query_starts, num_seqs, *ws_strides, *out.stride(),
            NUM_SPLITS=splits, SPLITS_PAD=triton.next_power_of_2(splits), HEAD_DIM=head_dim, BLOCK_D=block_d,
            num_warps=4 if block_d >= 128 else 2,
        )
    return out

