"""Shaw relative-key self-attention (w2v-bert-2.0's ``position_embeddings_type="relative_key"``), forward and backward.

    scores[b,h,i,j] = scale * q_i·k_j + scale * q_i·E[clamp(j - i, -left, right) + left]
    out = softmax_j(scores + key mask) @ v

transformers materialises the (L, L, D) gather of E and the B×H×L×L bias. The kernels never do: the bias of
query row i takes only R = left + right + 1 values, q_i·E[r], so the launcher computes that Q·Eᵀ table once,
(B, L, H, R) fp32 in global memory (O(L·R), a few % of the attention's bytes), and the kernels stream over key
blocks flash-attention style, reading the bias from the table. Key blocks wholly left of the band
(j - i <= -left for the whole tile) or wholly right of it (j - i >= right) see one bias per row, q_i·E[0] or
q_i·E[R - 1], loaded once as a row vector; only the few blocks that straddle the band gather per element (pointer
gathers into rows just read: L1/L2 hits). Keeping the table out of the registers is what lets every tuned config
compile without spilling.

The forward also writes each row's log-sum-exp. The backward is flash-attention-2's, in two passes that recompute
P from it: dK/dV (one program per key block, over query blocks) and dQ (one program per query block, over key
blocks), dS = P∘(dP − rowsum(dO∘O)). The bias gradient has the forward's structure: per row i, the table's
gradient dT[i, r] sums dS over the keys of bucket r. An interior bucket holds exactly one key (j = i + r − left),
so the dQ pass stores dS straight into a (B, L, H, R) fp32 slab (each element written once, no atomics); the two
edge buckets are row sums. Then dq += scale·dT·E and dE = scale·Σ dTᵀ·q are two small matmuls. Nothing of size
L×L exists anywhere, forward or backward.

Reading order: reference → kernels → launchers → torch.library ops → dispatch.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from ._backend import backend, check_lengths, triton_interpreter_enabled, use_triton, values_checkable


# ----------------------------------------------------------------------------------------------- reference
def rel_key_attention_reference(q, k, v, distance_embedding, left, right, scale, key_mask=None):
    """PyTorch reference (the test oracle); builds the B×H×L×L bias as transformers does.

    q, k, v: (B, L, H, D); distance_embedding: (left + right + 1, D); key_mask: optional (B, L) bool, True = attend.
    Returns (B, L, H·D) in q's dtype. Query rows are all computed (padded ones attend to the valid keys).
    """
    batch, length, heads, head_dim = q.shape
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, L, D)
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale
    scores = scores + rel_key_bias_reference(qh, distance_embedding, left, right, scale)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :].bool(), torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, vh)  # (B, H, L, D)
    return out.transpose(1, 2).reshape(batch, length, heads * head_dim)


def rel_key_bias_reference(q, distance_embedding, left, right, scale):
    """transformers' (B, H, L, L) position bias scale·q_i·E[clamp(j − i, −left, right) + left], through the (L, L, D)
    gather as transformers builds it; q: (B, H, L, D). The one copy of this arithmetic (the unfused model path uses
    it too)."""
    length = q.shape[2]
    positions = torch.arange(length, device=q.device)
    distance = (positions[None, :] - positions[:, None]).clamp(-left, right) + left
    emb = distance_embedding.to(q.dtype)[distance]  # (L, L, D)
    return torch.einsum("bhld,lrd->bhlr", q, emb) * scale


# ------------------------------------------------------------------------------------------------- kernels
# Kinds of key block (forward, dQ pass) or query block (dK/dV pass): which part of the table the bias comes from.
_BAND = tl.constexpr(0)  # straddles the band: per-element gather
_FIRST = tl.constexpr(1)  # every pair has j - i <= -left: column 0
_LAST = tl.constexpr(2)  # every pair has j - i >= right: column R - 1


@triton.jit
def _load_rows(base, rows, stride, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr):
    """A (rows, BLOCK_D) tile. Callers clamp ``rows`` into the sequence instead of masking them (what a masked row
    would contribute is zeroed downstream), and int32 offsets: both cost registers the MMA operands need. (Row ×
    stride stays below 2³¹ up to ~700,000 frames of a fused 3 × 1024-wide projection.)"""
    offs_d = tl.arange(0, BLOCK_D)
    if BLOCK_D == HEAD_DIM:
        return tl.load(base + rows[:, None] * stride + offs_d[None, :])
    return tl.load(base + rows[:, None] * stride + offs_d[None, :], mask=offs_d[None, :] < HEAD_DIM, other=0.0)


@triton.jit
def _attend_key_block(
    acc, m_i, l_i, q, table_rows, bias_row, k_base, v_base, start_n, offs_m, key_length, stride_kl, stride_vl,
    left, right, qk_scale,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, KIND: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One step of the online softmax over keys [start_n, start_n + BLOCK_N)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    key_valid = offs_n < key_length
    # keys past the length read the last valid key: finite, and their probability is set to 0 below
    rows = tl.minimum(offs_n, key_length - 1)
    k = _load_rows(k_base, rows, stride_kl, BLOCK_D, HEAD_DIM)
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if KIND == _BAND:
        distance = tl.minimum(tl.maximum(offs_n[None, :] - offs_m[:, None], -left), right) + left
        scores += tl.load(table_rows[:, None] + distance)
    else:
        scores += bias_row[:, None]
    # scores are raw q·(k + E); scale and the change to base 2 in one multiply
    scores = tl.where(key_valid[None, :], scores * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(scores - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_rows(v_base, rows, stride_vl, BLOCK_D, HEAD_DIM)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _forward_kernel(
    q_ptr, k_ptr, v_ptr, table_ptr, lengths_ptr, out_ptr, lse_ptr,
    stride_qb, stride_ql, stride_qh,
    stride_kb, stride_kl, stride_kh,
    stride_vb, stride_vl, stride_vh,
    stride_tb, stride_tl, stride_th,
    length, heads, left, right, qk_scale,
    LENGTH_BUCKET,  # next power of two of length: the autotune key, so ragged bulk jobs do not retune per length
    HEAD_DIM: tl.constexpr, NUM_DISTANCES: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, ZERO_PADDED_QUERIES: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    batch_head = tl.program_id(1)
    b = batch_head // heads
    h = batch_head % heads
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_in = offs_m < length
    d_valid = offs_d < HEAD_DIM

    key_length = length
    if HAS_LENGTHS:
        key_length = tl.minimum(tl.maximum(tl.load(lengths_ptr + b).to(tl.int32), 1), length)
    row_stride = heads * HEAD_DIM
    out_base = out_ptr + (b.to(tl.int64) * length) * row_stride + h * HEAD_DIM
    out_ptrs = out_base + offs_m[:, None].to(tl.int64) * row_stride + offs_d[None, :]
    out_mask = row_in[:, None] & d_valid[None, :]
    lse_ptrs = lse_ptr + batch_head.to(tl.int64) * length + offs_m

    if ZERO_PADDED_QUERIES and start_m >= key_length:
        # the whole query block is padding: nothing reads it but it must not be left uninitialised
        tl.store(out_ptrs, tl.zeros([BLOCK_M, BLOCK_D], dtype=out_ptr.dtype.element_ty), mask=out_mask)
        tl.store(lse_ptrs, tl.zeros([BLOCK_M], dtype=lse_ptr.dtype.element_ty), mask=row_in)
        return

    q_base = q_ptr + b.to(tl.int64) * stride_qb + h * stride_qh
    k_base = k_ptr + b.to(tl.int64) * stride_kb + h * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + h * stride_vh
    q = tl.load(q_base + offs_m[:, None].to(tl.int64) * stride_ql + offs_d[None, :], mask=out_mask, other=0.0)

    # Rows past the end read the last row's table: every gather stays in bounds without a mask.
    table_rows = (table_ptr + b.to(tl.int64) * stride_tb + h * stride_th
                  + tl.minimum(offs_m, length - 1) * stride_tl)
    bias_first = tl.load(table_rows)
    bias_last = tl.load(table_rows + (NUM_DISTANCES - 1))

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Key blocks past the sequence's length are skipped, not masked; three ranges partition the rest.
    num_key_blocks = tl.cdiv(key_length, BLOCK_N)
    # block n is wholly left of the band when its last key j and the first query i have j - i <= -left
    band_start = tl.minimum(tl.maximum(start_m - left + 1, 0) // BLOCK_N, num_key_blocks)
    # ... and wholly right when its first key j and the last query i have j - i >= right
    band_end = tl.minimum((start_m + BLOCK_M - 1 + right + BLOCK_N - 1) // BLOCK_N, num_key_blocks)
    band_end = tl.maximum(band_end, band_start)
    # Whichever block comes first holds a valid key (band_start < num_key_blocks when the band is not empty;
    # block 0 otherwise), seen by every row, so the running max is finite from the first step on.
    for block in range(band_start, band_end):
        acc, m_i, l_i = _attend_key_block(
            acc, m_i, l_i, q, table_rows, bias_first, k_base, v_base, block * BLOCK_N, offs_m, key_length,
            stride_kl, stride_vl, left, right, qk_scale, BLOCK_N, BLOCK_D, HEAD_DIM, _BAND, DOT_PRECISION)
    for block in range(0, band_start):
        acc, m_i, l_i = _attend_key_block(
            acc, m_i, l_i, q, table_rows, bias_first, k_base, v_base, block * BLOCK_N, offs_m, key_length,
            stride_kl, stride_vl, left, right, qk_scale, BLOCK_N, BLOCK_D, HEAD_DIM, _FIRST, DOT_PRECISION)
    for block in range(band_end, num_key_blocks):
        acc, m_i, l_i = _attend_key_block(
            acc, m_i, l_i, q, table_rows, bias_last, k_base, v_base, block * BLOCK_N, offs_m, key_length,
            stride_kl, stride_vl, left, right, qk_scale, BLOCK_N, BLOCK_D, HEAD_DIM, _LAST, DOT_PRECISION)

    out = acc / l_i[:, None]
    if ZERO_PADDED_QUERIES:
        out = tl.where(offs_m[:, None] < key_length, out, 0.0)
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=out_mask)
    # natural log of Σ_j exp(scaled score): m_i and l_i are in base 2
    tl.store(lse_ptrs, ((m_i + tl.math.log2(l_i)) * 0.6931471805599453).to(lse_ptr.dtype.element_ty), mask=row_in)


@triton.jit
def _dkdv_query_block(
    dk, dv, k, v, q_base, do_base, lse_base, delta_base, table_base, start_m, offs_n, key_valid, q_len, length,
    stride_ql, stride_dol, stride_tl, left, right, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_DISTANCES: tl.constexpr,
    KIND: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dK/dV pass: add queries [start_m, start_m + BLOCK_M)'s share to one key block's dk and dv (transposed
    tiles: keys along rows)."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    # rows that carry a gradient; the rest get lse = +inf, so P = 0 (and dS = 0) there whatever was saved for them
    row_live = offs_m < q_len
    rows = tl.minimum(offs_m, length - 1)
    q = _load_rows(q_base, rows, stride_ql, BLOCK_D, HEAD_DIM)
    do = _load_rows(do_base, rows, stride_dol, BLOCK_D, HEAD_DIM)
    lse2 = tl.load(lse_base + offs_m, mask=row_live, other=float("inf")) * 1.4426950408889634
    delta = tl.load(delta_base + offs_m, mask=row_live, other=0.0)
    table_rows = table_base + rows * stride_tl
    scores = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
    if KIND == _BAND:
        distance = tl.minimum(tl.maximum(offs_n[:, None] - offs_m[None, :], -left), right) + left
        scores += tl.load(table_rows[None, :] + distance)
    elif KIND == _FIRST:
        scores += tl.load(table_rows)[None, :]
    else:
        scores += tl.load(table_rows + (NUM_DISTANCES - 1))[None, :]
    p = tl.math.exp2(scores * qk_scale - lse2[None, :])
    p = tl.where(key_valid[:, None], p, 0.0)
    dv += tl.dot(p.to(do.dtype), do, input_precision=DOT_PRECISION)
    dp = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    ds = p * (dp - delta[None, :])
    dk += tl.dot(ds.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _backward_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, table_ptr, lengths_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    stride_qb, stride_ql, stride_qh,
    stride_kb, stride_kl, stride_kh,
    stride_vb, stride_vl, stride_vh,
    stride_tb, stride_tl, stride_th,
    stride_dob, stride_dol, stride_doh,
    length, heads, left, right, scale, qk_scale,
    LENGTH_BUCKET,
    HEAD_DIM: tl.constexpr, NUM_DISTANCES: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, ZERO_PADDED_QUERIES: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_n = tl.program_id(0) * BLOCK_N
    batch_head = tl.program_id(1)
    b = batch_head // heads
    h = batch_head % heads
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM

    key_length = length
    if HAS_LENGTHS:
        key_length = tl.minimum(tl.maximum(tl.load(lengths_ptr + b).to(tl.int32), 1), length)
    # with zero_padded_queries the padded rows' output is the constant 0: their dO reaches nothing
    q_len = length
    if ZERO_PADDED_QUERIES:
        q_len = key_length
    # dk, dv: (B, L, H, D) contiguous
    row_stride = heads * HEAD_DIM
    grad_offsets = (b.to(tl.int64) * length + offs_n[:, None]) * row_stride + h * HEAD_DIM + offs_d[None, :]
    grad_mask = (offs_n[:, None] < length) & d_valid[None, :]
    if start_n >= key_length:
        # padded keys get no gradient
        tl.store(dk_ptr + grad_offsets, tl.zeros([BLOCK_N, BLOCK_D], dtype=dk_ptr.dtype.element_ty), mask=grad_mask)
        tl.store(dv_ptr + grad_offsets, tl.zeros([BLOCK_N, BLOCK_D], dtype=dv_ptr.dtype.element_ty), mask=grad_mask)
        return

    key_valid = offs_n < key_length
    kv_mask = key_valid[:, None] & d_valid[None, :]
    k = tl.load(k_ptr + b.to(tl.int64) * stride_kb + h * stride_kh + offs_n[:, None].to(tl.int64) * stride_kl
                + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + b.to(tl.int64) * stride_vb + h * stride_vh + offs_n[:, None].to(tl.int64) * stride_vl
                + offs_d[None, :], mask=kv_mask, other=0.0)
    q_base = q_ptr + b.to(tl.int64) * stride_qb + h * stride_qh
    do_base = do_ptr + b.to(tl.int64) * stride_dob + h * stride_doh
    lse_base = lse_ptr + batch_head.to(tl.int64) * length
    delta_base = delta_ptr + batch_head.to(tl.int64) * length
    table_base = table_ptr + b.to(tl.int64) * stride_tb + h * stride_th
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # The forward's three ranges seen from a key block: query blocks wholly after the band's reach (every pair
    # has j - i <= -left) read column 0, wholly before it (j - i >= right) column R - 1.
    num_query_blocks = tl.cdiv(q_len, BLOCK_M)
    # query block m has j - i >= right for all pairs when its last row i and the first key j do
    band_start = tl.minimum(tl.maximum(start_n - right + 1, 0) // BLOCK_M, num_query_blocks)
    # ... and j - i <= -left when its first row and the last key do
    band_end = tl.minimum((start_n + BLOCK_N - 1 + left + BLOCK_M - 1) // BLOCK_M, num_query_blocks)
    band_end = tl.maximum(band_end, band_start)
    for block in range(band_start, band_end):
        dk, dv = _dkdv_query_block(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, table_base, block * BLOCK_M, offs_n, key_valid,
            q_len, length, stride_ql, stride_dol, stride_tl, left, right, qk_scale,
            BLOCK_M, BLOCK_D, HEAD_DIM, NUM_DISTANCES, _BAND, DOT_PRECISION)
    for block in range(0, band_start):
        dk, dv = _dkdv_query_block(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, table_base, block * BLOCK_M, offs_n, key_valid,
            q_len, length, stride_ql, stride_dol, stride_tl, left, right, qk_scale,
            BLOCK_M, BLOCK_D, HEAD_DIM, NUM_DISTANCES, _LAST, DOT_PRECISION)
    for block in range(band_end, num_query_blocks):
        dk, dv = _dkdv_query_block(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, table_base, block * BLOCK_M, offs_n, key_valid,
            q_len, length, stride_ql, stride_dol, stride_tl, left, right, qk_scale,
            BLOCK_M, BLOCK_D, HEAD_DIM, NUM_DISTANCES, _FIRST, DOT_PRECISION)
    tl.store(dk_ptr + grad_offsets, (dk * scale).to(dk_ptr.dtype.element_ty), mask=grad_mask)
    tl.store(dv_ptr + grad_offsets, dv.to(dv_ptr.dtype.element_ty), mask=grad_mask)


@triton.jit
def _dq_key_block(
    dq, edge_first, edge_last, q, do, lse2, delta, table_rows, bias_row, d_table_rows, k_base, v_base, start_n,
    offs_m, row_in, key_length, stride_kl, stride_vl, left, right, qk_scale,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, KIND: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dQ pass: one key block's share of a query block's dq, and of its table gradient."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    key_valid = offs_n < key_length
    rows = tl.minimum(offs_n, key_length - 1)
    k = _load_rows(k_base, rows, stride_kl, BLOCK_D, HEAD_DIM)
    v = _load_rows(v_base, rows, stride_vl, BLOCK_D, HEAD_DIM)
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if KIND == _BAND:
        relative = offs_n[None, :] - offs_m[:, None]
        scores += tl.load(table_rows[:, None] + (tl.minimum(tl.maximum(relative, -left), right) + left))
    else:
        scores += bias_row[:, None]
    p = tl.math.exp2(scores * qk_scale - lse2[:, None])
    p = tl.where(key_valid[None, :], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    if KIND == _BAND:
        edge_first += tl.sum(tl.where(relative <= -left, ds, 0.0), 1)
        # (relative > -left: with left = right = 0 both edges are column 0, each pair counted once)
        edge_last += tl.sum(tl.where((relative >= right) & (relative > -left), ds, 0.0), 1)
        # an interior bucket holds exactly one key: dS is its gradient, stored where the launcher zeroed it
        interior = (relative > -left) & (relative < right) & key_valid[None, :] & row_in[:, None]
        tl.store(d_table_rows[:, None] + (relative + left), ds, mask=interior)
    elif KIND == _FIRST:
        edge_first += tl.sum(ds, 1)
    else:
        edge_last += tl.sum(ds, 1)
    return dq, edge_first, edge_last


@triton.jit
def _backward_dq_kernel(
    q_ptr, k_ptr, v_ptr, table_ptr, lengths_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, d_table_ptr,
    stride_qb, stride_ql, stride_qh,
    stride_kb, stride_kl, stride_kh,
    stride_vb, stride_vl, stride_vh,
    stride_tb, stride_tl, stride_th,
    stride_dob, stride_dol, stride_doh,
    length, heads, left, right, qk_scale,
    LENGTH_BUCKET,
    HEAD_DIM: tl.constexpr, NUM_DISTANCES: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, ZERO_PADDED_QUERIES: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Writes dS·K (unscaled, fp32) to dq and the table gradient's edge columns and band entries to d_table."""
    start_m = tl.program_id(0) * BLOCK_M
    batch_head = tl.program_id(1)
    b = batch_head // heads
    h = batch_head % heads
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_in = offs_m < length
    d_valid = offs_d < HEAD_DIM

    key_length = length
    if HAS_LENGTHS:
        key_length = tl.minimum(tl.maximum(tl.load(lengths_ptr + b).to(tl.int32), 1), length)
    q_len = length
    if ZERO_PADDED_QUERIES:
        q_len = key_length
    row_stride = heads * HEAD_DIM
    dq_ptrs = dq_ptr + (b.to(tl.int64) * length + offs_m[:, None]) * row_stride + h * HEAD_DIM + offs_d[None, :]
    dq_mask = row_in[:, None] & d_valid[None, :]
    if start_m >= q_len:
        # padded rows whose output is the constant 0 (their d_table rows stay as the launcher zeroed them)
        tl.store(dq_ptrs, tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32), mask=dq_mask)
        return

    row_live = offs_m < q_len
    q_base = q_ptr + b.to(tl.int64) * stride_qb + h * stride_qh
    do_base = do_ptr + b.to(tl.int64) * stride_dob + h * stride_doh
    q = tl.load(q_base + offs_m[:, None].to(tl.int64) * stride_ql + offs_d[None, :], mask=dq_mask, other=0.0)
    live_mask = row_live[:, None] & d_valid[None, :]
    do = tl.load(do_base + offs_m[:, None].to(tl.int64) * stride_dol + offs_d[None, :], mask=live_mask, other=0.0)
    lse2 = tl.load(lse_ptr + batch_head.to(tl.int64) * length + offs_m, mask=row_live,
                   other=float("inf")) * 1.4426950408889634
    delta = tl.load(delta_ptr + batch_head.to(tl.int64) * length + offs_m, mask=row_live, other=0.0)
    table_offset = b.to(tl.int64) * stride_tb + h * stride_th
    table_rows = table_ptr + table_offset + tl.minimum(offs_m, length - 1) * stride_tl
    d_table_rows = d_table_ptr + table_offset + offs_m * stride_tl
    bias_first = tl.load(table_rows)
    bias_last = tl.load(table_rows + (NUM_DISTANCES - 1))
    k_base = k_ptr + b.to(tl.int64) * stride_kb + h * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + h * stride_vh

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    edge_first = tl.zeros([BLOCK_M], dtype=tl.float32)
    edge_last = tl.zeros([BLOCK_M], dtype=tl.float32)
    num_key_blocks = tl.cdiv(key_length, BLOCK_N)
    band_start = tl.minimum(tl.maximum(start_m - left + 1, 0) // BLOCK_N, num_key_blocks)
    band_end = tl.minimum((start_m + BLOCK_M - 1 + right + BLOCK_N - 1) // BLOCK_N, num_key_blocks)
    band_end = tl.maximum(band_end, band_start)
    for block in range(band_start, band_end):
        dq, edge_first, edge_last = _dq_key_block(
            dq, edge_first, edge_last, q, do, lse2, delta, table_rows, bias_first, d_table_rows, k_base, v_base,
            block * BLOCK_N, offs_m, row_in, key_length, stride_kl, stride_vl, left, right, qk_scale,
            BLOCK_N, BLOCK_D, HEAD_DIM, _BAND, DOT_PRECISION)
    for block in range(0, band_start):
        dq, edge_first, edge_last = _dq_key_block(
            dq, edge_first, edge_last, q, do, lse2, delta, table_rows, bias_first, d_table_rows, k_base, v_base,
            block * BLOCK_N, offs_m, row_in, key_length, stride_kl, stride_vl, left, right, qk_scale,
            BLOCK_N, BLOCK_D, HEAD_DIM, _FIRST, DOT_PRECISION)
    for block in range(band_end, num_key_blocks):
        dq, edge_first, edge_last = _dq_key_block(
            dq, edge_first, edge_last, q, do, lse2, delta, table_rows, bias_last, d_table_rows, k_base, v_base,
            block * BLOCK_N, offs_m, row_in, key_length, stride_kl, stride_vl, left, right, qk_scale,
            BLOCK_N, BLOCK_D, HEAD_DIM, _LAST, DOT_PRECISION)
    tl.store(dq_ptrs, dq, mask=dq_mask)
    if NUM_DISTANCES == 1:
        tl.store(d_table_rows, edge_first + edge_last, mask=row_in)
    else:
        tl.store(d_table_rows, edge_first, mask=row_in)
        tl.store(d_table_rows + (NUM_DISTANCES - 1), edge_last, mask=row_in)


# ---------------------------------------------------------------------------------------------- configs
# (BLOCK_M, BLOCK_N, num_warps, num_stages, maxnreg), per input precision: fp16/bf16 ("half") and fp32 (its dots take
# three tf32 products, the operands' high and low halves both in registers). Every config compiles for sm_90a and
# sm_80 at w2v-bert-2.0's shapes (head_dim 64, R = 73), on triton 3.6 and 3.9, with no spill and to registers that let
# >= 12 warps be resident per SM (<= 168 per thread at 4 warps, <= 128 at 8), checked with ptxas
# (benchmarks/compile_check.py, which fails on any config below that).
# Half: larger tiles were dropped: the forward at (64, 64, 4 warps) needs 168 registers on sm_90 but 224 on sm_80;
# (64, 16) fits but its P·V dot issues no tensor-core MMA on sm_90; the dQ pass at (16, 32, 4 warps) spills 4 B on
# triton 3.6 (fp16, odd head sizes).
# fp32: the half tiles need 214-255 registers (8 warps per SM), so 16-row tiles. maxnreg caps where ptxas would
# otherwise take more than it needs: the backward passes at (16, 16, 4 warps) fit in 168 without a spill but are
# given up to 242 uncapped (dQ, sm_80); the forward at (16, 64, 8 warps) fits in 128. Capping the half tiles instead
# spills.
FORWARD_CONFIGS = {
    "half": [(32, 32, 4, 2, None), (32, 64, 4, 2, None), (32, 64, 8, 2, None)],
    "fp32": [(16, 32, 4, 2, None), (16, 64, 8, 2, 128)],
}
DKDV_CONFIGS = {
    "half": [(16, 32, 4, 2, None)],
    "fp32": [(16, 16, 4, 1, 168), (16, 16, 4, 2, 168)],
}
DQ_CONFIGS = {
    "half": [(16, 64, 8, 2, None)],
    "fp32": [(16, 16, 4, 1, 168), (16, 16, 4, 2, 168)],
}
# Under the interpreter (cost per program and per op) one small config keeps CI fast and, with blocks smaller
# than the band, still exercises all three block kinds.
INTERPRETER_CONFIG = (32, 16, 4, 1, None)


def _precision(dot_precision):
    """Which table a launch draws its configs from, by the DOT_PRECISION it passes. ("ieee" is fp64, which runs the
    kernels only under the interpreter, with INTERPRETER_CONFIG: no table is asked.)"""
    return "fp32" if dot_precision == "tf32x3" else "half"


def _triton_config(config):
    block_m, block_n, warps, stages, maxnreg = config
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages,
                         maxnreg=maxnreg)


def _config_of(triton_config):
    c = triton_config
    return (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages, c.maxnreg)


def _configs(tables, interpreted=None):
    """An autotuner's configs: every precision's (``_pruner`` keeps a launch's own), or the interpreter's one."""
    interpreted = triton_interpreter_enabled() if interpreted is None else interpreted
    if interpreted:
        return [_triton_config(INTERPRETER_CONFIG)]
    return [_triton_config(c) for table in tables.values() for c in table]


def _pruner(tables):
    def prune_by_precision(configs, named_args, **kwargs):
        allowed = set(tables[_precision({**named_args, **kwargs}["DOT_PRECISION"])])
        return [c for c in configs if _config_of(c) in allowed]

    return prune_by_precision


def _autotuned(kernel, tables):
    # the autotuner's cache key adds every tensor argument's dtype to these
    return triton.autotune(configs=_configs(tables), key=["LENGTH_BUCKET", "HEAD_DIM", "NUM_DISTANCES"],
                           prune_configs_by={"early_config_prune": _pruner(tables)})(kernel)


_forward_tuned = _autotuned(_forward_kernel, FORWARD_CONFIGS)
_dkdv_tuned = _autotuned(_backward_dkdv_kernel, DKDV_CONFIGS)
# the dQ pass stores into d_table, which the launcher zeroes once: every config writes the same entries with the
# same values, so tuning runs need no reset
_dq_tuned = _autotuned(_backward_dq_kernel, DQ_CONFIGS)


# ----------------------------------------------------------------------------------------------- launchers
_LOG2E = 1.4426950408889634


def _accumulate_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _unit_last_stride(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _bias_table(q, distance_embedding):
    """(B, L, H, R) fp32 (fp64 for fp64 inputs): q_i·E[r] for every row, E rounded to q's dtype first as the
    reference does."""
    dtype = _accumulate_dtype(q.dtype)
    return torch.matmul(q.to(dtype), distance_embedding.to(q.dtype).to(dtype).t())


def _common_meta(q, left, right, lengths, zero_padded_queries):
    head_dim = q.shape[-1]
    return dict(
        LENGTH_BUCKET=triton.next_power_of_2(q.shape[1]), HEAD_DIM=head_dim, NUM_DISTANCES=left + right + 1,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)), HAS_LENGTHS=lengths is not None,
        ZERO_PADDED_QUERIES=bool(zero_padded_queries),
        # fp32: plain tf32 is 1e-3 off transformers' fp32, and "ieee" (no tensor cores) spills tens of KB per
        # thread; three tf32 products recover fp32 accuracy on tensor cores. (fp64 runs only under the interpreter.)
        DOT_PRECISION={torch.float32: "tf32x3", torch.float64: "ieee"}.get(q.dtype, "tf32"),
    )


def _launch_config(config):
    """A (BLOCK_M, BLOCK_N, num_warps, num_stages, maxnreg) tuple as launch keywords (tests run every tuned
    config)."""
    return _triton_config(config).all_kwargs()


def _launch(q, k, v, distance_embedding, left, right, scale, lengths, zero_padded_queries, out=None, lse=None,
            config=None):
    """Forward: (out (B, L, H·D) in q's dtype, lse (B, H, L) fp32). ``out``/``lse``: preallocated buffers (tests
    pass them filled with NaN to catch unwritten rows); ``config``: a FORWARD_CONFIGS tuple, bypassing autotuning."""
    batch, length, heads, head_dim = q.shape
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    table = _bias_table(q, distance_embedding)
    if out is None:
        out = torch.empty(batch, length, heads * head_dim, device=q.device, dtype=q.dtype)
    if lse is None:
        lse = torch.empty(batch, heads, length, device=q.device, dtype=_accumulate_dtype(q.dtype))
    grid = lambda meta: (triton.cdiv(length, meta["BLOCK_M"]), batch * heads)  # noqa: E731
    kernel = _forward_tuned if config is None else _forward_kernel
    kernel[grid](
        q, k, v, table, lengths if lengths is not None else q, out, lse,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        table.stride(0), table.stride(1), table.stride(2),
        length, heads, left, right, scale * _LOG2E,
        **_common_meta(q, left, right, lengths, zero_padded_queries),
        **(_launch_config(config) if config else {}),
    )
    return out, lse


def _launch_backward(grad_out, q, k, v, distance_embedding, out, lse, left, right, scale, lengths,
                     zero_padded_queries, grads=None, dkdv_config=None, dq_config=None):
    """Backward from the forward's output and lse: (dq, dk, dv, d_distance_embedding), each in its input's dtype,
    dq/dk/dv as contiguous (B, L, H, D). ``grads``: preallocated (dq_partial fp32, dk, dv) buffers (tests fill
    them with NaN); ``*_config``: DKDV_CONFIGS / DQ_CONFIGS tuples, bypassing autotuning."""
    batch, length, heads, head_dim = q.shape
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    d_out = _unit_last_stride(grad_out.reshape(batch, length, heads, head_dim))
    acc_dtype = _accumulate_dtype(q.dtype)
    table = _bias_table(q, distance_embedding)
    # Δ = rowsum(dO∘O), (B, H, L); with zero_padded_queries the padded rows' O is 0, so their Δ is too
    delta = (d_out.to(acc_dtype) * out.reshape(batch, length, heads, head_dim).to(acc_dtype)).sum(-1)
    delta = delta.transpose(1, 2).contiguous()
    lse = lse.contiguous()
    if grads is None:
        grads = (torch.empty(batch, length, heads, head_dim, device=q.device, dtype=acc_dtype),
                 torch.empty(batch, length, heads, head_dim, device=q.device, dtype=k.dtype),
                 torch.empty(batch, length, heads, head_dim, device=q.device, dtype=v.dtype))
    dq_partial, dk, dv = grads
    # zero where no key exists for a bucket (j < 0 or past the length) and in padded rows; the dQ pass stores
    # the rest
    d_table = torch.zeros_like(table)
    lengths_arg = lengths if lengths is not None else q
    meta = _common_meta(q, left, right, lengths, zero_padded_queries)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), table.stride(0), table.stride(1), table.stride(2),
               d_out.stride(0), d_out.stride(1), d_out.stride(2))

    grid = lambda meta: (triton.cdiv(length, meta["BLOCK_N"]), batch * heads)  # noqa: E731
    kernel = _dkdv_tuned if dkdv_config is None else _backward_dkdv_kernel
    kernel[grid](q, k, v, table, lengths_arg, d_out, lse, delta, dk, dv, *strides,
                 length, heads, left, right, scale, scale * _LOG2E,
                 **meta, **(_launch_config(dkdv_config) if dkdv_config else {}))

    grid = lambda meta: (triton.cdiv(length, meta["BLOCK_M"]), batch * heads)  # noqa: E731
    kernel = _dq_tuned if dq_config is None else _backward_dq_kernel
    kernel[grid](q, k, v, table, lengths_arg, d_out, lse, delta, dq_partial, d_table, *strides,
                 length, heads, left, right, scale * _LOG2E,
                 **meta, **(_launch_config(dq_config) if dq_config else {}))

    # dq = scale·(dS·K + dT·E), dE = scale·Σ dTᵀ·q: small matmuls over the R columns
    emb = distance_embedding.to(q.dtype).to(acc_dtype)
    num_distances = left + right + 1
    d_table_rows = d_table.view(-1, num_distances)
    dq = torch.addmm(dq_partial.view(-1, head_dim), d_table_rows, emb, beta=scale, alpha=scale)
    d_emb = torch.matmul(d_table_rows.t(), q.reshape(-1, head_dim).to(acc_dtype)) * scale
    return (dq.view(batch, length, heads, head_dim).to(q.dtype), dk, dv, d_emb.to(distance_embedding.dtype))


# --------------------------------------------------------------------------------------- torch.library ops
# ``implementation`` says which code computes the op: "triton" (the kernels above) or "chunked" (the CPU path,
# rel_key_attention_cpu.py). It is an argument, not a global, so the backward always matches the forward that ran.
# Both run with autocast off: an enclosing autocast region (the forward's, or a backward called inside one) would
# otherwise turn the fp32 table and gradient matmuls into half precision ones.
def _cpu_path():
    from . import rel_key_attention_cpu

    return rel_key_attention_cpu


@torch.library.custom_op("w2vbert_fast::rel_key_attention", mutates_args=())
def _rel_key_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, distance_embedding: torch.Tensor, left: int, right: int,
    scale: float, lengths: Optional[torch.Tensor], zero_padded_queries: bool, implementation: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.autocast(q.device.type, enabled=False):
        if implementation == "triton":
            return _launch(q, k, v, distance_embedding, left, right, scale, lengths, zero_padded_queries)
        out, lse = _cpu_path().rel_key_attention_chunked(q, k, v, distance_embedding, left, right, scale, lengths,
                                                         zero_padded_queries)
    return out.contiguous(), lse.contiguous()


@_rel_key_attention_op.register_fake
def _(q, k, v, distance_embedding, left, right, scale, lengths, zero_padded_queries, implementation):
    batch, length, heads, head_dim = q.shape
    return (q.new_empty(batch, length, heads * head_dim),
            q.new_empty(batch, heads, length, dtype=_accumulate_dtype(q.dtype)))


@torch.library.custom_op("w2vbert_fast::rel_key_attention_backward", mutates_args=())
def _rel_key_attention_backward_op(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, distance_embedding: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, left: int, right: int, scale: float, lengths: Optional[torch.Tensor],
    zero_padded_queries: bool, implementation: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    with torch.autocast(q.device.type, enabled=False):
        if implementation == "triton":
            grads = _launch_backward(grad_out, q, k, v, distance_embedding, out, lse, left, right, scale, lengths,
                                     zero_padded_queries)
        else:
            grads = _cpu_path().rel_key_attention_chunked_backward(
                grad_out, q, k, v, distance_embedding, out, lse, left, right, scale, lengths, zero_padded_queries)
    return tuple(g.contiguous() for g in grads)


@_rel_key_attention_backward_op.register_fake
def _(grad_out, q, k, v, distance_embedding, out, lse, left, right, scale, lengths, zero_padded_queries,
      implementation):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            distance_embedding.new_empty(distance_embedding.shape))


def _setup_context(ctx, inputs, output):
    q, k, v, distance_embedding, left, right, scale, lengths, zero_padded_queries, implementation = inputs
    out, lse = output
    # O(B·L·H·D) and O(B·H·L): the probabilities are recomputed from lse, nothing L×L is kept
    ctx.save_for_backward(q, k, v, distance_embedding, out, lse, lengths)
    ctx.arguments = (left, right, scale, zero_padded_queries, implementation)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, distance_embedding, out, lse, lengths = ctx.saved_tensors
    left, right, scale, zero_padded_queries, implementation = ctx.arguments
    dq, dk, dv, d_emb = _rel_key_attention_backward_op(
        grad_out, q, k, v, distance_embedding, out, lse, left, right, scale, lengths, zero_padded_queries,
        implementation)
    return dq, dk, dv, d_emb, None, None, None, None, None, None


_rel_key_attention_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------ dispatch
_MAX_HEAD_DIM = 256
# `auto` on CPU tensors: the chunked O(L) path of rel_key_attention_cpu.py ("torch" here would run the literal
# reference instead)
_AUTO_ON_CPU = "chunked"


def _implementation(q, k, v, distance_embedding):
    """"torch" (the literal reference, plain autograd), "triton" or "chunked". fp64 on a GPU runs the reference: the
    kernels' configs are compiled and checked for fp16, bf16 and fp32 only (fp64 is a numerics check; under the
    interpreter, where CI runs it, the kernels take fp64 too)."""
    if backend() == "torch":
        return "torch"
    if use_triton(q, k, v, distance_embedding):
        if q.dtype == torch.float64 and not triton_interpreter_enabled():
            return "torch"
        return "triton"
    return _AUTO_ON_CPU


def _check_inputs(q, k, v, distance_embedding, left, right, lengths):
    for name, t in (("q", q), ("k", k), ("v", v), ("distance_embedding", distance_embedding)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if q.dim() != 4:
        raise ValueError(f"q must have shape (batch, length, heads, head_dim), got {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{name} must have q's shape {tuple(q.shape)}, got {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise ValueError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
    for name, value in (("left", left), ("right", right)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    expected = (left + right + 1, q.shape[-1])
    if tuple(distance_embedding.shape) != expected:
        raise ValueError(
            f"distance_embedding must have shape (left + right + 1, head_dim) = {expected}, "
            f"got {tuple(distance_embedding.shape)}"
        )
    devices = {t.device for t in (q, k, v, distance_embedding)}
    if lengths is not None:
        check_lengths(lengths, q.shape[0])
        devices.add(lengths.device)
    if len(devices) > 1:
        raise ValueError(f"q, k, v, distance_embedding and lengths must be on one device, got {sorted(map(str, devices))}")
    if lengths is not None and values_checkable(lengths):  # the kernel clamps lengths to [1, L] otherwise
        low, high = int(lengths.min()), int(lengths.max())
        if low < 1 or high > q.shape[1]:
            raise ValueError(f"lengths must lie in [1, {q.shape[1]}] (every sequence needs a key), got [{low}, {high}]")


def rel_key_attention(q, k, v, distance_embedding, left, right, scale, lengths=None, zero_padded_queries=True):
    """Relative-key attention over right-padded sequences, differentiable in q, k, v and distance_embedding.

    q, k, v: (B, L, H, D), any strides (views of the projections' output need no copy);
    distance_embedding: (left + right + 1, D), any float dtype (cast to q's, as transformers does; under autocast
    q/k/v arrive in the autocast dtype and the embedding's gradient comes back in its own dtype);
    left, right: clip distances; scale: softmax scale;
    lengths: optional (B,) integer key lengths in [1, L] (keys at or past a sequence's length are ignored);
    zero_padded_queries: write zeros to query rows at or past the length (True; their incoming gradient is then
    ignored) or compute them like transformers, attending to the valid keys (False; needed when something
    downstream, e.g. the adapter, reads padded rows).
    Returns (B, L, H·D) in q's dtype.

    Backends (``W2VBERT_FAST_BACKEND``): ``triton``, or ``auto`` on CUDA tensors, runs the Triton kernels forward
    and backward; ``auto`` on CPU tensors the chunked PyTorch path (rel_key_attention_cpu.py); ``torch`` the
    literal reference with plain autograd. The first two save only q, k, v, the output and the row log-sum-exp
    for backward: memory stays O(L), in training too.
    """
    _check_inputs(q, k, v, distance_embedding, left, right, lengths)
    implementation = _implementation(q, k, v, distance_embedding)
    if implementation != "torch" and q.numel() > 0:
        if implementation == "triton" and q.shape[-1] > _MAX_HEAD_DIM:
            raise ValueError(f"head_dim must be at most {_MAX_HEAD_DIM} for the Triton kernel, got {q.shape[-1]}")
        if lengths is not None:
            lengths = lengths.to(torch.int32)
        out, _ = _rel_key_attention_op(q, k, v, distance_embedding, left, right, float(scale), lengths,
                                       bool(zero_padded_queries), implementation)
        return out
    key_mask = None
    if lengths is not None:
        key_mask = torch.arange(q.shape[1], device=q.device)[None, :] < lengths.to(q.device)[:, None]
    out = rel_key_attention_reference(q, k, v, distance_embedding, left, right, scale, key_mask)
    if key_mask is not None and zero_padded_queries:
        out = out.masked_fill(~key_mask[..., None], 0)
    return out
