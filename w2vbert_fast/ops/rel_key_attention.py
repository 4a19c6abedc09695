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

Reading order (every op file's): reference → kernels → configs → launcher → torch.library ops → dispatch →
LAUNCH_META. The three kernels share their index arithmetic (@triton.jit helpers) and the band loop
(``_band_loop``, which runs a kernel's per-block step over the three ranges).
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from ._backend import (REFERENCE, TRITON, KernelLaunch, check_lengths, checks_values, dispatch,
                       triton_interpreter_enabled, values_checkable)


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
# Kinds of block of the other operand (keys in the forward and dQ pass, queries in the dK/dV pass): where its bias
# comes from in the table.
_BAND = tl.constexpr(0)  # straddles the band: per-element gather
_FIRST = tl.constexpr(1)  # every pair has j - i <= -left: column 0
_LAST = tl.constexpr(2)  # every pair has j - i >= right: column R - 1


@triton.jit
def _batch_and_head(heads):
    """Axis 1 of every grid runs over batch × heads: (that index, the batch, the head)."""
    batch_head = tl.program_id(1)
    return batch_head, batch_head // heads, batch_head % heads


@triton.jit
def _sequence_lengths(lengths_ptr, b, length, HAS_LENGTHS: tl.constexpr, ZERO_PADDED_QUERIES: tl.constexpr):
    """(keys, queries that carry a gradient) of sequence b. Keys: its length clamped to [1, length], so unchecked
    lengths stay in bounds. Queries: the same with zero_padded_queries (the padded rows' output is the constant 0:
    their dO reaches nothing), every row otherwise."""
    key_length = length
    if HAS_LENGTHS:
        key_length = tl.minimum(tl.maximum(tl.load(lengths_ptr + b).to(tl.int32), 1), length)
    query_length = length
    if ZERO_PADDED_QUERIES:
        query_length = key_length
    return key_length, query_length


@triton.jit
def _head_base(ptr, b, h, stride_b, stride_h):
    """Where sequence b, head h of a (B, L, H, ·) tensor starts (int64: a batch's offset can pass 2³¹)."""
    return ptr + b.to(tl.int64) * stride_b + h * stride_h


@triton.jit
def _head_offset(b, h, stride_b, stride_h):
    """The same as an offset, for tensors that share strides (the table and its gradient)."""
    return b.to(tl.int64) * stride_b + h * stride_h


@triton.jit
def _load_tile(base, rows, stride, row_mask, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr):
    """A program's own (rows, BLOCK_D) tile, loaded once: zero outside ``row_mask`` and past HEAD_DIM."""
    offs_d = tl.arange(0, BLOCK_D)
    return tl.load(base + rows[:, None].to(tl.int64) * stride + offs_d[None, :],
                   mask=row_mask[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)


@triton.jit
def _load_rows(base, rows, stride, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr):
    """A (rows, BLOCK_D) tile of the other operand, inside the loop. Callers clamp ``rows`` into the sequence instead
    of masking them (what a masked row would contribute is zeroed downstream), and int32 offsets: both cost registers
    the MMA operands need. (Row × stride stays below 2³¹ up to ~700,000 frames of a fused 3 × 1024-wide projection.)"""
    offs_d = tl.arange(0, BLOCK_D)
    if BLOCK_D == HEAD_DIM:
        return tl.load(base + rows[:, None] * stride + offs_d[None, :])
    return tl.load(base + rows[:, None] * stride + offs_d[None, :], mask=offs_d[None, :] < HEAD_DIM, other=0.0)


@triton.jit
def _output_tile(b, h, rows, length, heads, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr):
    """(offsets, mask) of a (rows, BLOCK_D) tile of a contiguous (B, L, H, D) output (out, dq, dk, dv)."""
    offs_d = tl.arange(0, BLOCK_D)
    offsets = (b.to(tl.int64) * length + rows[:, None]) * (heads * HEAD_DIM) + h * HEAD_DIM + offs_d[None, :]
    return offsets, (rows[:, None] < length) & (offs_d[None, :] < HEAD_DIM)


@triton.jit
def _program_block(lengths_ptr, length, heads, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
                   HAS_LENGTHS: tl.constexpr, ZERO_PADDED_QUERIES: tl.constexpr):
    """Where a program stands, alike in every kernel: its first row and its BLOCK rows along axis 0 of the grid (query
    rows in the forward and the dQ pass, key rows in the dK/dV pass), its (batch × head, batch, head), the sequence's
    (key, gradient-carrying query) lengths, and the (offsets, mask) of its rows' tile in a (B, L, H, D) output."""
    start = tl.program_id(0) * BLOCK
    batch_head, b, h = _batch_and_head(heads)
    offs = start + tl.arange(0, BLOCK)
    key_length, query_length = _sequence_lengths(lengths_ptr, b, length, HAS_LENGTHS, ZERO_PADDED_QUERIES)
    tile_offsets, tile_mask = _output_tile(b, h, offs, length, heads, BLOCK_D, HEAD_DIM)
    return start, batch_head, b, h, offs, key_length, query_length, tile_offsets, tile_mask


@triton.jit
def _table_block(table_base, rows, length, stride_tl, NUM_DISTANCES: tl.constexpr):
    """A query block's table rows, for the whole key loop (forward, dQ pass), and their two edge columns: the bias of
    every key block wholly outside the band. Rows past the end read the last row's, so every gather stays in bounds
    without a mask."""
    table_rows = table_base + tl.minimum(rows, length - 1) * stride_tl
    return table_rows, tl.load(table_rows), tl.load(table_rows + (NUM_DISTANCES - 1))


@triton.jit
def _relative_bias(table_rows, relative, edge, left, right, KIND: tl.constexpr):
    """The bias of a tile of (query i, key j) pairs ``relative`` = j − i apart, ``table_rows`` (each pair's row of the
    table) and ``edge`` broadcast to the tile: gathered per pair where the block straddles the band, else the block's
    one edge column."""
    if KIND == _BAND:
        bias = tl.load(table_rows + (tl.minimum(tl.maximum(relative, -left), right) + left))
    else:
        bias = edge
    return bias


@triton.jit
def _band_loop(STEP: tl.constexpr, state, context, start, extent, reach_back, reach_ahead, OWN: tl.constexpr,
               BLOCK: tl.constexpr, BEHIND: tl.constexpr, AHEAD: tl.constexpr, BLOCK_D: tl.constexpr,
               HEAD_DIM: tl.constexpr, NUM_DISTANCES: tl.constexpr, DOT_PRECISION: tl.constexpr,
               HAS_KEY_MASK: tl.constexpr):
    """``state = STEP(state, context, block_start, KIND, BLOCK, ...)`` over the blocks of BLOCK rows of the other
    operand (the first ``extent`` rows: blocks past a sequence's length are skipped, not masked) that the program's
    OWN rows from ``start`` meet. Three ranges partition them: the blocks that straddle the band first (KIND _BAND),
    then those wholly behind it (every pair's other row at least ``reach_back`` before its own row: KIND BEHIND),
    then those wholly ahead (at least ``reach_ahead`` after: KIND AHEAD). ``context``: the step's loop-invariant
    tensors and scalars (a tuple; the constexprs follow it as arguments, a tuple cannot hold them)."""
    num_blocks = tl.cdiv(extent, BLOCK)
    # the first block with a row past start - reach_back, and the first whose first row is at least reach_ahead
    # after the last own row
    band_start = tl.minimum(tl.maximum(start - reach_back + 1, 0) // BLOCK, num_blocks)
    band_end = tl.maximum(tl.minimum((start + OWN - 1 + reach_ahead + BLOCK - 1) // BLOCK, num_blocks), band_start)
    for block in range(band_start, band_end):
        state = STEP(state, context, block * BLOCK, _BAND, BLOCK, BLOCK_D, HEAD_DIM, NUM_DISTANCES, DOT_PRECISION,
                     HAS_KEY_MASK)
    for block in range(0, band_start):
        state = STEP(state, context, block * BLOCK, BEHIND, BLOCK, BLOCK_D, HEAD_DIM, NUM_DISTANCES, DOT_PRECISION,
                     HAS_KEY_MASK)
    for block in range(band_end, num_blocks):
        state = STEP(state, context, block * BLOCK, AHEAD, BLOCK, BLOCK_D, HEAD_DIM, NUM_DISTANCES, DOT_PRECISION,
                     HAS_KEY_MASK)
    return state


@triton.jit
def _valid_keys(offs_n, key_length, mask_base, HAS_KEY_MASK: tl.constexpr):
    """Which keys ``offs_n`` are attended: before the sequence's length and, with a key mask, marked real in it (one
    byte per frame)."""
    key_valid = offs_n < key_length
    if HAS_KEY_MASK:
        # (clamped into the sequence instead of masked, as the key rows are: fewer registers)
        key_valid = key_valid & (tl.load(mask_base + tl.minimum(offs_n, key_length - 1)) != 0)
    return key_valid


@triton.jit
def _key_block_scores(q, k, offs_m, offs_n, table_rows, bias_first, bias_last, left, right, KIND: tl.constexpr,
                      DOT_PRECISION: tl.constexpr):
    """(raw scores q·(k + E), the pairs' j − i) of query rows ``offs_m`` against keys ``offs_n`` (forward, dQ
    pass)."""
    relative = offs_n[None, :] - offs_m[:, None]
    edge = bias_first if KIND == _FIRST else bias_last
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    return scores + _relative_bias(table_rows[:, None], relative, edge[:, None], left, right, KIND), relative


@triton.jit
def _attend_key_block(state, context, start_n, KIND: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                      HEAD_DIM: tl.constexpr, NUM_DISTANCES: tl.constexpr, DOT_PRECISION: tl.constexpr,
                      HAS_KEY_MASK: tl.constexpr):
    """Forward: one step of the online softmax over keys [start_n, start_n + BLOCK_N). state: (acc, m_i, l_i)."""
    acc, m_i, l_i = state
    (q, offs_m, table_rows, bias_first, bias_last, k_base, v_base, mask_base, key_length, stride_kl, stride_vl, left,
     right, qk_scale) = context
    offs_n = start_n + tl.arange(0, BLOCK_N)
    # (the mask before the loads: where it is used instead, ptxas on triton 3.6 takes 1-23 registers more on sm_90a)
    key_valid = _valid_keys(offs_n, key_length, mask_base, HAS_KEY_MASK)
    # keys past the length read the last valid key: finite, and their probability is set to 0 below
    rows = tl.minimum(offs_n, key_length - 1)
    k = _load_rows(k_base, rows, stride_kl, BLOCK_D, HEAD_DIM)
    scores, _ = _key_block_scores(q, k, offs_m, offs_n, table_rows, bias_first, bias_last, left, right, KIND,
                                  DOT_PRECISION)
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
    q_ptr, k_ptr, v_ptr, table_ptr, lengths_ptr, key_mask_ptr, out_ptr, lse_ptr,
    stride_qb, stride_ql, stride_qh,
    stride_kb, stride_kl, stride_kh,
    stride_vb, stride_vl, stride_vh,
    stride_tb, stride_tl, stride_th,
    length, heads, left, right, qk_scale,
    LENGTH_BUCKET,  # next power of two of length: the autotune key, so ragged bulk jobs do not retune per length
    HEAD_DIM: tl.constexpr, NUM_DISTANCES: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, HAS_KEY_MASK: tl.constexpr, ZERO_PADDED_QUERIES: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_m, batch_head, b, h, offs_m, key_length, _, out_offsets, out_mask = _program_block(
        lengths_ptr, length, heads, BLOCK_M, BLOCK_D, HEAD_DIM, HAS_LENGTHS, ZERO_PADDED_QUERIES)
    row_in = offs_m < length
    out_ptrs = out_ptr + out_offsets
    lse_ptrs = lse_ptr + batch_head.to(tl.int64) * length + offs_m

    if ZERO_PADDED_QUERIES and start_m >= key_length:
        # the whole query block is padding: nothing reads it but it must not be left uninitialised
        tl.store(out_ptrs, tl.zeros([BLOCK_M, BLOCK_D], dtype=out_ptr.dtype.element_ty), mask=out_mask)
        tl.store(lse_ptrs, tl.zeros([BLOCK_M], dtype=lse_ptr.dtype.element_ty), mask=row_in)
        return

    k_base = _head_base(k_ptr, b, h, stride_kb, stride_kh)
    v_base = _head_base(v_ptr, b, h, stride_vb, stride_vh)
    mask_base = key_mask_ptr + b.to(tl.int64) * length
    q = _load_tile(_head_base(q_ptr, b, h, stride_qb, stride_qh), offs_m, stride_ql, row_in, BLOCK_D, HEAD_DIM)
    table_rows, bias_first, bias_last = _table_block(_head_base(table_ptr, b, h, stride_tb, stride_th), offs_m, length,
                                                     stride_tl, NUM_DISTANCES)
    context = (q, offs_m, table_rows, bias_first, bias_last, k_base, v_base, mask_base, key_length, stride_kl,
               stride_vl, left, right, qk_scale)
    if HAS_KEY_MASK:
        # A key block may be wholly masked for every row (holes), the first one processed included: a finite start
        # keeps the running max finite through such blocks (alpha = 1, p = 0) where -inf would give
        # exp2(-inf + inf) = NaN; the first real score then wipes it (alpha = 0).
        m_start = -1.0e30
    else:
        # The band's blocks come first: the first of them holds a valid key (band_start < the block count when the
        # band is not empty; block 0 otherwise), seen by every row, so the running max is finite from the first
        # step on.
        m_start = float("-inf")
    state = (tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32), tl.full([BLOCK_M], m_start, dtype=tl.float32),
             tl.zeros([BLOCK_M], dtype=tl.float32))
    acc, m_i, l_i = _band_loop(_attend_key_block, state, context, start_m, key_length, left, right, BLOCK_M,
                               BLOCK_N, _FIRST, _LAST, BLOCK_D, HEAD_DIM, NUM_DISTANCES, DOT_PRECISION, HAS_KEY_MASK)

    # natural log of Σ_j exp(scaled score): m_i and l_i are in base 2
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
    if HAS_KEY_MASK:
        # a row with no real key (the caller's error) sums nothing: output 0, and lse +inf so that the backward's
        # P = exp(s - lse) is 0 there; with zero_padded_queries the same for the rows past the length (masked rows
        # before it are computed, as transformers computes them)
        has_key = l_i > 0.0
        if ZERO_PADDED_QUERIES:
            has_key = has_key & (offs_m < key_length)
        out = tl.where(has_key[:, None], acc / tl.where(has_key, l_i, 1.0)[:, None], 0.0)
        lse = tl.where(has_key, lse, float("inf"))
    else:
        out = acc / l_i[:, None]
        if ZERO_PADDED_QUERIES:
            out = tl.where(offs_m[:, None] < key_length, out, 0.0)
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=out_mask)
    tl.store(lse_ptrs, lse.to(lse_ptr.dtype.element_ty), mask=row_in)


@triton.jit
def _dkdv_query_block(state, context, start_m, KIND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                      HEAD_DIM: tl.constexpr, NUM_DISTANCES: tl.constexpr, DOT_PRECISION: tl.constexpr,
                      HAS_KEY_MASK: tl.constexpr):
    """dK/dV pass: queries [start_m, start_m + BLOCK_M)'s share of one key block's dk and dv (transposed tiles: keys
    along rows). state: (dk, dv)."""
    dk, dv = state
    (k, v, offs_n, key_valid, q_base, do_base, lse_base, delta_base, table_base, query_length, length, stride_ql,
     stride_dol, stride_tl, left, right, qk_scale) = context
    offs_m = start_m + tl.arange(0, BLOCK_M)
    # rows that carry a gradient; the rest get lse = +inf, so P = 0 (and dS = 0) there whatever was saved for them
    # (with a key mask the forward saved +inf itself for masked and keyless rows)
    row_live = offs_m < query_length
    rows = tl.minimum(offs_m, length - 1)
    q = _load_rows(q_base, rows, stride_ql, BLOCK_D, HEAD_DIM)
    do = _load_rows(do_base, rows, stride_dol, BLOCK_D, HEAD_DIM)
    lse2 = tl.load(lse_base + offs_m, mask=row_live, other=float("inf")) * 1.4426950408889634
    delta = tl.load(delta_base + offs_m, mask=row_live, other=0.0)
    table_rows = table_base + rows * stride_tl
    edge = tl.load(table_rows + (0 if KIND == _FIRST else NUM_DISTANCES - 1))
    scores = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
    scores += _relative_bias(table_rows[None, :], offs_n[:, None] - offs_m[None, :], edge[None, :], left, right, KIND)
    p = tl.math.exp2(scores * qk_scale - lse2[None, :])
    p = tl.where(key_valid[:, None], p, 0.0)
    dv += tl.dot(p.to(do.dtype), do, input_precision=DOT_PRECISION)
    dp = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    ds = p * (dp - delta[None, :])
    dk += tl.dot(ds.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _backward_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, table_ptr, lengths_ptr, key_mask_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    stride_qb, stride_ql, stride_qh,
    stride_kb, stride_kl, stride_kh,
    stride_vb, stride_vl, stride_vh,
    stride_tb, stride_tl, stride_th,
    stride_dob, stride_dol, stride_doh,
    length, heads, left, right, scale, qk_scale,
    LENGTH_BUCKET,
    HEAD_DIM: tl.constexpr, NUM_DISTANCES: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, HAS_KEY_MASK: tl.constexpr, ZERO_PADDED_QUERIES: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_n, batch_head, b, h, offs_n, key_length, query_length, grad_offsets, grad_mask = _program_block(
        lengths_ptr, length, heads, BLOCK_N, BLOCK_D, HEAD_DIM, HAS_LENGTHS, ZERO_PADDED_QUERIES)
    if start_n >= key_length:
        # padded keys get no gradient
        tl.store(dk_ptr + grad_offsets, tl.zeros([BLOCK_N, BLOCK_D], dtype=dk_ptr.dtype.element_ty), mask=grad_mask)
        tl.store(dv_ptr + grad_offsets, tl.zeros([BLOCK_N, BLOCK_D], dtype=dv_ptr.dtype.element_ty), mask=grad_mask)
        return

    key_in = offs_n < key_length
    k = _load_tile(_head_base(k_ptr, b, h, stride_kb, stride_kh), offs_n, stride_kl, key_in, BLOCK_D, HEAD_DIM)
    v = _load_tile(_head_base(v_ptr, b, h, stride_vb, stride_vh), offs_n, stride_vl, key_in, BLOCK_D, HEAD_DIM)
    # masked keys get no gradient: their P is 0 for every query (the loads above do not wait for the mask: on sm_80
    # fp32 that costs a spill)
    key_valid = _valid_keys(offs_n, key_length, key_mask_ptr + b.to(tl.int64) * length, HAS_KEY_MASK)
    context = (k, v, offs_n, key_valid, _head_base(q_ptr, b, h, stride_qb, stride_qh),
               _head_base(do_ptr, b, h, stride_dob, stride_doh), lse_ptr + batch_head.to(tl.int64) * length,
               delta_ptr + batch_head.to(tl.int64) * length, _head_base(table_ptr, b, h, stride_tb, stride_th),
               query_length, length, stride_ql, stride_dol, stride_tl, left, right, qk_scale)
    state = (tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32), tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32))
    # The forward's ranges seen from a key block: query blocks wholly before it by at least right (j - i >= right)
    # read column R - 1, those wholly after it by at least left (j - i <= -left) column 0.
    dk, dv = _band_loop(_dkdv_query_block, state, context, start_n, query_length, right, left, BLOCK_N, BLOCK_M,
                        _LAST, _FIRST, BLOCK_D, HEAD_DIM, NUM_DISTANCES, DOT_PRECISION, HAS_KEY_MASK)
    tl.store(dk_ptr + grad_offsets, (dk * scale).to(dk_ptr.dtype.element_ty), mask=grad_mask)
    tl.store(dv_ptr + grad_offsets, dv.to(dv_ptr.dtype.element_ty), mask=grad_mask)


@triton.jit
def _dq_key_block(state, context, start_n, KIND: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  HEAD_DIM: tl.constexpr, NUM_DISTANCES: tl.constexpr, DOT_PRECISION: tl.constexpr,
                  HAS_KEY_MASK: tl.constexpr):
    """dQ pass: one key block's share of a query block's dq and of its table gradient's edge columns; band entries
    are stored straight into d_table. state: (dq, edge_first, edge_last)."""
    dq, edge_first, edge_last = state
    (q, do, lse2, delta, offs_m, row_in, table_rows, bias_first, bias_last, d_table_rows, k_base, v_base, mask_base,
     key_length, stride_kl, stride_vl, left, right, qk_scale) = context
    offs_n = start_n + tl.arange(0, BLOCK_N)
    rows = tl.minimum(offs_n, key_length - 1)
    k = _load_rows(k_base, rows, stride_kl, BLOCK_D, HEAD_DIM)
    v = _load_rows(v_base, rows, stride_vl, BLOCK_D, HEAD_DIM)
    # masked keys: P = 0, so dS = 0 and their table entries stay as the launcher zeroed them (the mask after the
    # key loads: before them, the key-mask build at (16, 64, 8 warps) spills 20 B on sm_90a at odd head sizes)
    key_valid = _valid_keys(offs_n, key_length, mask_base, HAS_KEY_MASK)
    scores, relative = _key_block_scores(q, k, offs_m, offs_n, table_rows, bias_first, bias_last, left, right, KIND,
                                         DOT_PRECISION)
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
    q_ptr, k_ptr, v_ptr, table_ptr, lengths_ptr, key_mask_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, d_table_ptr,
    stride_qb, stride_ql, stride_qh,
    stride_kb, stride_kl, stride_kh,
    stride_vb, stride_vl, stride_vh,
    stride_tb, stride_tl, stride_th,
    stride_dob, stride_dol, stride_doh,
    length, heads, left, right, qk_scale,
    LENGTH_BUCKET,
    HEAD_DIM: tl.constexpr, NUM_DISTANCES: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, HAS_KEY_MASK: tl.constexpr, ZERO_PADDED_QUERIES: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Writes dS·K (unscaled, fp32) to dq and the table gradient's edge columns and band entries to d_table."""
    start_m, batch_head, b, h, offs_m, key_length, query_length, dq_offsets, dq_mask = _program_block(
        lengths_ptr, length, heads, BLOCK_M, BLOCK_D, HEAD_DIM, HAS_LENGTHS, ZERO_PADDED_QUERIES)
    # (the pointers before the branch, not in each store: 160 registers instead of 128 on sm_80 otherwise)
    dq_ptrs = dq_ptr + dq_offsets
    if start_m >= query_length:
        # padded rows whose output is the constant 0 (their d_table rows stay as the launcher zeroed them)
        tl.store(dq_ptrs, tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32), mask=dq_mask)
        return

    row_in = offs_m < length
    row_live = offs_m < query_length
    q = _load_tile(_head_base(q_ptr, b, h, stride_qb, stride_qh), offs_m, stride_ql, row_in, BLOCK_D, HEAD_DIM)
    do = _load_tile(_head_base(do_ptr, b, h, stride_dob, stride_doh), offs_m, stride_dol, row_live, BLOCK_D, HEAD_DIM)
    lse2 = tl.load(lse_ptr + batch_head.to(tl.int64) * length + offs_m, mask=row_live,
                   other=float("inf")) * 1.4426950408889634
    delta = tl.load(delta_ptr + batch_head.to(tl.int64) * length + offs_m, mask=row_live, other=0.0)
    # one offset for the table and its gradient, and these loads in this order: other orders cost 17-33 registers
    # (16 × 64 tiles) or spill 4 B (fp32, 2 stages) on sm_90a
    table_offset = _head_offset(b, h, stride_tb, stride_th)
    d_table_rows = d_table_ptr + table_offset + offs_m * stride_tl
    table_rows, bias_first, bias_last = _table_block(table_ptr + table_offset, offs_m, length, stride_tl,
                                                     NUM_DISTANCES)
    context = (q, do, lse2, delta, offs_m, row_in, table_rows, bias_first, bias_last, d_table_rows,
               _head_base(k_ptr, b, h, stride_kb, stride_kh), _head_base(v_ptr, b, h, stride_vb, stride_vh),
               key_mask_ptr + b.to(tl.int64) * length, key_length, stride_kl, stride_vl, left, right, qk_scale)
    state = (tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32), tl.zeros([BLOCK_M], dtype=tl.float32),
             tl.zeros([BLOCK_M], dtype=tl.float32))
    dq, edge_first, edge_last = _band_loop(_dq_key_block, state, context, start_m, key_length, left, right, BLOCK_M,
                                           BLOCK_N, _FIRST, _LAST, BLOCK_D, HEAD_DIM, NUM_DISTANCES, DOT_PRECISION,
                                           HAS_KEY_MASK)
    tl.store(dq_ptrs, dq, mask=dq_mask)
    if NUM_DISTANCES == 1:
        tl.store(d_table_rows, edge_first + edge_last, mask=row_in)
    else:
        tl.store(d_table_rows, edge_first, mask=row_in)
        tl.store(d_table_rows + (NUM_DISTANCES - 1), edge_last, mask=row_in)


# ---------------------------------------------------------------------------------------------- configs
# Per input precision: fp16/bf16 ("half") and fp32 (its dots take three tf32 products, the operands' high and low
# halves both in registers). Every config compiles for sm_90a and sm_80 at w2v-bert-2.0's shapes (head_dim 64,
# R = 73), on triton 3.6 and 3.9, with no spill and to registers that let >= 12 warps be resident per SM (<= 168 per
# thread at 4 warps, <= 128 at 8), checked with ptxas (benchmarks/tools/compile_check.py, which fails on any config
# below that). Best first: the campaign's autotune cap keeps each precision's first ones.
# Half: larger tiles were dropped: the forward at (64, 64, 4 warps) needs 168 registers on sm_90 but 224 on sm_80;
# (64, 16) fits but its P·V dot issues no tensor-core MMA on sm_90; the dQ pass at (16, 32, 4 warps) spills 4 B on
# triton 3.6 (fp16, odd head sizes).
# fp32: the half tiles need 214-255 registers (8 warps per SM), so 16-row tiles. maxnreg caps where ptxas would
# otherwise take more than it needs: the backward passes at (16, 16, 4 warps) fit in 168 without a spill but are
# given up to 242 uncapped (dQ, sm_80); the forward at (16, 64, 8 warps) fits in 128. Capping the half forward tiles
# instead spills.
_FORWARD_HALF = [
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_warps=8, num_stages=2),
]
_FORWARD_FP32 = [
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 64}, num_warps=8, num_stages=2, maxnreg=128),
]
# fp32's backward passes share their tiles
_BACKWARD_FP32 = [
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1, maxnreg=168),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=2, maxnreg=168),
]
# The key-mask build (HAS_KEY_MASK: left padding, holes) is its own compile with its own registers; where a tile does
# not fit it (triton 3.6), its table keeps the rest, under "<precision>+key_mask": the forward at (32, 64, 8 warps)
# half takes 163 registers on sm_80 (8 warps per SM) and at (16, 64, 8 warps) fp32 spills 8-16 B; the fp32 dQ pass
# with one stage spills 8 B.
FORWARD_CONFIGS = {
    "half": _FORWARD_HALF,
    "fp32": _FORWARD_FP32,
    "half+key_mask": _FORWARD_HALF[:2],
    "fp32+key_mask": _FORWARD_FP32[:1],
}
DKDV_CONFIGS = {
    "half": [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=2)],
    "fp32": _BACKWARD_FP32,
}
DQ_CONFIGS = {
    # maxnreg: the key-mask build takes 169 registers on sm_80 uncapped (8 warps per SM) and spills 8 B on sm_90a
    # at odd head sizes (triton 3.9); capped at 128 it fits with no spill on sm_80/86/89/90a (the build without a
    # mask needs <= 128 anyway)
    "half": [triton.Config({"BLOCK_M": 16, "BLOCK_N": 64}, num_warps=8, num_stages=2, maxnreg=128)],
    "fp32": _BACKWARD_FP32,
    "fp32+key_mask": _BACKWARD_FP32[1:],
}
# Under the interpreter (cost per program and per op) one small config keeps CI fast and, with blocks smaller
# than the band, still exercises all three block kinds.
INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1)


def _dot_precision(dtype):
    """The kernels' DOT_PRECISION for inputs of ``dtype``. fp32: plain tf32 is 1e-3 off transformers' fp32, and
    "ieee" (no tensor cores) spills tens of KB per thread; three tf32 products recover fp32 accuracy on tensor cores.
    (fp64 runs only under the interpreter.)"""
    return {torch.float32: "tf32x3", torch.float64: "ieee"}.get(dtype, "tf32")


def _precision(dot_precision):
    """Which table a launch draws its configs from, by the DOT_PRECISION it passes. ("ieee" is fp64, which runs the
    kernels only under the interpreter, with INTERPRETER_CONFIG: no table is asked.)"""
    return "fp32" if dot_precision == "tf32x3" else "half"


def _table(tables, dot_precision, has_key_mask):
    """The configs of a launch with this DOT_PRECISION and key-mask flag: its precision's table, or the key-mask
    build's own where it has one."""
    precision = _precision(dot_precision)
    return tables.get(precision + "+key_mask", tables[precision]) if has_key_mask else tables[precision]


def _gpu_configs(tables, dtype, has_key_mask=False):
    """The configs a GPU launch with inputs of ``dtype`` may run."""
    return _table(tables, _dot_precision(dtype), has_key_mask)


def _configs(tables, interpreted=None):
    """An autotuner's configs: every table's, each once (``_pruner`` keeps a launch's own), or the interpreter's
    one."""
    interpreted = triton_interpreter_enabled() if interpreted is None else interpreted
    if interpreted:
        return [INTERPRETER_CONFIG]
    return list({id(c): c for table in tables.values() for c in table}.values())


def _pruner(tables):
    def prune_by_precision(configs, named_args, **kwargs):
        named = {**named_args, **kwargs}
        allowed = [c.all_kwargs() for c in _table(tables, named["DOT_PRECISION"], named.get("HAS_KEY_MASK", False))]
        return [c for c in configs if c.all_kwargs() in allowed]

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


# ----------------------------------------------------------------------------------------------- launcher
# The launcher builds each kernel's arguments by name (``_forward_arguments``, ``_backward_arguments``); the compile
# check gets its example arguments from the same functions, called on meta tensors (``LAUNCH_META`` below).
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


def _common_meta(q, left, right, lengths, zero_padded_queries, key_mask=None):
    head_dim = q.shape[-1]
    return dict(
        LENGTH_BUCKET=triton.next_power_of_2(q.shape[1]), HEAD_DIM=head_dim, NUM_DISTANCES=left + right + 1,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)), HAS_LENGTHS=lengths is not None,
        HAS_KEY_MASK=key_mask is not None, ZERO_PADDED_QUERIES=bool(zero_padded_queries),
        DOT_PRECISION=_dot_precision(q.dtype),
    )


def _mask_bytes(key_mask):
    """The (B, L) bool key mask as the kernels read it: one contiguous uint8 per frame (a view, no copy, when the
    mask is contiguous)."""
    return key_mask.contiguous().view(torch.uint8)


def _strides(name, t):
    """A (B, L, H, ·) tensor's batch, row and head strides, as the kernels name them."""
    return {f"stride_{name}b": t.stride(0), f"stride_{name}l": t.stride(1), f"stride_{name}h": t.stride(2)}


def _shared_arguments(q, k, v, table, lengths, left, right, scale, zero_padded_queries, key_mask):
    """What every kernel takes: the inputs, the table, the sizes and the constexprs (all but a config's)."""
    return dict(q_ptr=q, k_ptr=k, v_ptr=v, table_ptr=table, lengths_ptr=lengths if lengths is not None else q,
                key_mask_ptr=_mask_bytes(key_mask) if key_mask is not None else q,
                **_strides("q", q), **_strides("k", k), **_strides("v", v), **_strides("t", table),
                length=q.shape[1], heads=q.shape[2], left=left, right=right, qk_scale=scale * _LOG2E,
                **_common_meta(q, left, right, lengths, zero_padded_queries, key_mask))


def _forward_arguments(q, k, v, distance_embedding, left, right, scale, lengths, zero_padded_queries, out=None,
                       lse=None, key_mask=None):
    """The forward kernel's arguments by name. ``out``/``lse``: preallocated buffers (tests pass them filled with NaN
    to catch unwritten rows); ``key_mask``: optional (B, L) bool, True = a real frame."""
    batch, length, heads, head_dim = q.shape
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    if out is None:
        out = torch.empty(batch, length, heads * head_dim, device=q.device, dtype=q.dtype)
    if lse is None:
        lse = torch.empty(batch, heads, length, device=q.device, dtype=_accumulate_dtype(q.dtype))
    return dict(_shared_arguments(q, k, v, _bias_table(q, distance_embedding), lengths, left, right, scale,
                                  zero_padded_queries, key_mask), out_ptr=out, lse_ptr=lse)


def _backward_arguments(grad_out, q, k, v, distance_embedding, out, lse, left, right, scale, lengths,
                        zero_padded_queries, grads=None, key_mask=None):
    """(the dK/dV pass's arguments, the dQ pass's) by name. ``grads``: preallocated (dq_partial fp32, dk, dv)
    buffers (tests fill them with NaN)."""
    batch, length, heads, head_dim = q.shape
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    d_out = _unit_last_stride(grad_out.reshape(batch, length, heads, head_dim))
    acc_dtype = _accumulate_dtype(q.dtype)
    table = _bias_table(q, distance_embedding)
    # Δ = rowsum(dO∘O), (B, H, L); with zero_padded_queries the padded rows' O is 0, so their Δ is too
    delta = (d_out.to(acc_dtype) * out.reshape(batch, length, heads, head_dim).to(acc_dtype)).sum(-1)
    if grads is None:
        grads = (torch.empty(batch, length, heads, head_dim, device=q.device, dtype=acc_dtype),
                 torch.empty(batch, length, heads, head_dim, device=q.device, dtype=k.dtype),
                 torch.empty(batch, length, heads, head_dim, device=q.device, dtype=v.dtype))
    dq_partial, dk, dv = grads
    # zero where no key exists for a bucket (j < 0 or past the length) and in padded rows; the dQ pass stores
    # the rest
    d_table = torch.zeros_like(table)
    shared = dict(_shared_arguments(q, k, v, table, lengths, left, right, scale, zero_padded_queries, key_mask),
                  do_ptr=d_out,
                  lse_ptr=lse.contiguous(), delta_ptr=delta.transpose(1, 2).contiguous(), **_strides("do", d_out))
    return (dict(shared, dk_ptr=dk, dv_ptr=dv, scale=scale), dict(shared, dq_ptr=dq_partial, d_table_ptr=d_table))


def _run(tuned, kernel, arguments, config, rows):
    """Launch over (blocks of ``rows``, batch × heads): through the autotuner, or ``kernel`` with ``config`` (a
    triton.Config: tests run every tuned one)."""
    batch_heads = arguments["q_ptr"].shape[0] * arguments["heads"]
    grid = lambda meta: (triton.cdiv(arguments["length"], meta[rows]), batch_heads)  # noqa: E731
    if config is None:
        tuned[grid](**arguments)
    else:
        kernel[grid](**arguments, **config.all_kwargs())


def _launch(q, k, v, distance_embedding, left, right, scale, lengths, zero_padded_queries, out=None, lse=None,
            config=None, key_mask=None):
    """Forward: (out (B, L, H·D) in q's dtype, lse (B, H, L) fp32: +inf in rows that take no gradient where a key mask
    is given). ``out``/``lse``/``key_mask``: see ``_forward_arguments``; ``config``: one of FORWARD_CONFIGS (a
    triton.Config), bypassing autotuning."""
    arguments = _forward_arguments(q, k, v, distance_embedding, left, right, scale, lengths, zero_padded_queries, out,
                                   lse, key_mask)
    _run(_forward_tuned, _forward_kernel, arguments, config, "BLOCK_M")
    return arguments["out_ptr"], arguments["lse_ptr"]


def _launch_backward(grad_out, q, k, v, distance_embedding, out, lse, left, right, scale, lengths,
                     zero_padded_queries, grads=None, dkdv_config=None, dq_config=None, key_mask=None):
    """Backward from the forward's output and lse: (dq, dk, dv, d_distance_embedding), each in its input's dtype,
    dq/dk/dv as contiguous (B, L, H, D). ``grads``: see ``_backward_arguments``; ``*_config``: one of DKDV_CONFIGS /
    DQ_CONFIGS (a triton.Config), bypassing autotuning."""
    dkdv, dq = _backward_arguments(grad_out, q, k, v, distance_embedding, out, lse, left, right, scale, lengths,
                                   zero_padded_queries, grads, key_mask)
    _run(_dkdv_tuned, _backward_dkdv_kernel, dkdv, dkdv_config, "BLOCK_N")
    _run(_dq_tuned, _backward_dq_kernel, dq, dq_config, "BLOCK_M")

    # dq = scale·(dS·K + dT·E), dE = scale·Σ dTᵀ·q: small matmuls over the R columns
    batch, length, heads, head_dim = q.shape
    acc_dtype = _accumulate_dtype(q.dtype)
    emb = distance_embedding.to(q.dtype).to(acc_dtype)
    d_table_rows = dq["d_table_ptr"].view(-1, left + right + 1)
    d_q = torch.addmm(dq["dq_ptr"].view(-1, head_dim), d_table_rows, emb, beta=scale, alpha=scale)
    d_emb = torch.matmul(d_table_rows.t(), q.reshape(-1, head_dim).to(acc_dtype)) * scale
    return (d_q.view(batch, length, heads, head_dim).to(q.dtype), dkdv["dk_ptr"], dkdv["dv_ptr"],
            d_emb.to(distance_embedding.dtype))


# --------------------------------------------------------------------------------------- torch.library ops
# ``implementation`` says which code computes the op: TRITON (the kernels above) or FAST (the band-decomposed path,
# rel_key_attention_banded.py), as ``_backend.dispatch`` chose it for the forward. It is an argument, not a global,
# so the backward always matches the forward that ran. Both run with autocast off: an enclosing autocast region (the
# forward's, or a backward called inside one) would otherwise turn the fp32 table and gradient matmuls into half
# precision ones.
def _banded():
    from . import rel_key_attention_banded

    return rel_key_attention_banded


@torch.library.custom_op("w2vbert_fast::rel_key_attention", mutates_args=())
def _rel_key_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, distance_embedding: torch.Tensor, left: int, right: int,
    scale: float, lengths: Optional[torch.Tensor], zero_padded_queries: bool, implementation: str,
    key_mask: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.autocast(q.device.type, enabled=False):
        if implementation == TRITON:
            return _launch(q, k, v, distance_embedding, left, right, scale, lengths, zero_padded_queries,
                           key_mask=key_mask)
        out, lse = _banded().rel_key_attention_chunked(q, k, v, distance_embedding, left, right, scale, lengths,
                                                       zero_padded_queries, key_mask)
    return out.contiguous(), lse.contiguous()


@_rel_key_attention_op.register_fake
def _(q, k, v, distance_embedding, left, right, scale, lengths, zero_padded_queries, implementation, key_mask=None):
    batch, length, heads, head_dim = q.shape
    return (q.new_empty(batch, length, heads * head_dim),
            q.new_empty(batch, heads, length, dtype=_accumulate_dtype(q.dtype)))


@torch.library.custom_op("w2vbert_fast::rel_key_attention_backward", mutates_args=())
def _rel_key_attention_backward_op(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, distance_embedding: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, left: int, right: int, scale: float, lengths: Optional[torch.Tensor],
    zero_padded_queries: bool, implementation: str, key_mask: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    with torch.autocast(q.device.type, enabled=False):
        if implementation == TRITON:
            grads = _launch_backward(grad_out, q, k, v, distance_embedding, out, lse, left, right, scale, lengths,
                                     zero_padded_queries, key_mask=key_mask)
        else:
            grads = _banded().rel_key_attention_chunked_backward(
                grad_out, q, k, v, distance_embedding, out, lse, left, right, scale, lengths, zero_padded_queries,
                key_mask)
    return tuple(g.contiguous() for g in grads)


@_rel_key_attention_backward_op.register_fake
def _(grad_out, q, k, v, distance_embedding, out, lse, left, right, scale, lengths, zero_padded_queries,
      implementation, key_mask=None):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            distance_embedding.new_empty(distance_embedding.shape))


def _setup_context(ctx, inputs, output):
    q, k, v, distance_embedding, left, right, scale, lengths, zero_padded_queries, implementation, key_mask = inputs
    out, lse = output
    # O(B·L·H·D) and O(B·H·L): the probabilities are recomputed from lse, nothing L×L is kept
    ctx.save_for_backward(q, k, v, distance_embedding, out, lse, lengths, key_mask)
    ctx.arguments = (left, right, scale, zero_padded_queries, implementation)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, distance_embedding, out, lse, lengths, key_mask = ctx.saved_tensors
    left, right, scale, zero_padded_queries, implementation = ctx.arguments
    dq, dk, dv, d_emb = _rel_key_attention_backward_op(
        grad_out, q, k, v, distance_embedding, out, lse, left, right, scale, lengths, zero_padded_queries,
        implementation, key_mask)
    return dq, dk, dv, d_emb, None, None, None, None, None, None, None


_rel_key_attention_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------ dispatch
_MAX_HEAD_DIM = 256


def _check_key_mask(key_mask, batch, length):
    """Shape and dtype of the optional (B, L) key mask; its values (0/1) where checking them is free."""
    if not isinstance(key_mask, torch.Tensor) or key_mask.dim() != 2 or tuple(key_mask.shape) != (batch, length):
        shape = tuple(key_mask.shape) if isinstance(key_mask, torch.Tensor) else type(key_mask).__name__
        raise ValueError(f"key_mask must be a (batch, length) = ({batch}, {length}) bool or 0/1 integer tensor, "
                         f"got {shape}")
    if key_mask.dtype.is_floating_point or key_mask.dtype.is_complex:
        raise ValueError(f"key_mask must be a bool or 0/1 integer tensor, got {key_mask.dtype}")
    if key_mask.dtype != torch.bool and key_mask.numel() > 0 and checks_values(key_mask):
        if bool(((key_mask != 0) & (key_mask != 1)).any()):
            raise ValueError("key_mask must hold only 0 and 1 (1 = a real frame)")


def _check_inputs(q, k, v, distance_embedding, left, right, lengths, key_mask):
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
    if key_mask is not None:
        _check_key_mask(key_mask, q.shape[0], q.shape[1])
        devices.add(key_mask.device)
    if len(devices) > 1:
        raise ValueError("q, k, v, distance_embedding, lengths and key_mask must be on one device, got "
                         f"{sorted(map(str, devices))}")
    if lengths is not None and values_checkable(lengths):  # the kernel clamps lengths to [1, L] otherwise
        low, high = int(lengths.min()), int(lengths.max())
        if low < 1 or high > q.shape[1]:
            raise ValueError(f"lengths must lie in [1, {q.shape[1]}] (every sequence needs a key), got [{low}, {high}]")


def rel_key_attention(q, k, v, distance_embedding, left, right, scale, lengths=None, zero_padded_queries=True,
                      key_mask=None):
    """Relative-key attention over padded sequences (any padding), differentiable in q, k, v and distance_embedding.

    q, k, v: (B, L, H, D), any strides (views of the projections' output need no copy);
    distance_embedding: (left + right + 1, D), any float dtype (cast to q's, as transformers does; under autocast
    q/k/v arrive in the autocast dtype and the embedding's gradient comes back in its own dtype);
    left, right: clip distances; scale: softmax scale;
    lengths: optional (B,) integer key lengths in [1, L] (keys at or past a sequence's length are ignored: the
    kernels skip those key blocks, so right padding is cheapest given as lengths);
    key_mask: optional (B, L) bool or 0/1 integer, True = a real frame (left padding, holes). A frame j of sequence
    b is real iff j < lengths[b] (when given) and key_mask[b, j] (when given); only real keys are attended. With
    both, lengths = one past the last real frame keeps the blocks after it skipped. A sequence with no real frame
    is the caller's error (unchecked: its output is finite, not meaningful);
    zero_padded_queries: write zeros to the query rows at or past lengths[b] (True; their incoming gradient is then
    ignored) or compute them like transformers, attending to the real keys (False; needed when something
    downstream, e.g. the adapter, reads padded rows). Rows before lengths[b] are always computed, masked or not,
    as transformers computes them (attending to the real keys): its heads read them under left padding.
    Returns (B, L, H·D) in q's dtype.

    Which code runs is ``_backend.dispatch``'s choice: the Triton kernels forward and backward (``triton``, or
    ``auto`` on a GPU arch and dtype its table lists as clean in the compile check), the band-decomposed path over
    the device's own attention kernels (rel_key_attention_banded.py: ``auto`` on CPU tensors and on the GPUs and
    dtypes the table leaves out, ``portable`` everywhere), or the literal reference with plain autograd (``torch``;
    fp64 on a GPU). The first two save only q, k, v, the output and the row log-sum-exp for backward: memory stays
    O(L), in training too. ``ops.describe()`` says what ``auto`` picks on a device.
    """
    _check_inputs(q, k, v, distance_embedding, left, right, lengths, key_mask)
    if key_mask is not None and key_mask.dtype != torch.bool:
        key_mask = key_mask != 0
    implementation = dispatch(q, k, v, distance_embedding, op="rel_key_attention")
    if implementation != REFERENCE and q.numel() > 0:
        if implementation == TRITON and q.shape[-1] > _MAX_HEAD_DIM:
            raise ValueError(f"head_dim must be at most {_MAX_HEAD_DIM} for the Triton kernel, got {q.shape[-1]}")
        if lengths is not None:
            lengths = lengths.to(torch.int32)
        out, _ = _rel_key_attention_op(q, k, v, distance_embedding, left, right, float(scale), lengths,
                                       bool(zero_padded_queries), implementation, key_mask)
        return out
    real = key_mask
    if lengths is not None:
        before_end = torch.arange(q.shape[1], device=q.device)[None, :] < lengths.to(q.device)[:, None]
        real = before_end if real is None else real & before_end
    out = rel_key_attention_reference(q, k, v, distance_embedding, left, right, scale, real)
    if lengths is not None and zero_padded_queries:
        out = out.masked_fill(~before_end[..., None], 0)
    return out


# ------------------------------------------------------------------------------------------------ LAUNCH_META
# What the compile check needs (benchmarks/tools/compile_check.py): each kernel's example arguments come from the
# launcher's own argument builders, run on meta tensors (shapes, strides and dtypes, no data) at the check's shape;
# a lengths tensor is passed (HAS_LENGTHS) and padded queries are zeroed, as the model launches them. Each kernel is
# checked twice: as right padding launches it (no key mask: the build every batch without holes runs) and with a
# key mask (``+key_mask``: left padding, holes), since the two are separate builds with their own registers.
def _example_inputs(shape, dtype, with_key_mask):
    """q, k, v (B, L, H, D), the distance embedding, int32 lengths and the (B, L) bool key mask or None, as meta
    tensors of ``dtype``'s name."""
    t = getattr(torch, dtype)
    q, k, v = (torch.empty(shape["batch"], shape["length"], shape["heads"], shape["head_dim"], dtype=t, device="meta")
               for _ in range(3))
    distance_embedding = torch.empty(shape["left"] + shape["right"] + 1, shape["head_dim"], dtype=t, device="meta")
    key_mask = (torch.empty(shape["batch"], shape["length"], dtype=torch.bool, device="meta") if with_key_mask
                else None)
    return q, k, v, distance_embedding, torch.empty(shape["batch"], dtype=torch.int32, device="meta"), key_mask


def _compile_arguments(arguments):
    """A launch's arguments as the compile check takes them: a tensor becomes its dtype."""
    return {name: value.dtype if isinstance(value, torch.Tensor) else value for name, value in arguments.items()}


def _forward_example(shape, dtype, with_key_mask=False):
    q, k, v, distance_embedding, lengths, key_mask = _example_inputs(shape, dtype, with_key_mask)
    return _compile_arguments(_forward_arguments(q, k, v, distance_embedding, shape["left"], shape["right"],
                                                 shape["head_dim"] ** -0.5, lengths, True, key_mask=key_mask))


def _backward_example(shape, dtype, kernel_pass, with_key_mask=False):
    """``kernel_pass``: 0 for the dK/dV pass, 1 for the dQ pass."""
    q, k, v, distance_embedding, lengths, key_mask = _example_inputs(shape, dtype, with_key_mask)
    out = torch.empty(q.shape[0], q.shape[1], q.shape[2] * q.shape[3], dtype=q.dtype, device="meta")
    lse = torch.empty(q.shape[0], q.shape[2], q.shape[1], dtype=_accumulate_dtype(q.dtype), device="meta")
    arguments = _backward_arguments(out, q, k, v, distance_embedding, out, lse, shape["left"], shape["right"],
                                    shape["head_dim"] ** -0.5, lengths, True, key_mask=key_mask)
    return _compile_arguments(arguments[kernel_pass])


# every dot, fp32's included (three tf32 products), must run on tensor cores
_EXPECT = ("mma_in_half", "mma_in_fp32", "no_fp64", "no_local")
LAUNCH_META = {}
for _with_key_mask in (False, True):
    _variant = "+key_mask" if _with_key_mask else ""
    LAUNCH_META.update({
        "_forward_kernel" + _variant: KernelLaunch(
            _forward_tuned, lambda shape, dtype, m=_with_key_mask: _forward_example(shape, dtype, m),
            lambda dtype, m=_with_key_mask: _gpu_configs(FORWARD_CONFIGS, getattr(torch, dtype), m), expect=_EXPECT),
        "_backward_dkdv_kernel" + _variant: KernelLaunch(
            _dkdv_tuned, lambda shape, dtype, m=_with_key_mask: _backward_example(shape, dtype, 0, m),
            lambda dtype, m=_with_key_mask: _gpu_configs(DKDV_CONFIGS, getattr(torch, dtype), m), expect=_EXPECT),
        "_backward_dq_kernel" + _variant: KernelLaunch(
            _dq_tuned, lambda shape, dtype, m=_with_key_mask: _backward_example(shape, dtype, 1, m),
            lambda dtype, m=_with_key_mask: _gpu_configs(DQ_CONFIGS, getattr(torch, dtype), m), expect=_EXPECT),
    })
del _with_key_mask, _variant
