"""Shaw relative-key self-attention (w2v-bert-2.0's ``position_embeddings_type="relative_key"``).

    scores[b,h,i,j] = scale * q_i·k_j + scale * q_i·E[clamp(j - i, -left, right) + left]
    out = softmax_j(scores + key mask) @ v

transformers materialises the (L, L, D) gather of E and the B×H×L×L bias. The kernel never does: the bias of
query row i takes only left + right + 1 values, q_i·E[r], so each program computes that small Q·Eᵀ table once
for its query block and reads the bias from it while it streams over key blocks flash-attention style. Key
blocks wholly left of the band (j - i <= -left for the whole tile) or wholly right of it (j - i >= right) see
one constant bias per row, q_i·E[0] or q_i·E[left + right]; only the few blocks that straddle the band gather
from the table. Memory is O(B·H·L·D): nothing of size L×L exists anywhere.

Reading order: reference → kernel → launcher → torch.library op → dispatch.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from ._backend import check_lengths, triton_interpreter_enabled, use_triton, values_checkable


# ----------------------------------------------------------------------------------------------- reference
def rel_key_attention_reference(q, k, v, distance_embedding, left, right, scale, key_mask=None):
    """PyTorch reference (the CPU path and the test oracle); builds the B×H×L×L bias as transformers does.

    q, k, v: (B, L, H, D); distance_embedding: (left + right + 1, D); key_mask: optional (B, L) bool, True = attend.
    Returns (B, L, H·D) in q's dtype. Query rows are all computed (padded ones attend to the valid keys).
    """
    batch, length, heads, head_dim = q.shape
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, L, D)
    positions = torch.arange(length, device=q.device)
    distance = (positions[None, :] - positions[:, None]).clamp(-left, right) + left
    emb = distance_embedding.to(q.dtype)[distance]  # (L, L, D)
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale
    scores = scores + torch.einsum("bhld,lrd->bhlr", qh, emb) * scale
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :].bool(), torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, vh)  # (B, H, L, D)
    return out.transpose(1, 2).reshape(batch, length, heads * head_dim)


# -------------------------------------------------------------------------------------------------- kernel
@triton.jit
def _attend_key_block(
    acc, m_i, l_i, q, table, bias_row, k_base, v_base, start_n, offs_m, key_length, stride_kl, stride_vl,
    left, right, qk_scale,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, BIAS_FROM_TABLE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One step of the online softmax over keys [start_n, start_n + BLOCK_N)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    key_valid = offs_n < key_length
    kv_mask = key_valid[:, None] & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(k_base + offs_n[:, None].to(tl.int64) * stride_kl + offs_d[None, :], mask=kv_mask, other=0.0)
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if BIAS_FROM_TABLE:
        distance = tl.minimum(tl.maximum(offs_n[None, :] - offs_m[:, None], -left), right) + left
        scores += tl.gather(table, distance, 1)
    else:
        scores += bias_row[:, None]
    # scores are raw q·(k + E); scale and the change to base 2 in one multiply
    scores = tl.where(key_valid[None, :], scores * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(scores - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_base + offs_n[:, None].to(tl.int64) * stride_vl + offs_d[None, :], mask=kv_mask, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


def _autotune_configs(interpreted=None):
    if triton_interpreter_enabled() if interpreted is None else interpreted:
        # The interpreter's cost is per program and per op; one small config keeps CI fast and, with blocks
        # smaller than the band, still exercises all three key-block kinds.
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)
        for block_m, block_n, warps, stages in [
            (128, 64, 8, 3), (128, 64, 4, 3), (128, 32, 4, 3), (64, 64, 4, 3),
            (64, 32, 4, 2), (128, 128, 8, 2), (64, 64, 4, 4), (128, 64, 8, 4),
        ]
    ]


@triton.autotune(configs=_autotune_configs(), key=["LENGTH_BUCKET", "HEAD_DIM", "NUM_DISTANCES"])
@triton.jit
def _rel_key_attention_kernel(
    q_ptr, k_ptr, v_ptr, emb_ptr, lengths_ptr, out_ptr,
    stride_qb, stride_ql, stride_qh,
    stride_kb, stride_kl, stride_kh,
    stride_vb, stride_vl, stride_vh,
    stride_er,
    length, heads, left, right, qk_scale,
    LENGTH_BUCKET,  # next power of two of length: the autotune key, so ragged bulk jobs do not retune per length
    HEAD_DIM: tl.constexpr, NUM_DISTANCES: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, ZERO_PADDED_QUERIES: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    batch_head = tl.program_id(1)
    b = batch_head // heads
    h = batch_head % heads
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM

    key_length = length
    if HAS_LENGTHS:
        key_length = tl.minimum(tl.maximum(tl.load(lengths_ptr + b).to(tl.int32), 1), length)
    row_stride = heads * HEAD_DIM
    out_base = out_ptr + (b.to(tl.int64) * length) * row_stride + h * HEAD_DIM
    out_ptrs = out_base + offs_m[:, None].to(tl.int64) * row_stride + offs_d[None, :]
    out_mask = (offs_m[:, None] < length) & d_valid[None, :]

    if ZERO_PADDED_QUERIES and start_m >= key_length:
        # the whole query block is padding: nothing reads it but it must not be left uninitialised
        tl.store(out_ptrs, tl.zeros([BLOCK_M, BLOCK_D], dtype=out_ptr.dtype.element_ty), mask=out_mask)
        return

    q_base = q_ptr + b.to(tl.int64) * stride_qb + h * stride_qh
    k_base = k_ptr + b.to(tl.int64) * stride_kb + h * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + h * stride_vh
    q = tl.load(q_base + offs_m[:, None].to(tl.int64) * stride_ql + offs_d[None, :],
                mask=(offs_m[:, None] < length) & d_valid[None, :], other=0.0)

    # The block's Q·Eᵀ table (BLOCK_M, left + right + 1 columns padded to BLOCK_R) and its two edge columns,
    # the constant bias of key blocks wholly outside the band.
    offs_r = tl.arange(0, BLOCK_R)
    emb = tl.load(emb_ptr + offs_r[:, None] * stride_er + offs_d[None, :],
                  mask=(offs_r[:, None] < NUM_DISTANCES) & d_valid[None, :], other=0.0).to(q.dtype)
    table = tl.dot(q, tl.trans(emb), input_precision=DOT_PRECISION)
    bias_left = tl.sum(tl.where(offs_r[None, :] == 0, table, 0.0), 1)
    bias_right = tl.sum(tl.where(offs_r[None, :] == NUM_DISTANCES - 1, table, 0.0), 1)

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
    # The band goes first so the table's registers are free for the long constant-bias loops. Whichever block
    # comes first holds a valid key for every row (band_start < num_key_blocks when the band is not empty; block
    # 0 otherwise), so the running max is finite from the first step on.
    for block in range(band_start, band_end):
        acc, m_i, l_i = _attend_key_block(
            acc, m_i, l_i, q, table, bias_left, k_base, v_base, block * BLOCK_N, offs_m, key_length,
            stride_kl, stride_vl, left, right, qk_scale, BLOCK_N, BLOCK_D, HEAD_DIM, True, DOT_PRECISION)
    for block in range(0, band_start):
        acc, m_i, l_i = _attend_key_block(
            acc, m_i, l_i, q, table, bias_left, k_base, v_base, block * BLOCK_N, offs_m, key_length,
            stride_kl, stride_vl, left, right, qk_scale, BLOCK_N, BLOCK_D, HEAD_DIM, False, DOT_PRECISION)
    for block in range(band_end, num_key_blocks):
        acc, m_i, l_i = _attend_key_block(
            acc, m_i, l_i, q, table, bias_right, k_base, v_base, block * BLOCK_N, offs_m, key_length,
            stride_kl, stride_vl, left, right, qk_scale, BLOCK_N, BLOCK_D, HEAD_DIM, False, DOT_PRECISION)

    out = acc / l_i[:, None]
    if ZERO_PADDED_QUERIES:
        out = tl.where(offs_m[:, None] < key_length, out, 0.0)
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=out_mask)


# ------------------------------------------------------------------------------------------------ launcher
_LOG2E = 1.4426950408889634


def _launch(q, k, v, distance_embedding, left, right, scale, lengths, zero_padded_queries, out=None, config=None):
    """``out``: a preallocated (B, L, H·D) buffer (tests pass one filled with NaN to catch unwritten rows);
    ``config``: a dict of BLOCK_M/BLOCK_N/num_warps that bypasses autotuning (tests run every tuned shape)."""
    batch, length, heads, head_dim = q.shape
    if q.stride(3) != 1 or k.stride(3) != 1 or v.stride(3) != 1:
        q, k, v = (t if t.stride(3) == 1 else t.contiguous() for t in (q, k, v))
    emb = distance_embedding if distance_embedding.stride(1) == 1 else distance_embedding.contiguous()
    if out is None:
        out = torch.empty(batch, length, heads * head_dim, device=q.device, dtype=q.dtype)
    num_distances = left + right + 1
    grid = lambda meta: (triton.cdiv(length, meta["BLOCK_M"]), batch * heads)  # noqa: E731
    kernel = _rel_key_attention_kernel if config is None else _rel_key_attention_kernel.fn
    kernel[grid](
        q, k, v, emb, lengths if lengths is not None else q, out,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        emb.stride(0),
        length, heads, left, right, scale * _LOG2E,
        triton.next_power_of_2(length),
        HEAD_DIM=head_dim, NUM_DISTANCES=num_distances,
        BLOCK_R=max(16, triton.next_power_of_2(num_distances)), BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        HAS_LENGTHS=lengths is not None, ZERO_PADDED_QUERIES=bool(zero_padded_queries),
        # fp32 inputs would otherwise run on tf32 tensor cores, 1e-3 off transformers' fp32
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        **(config or {}),
    )
    return out


# ---------------------------------------------------------------------------------------- torch.library op
@torch.library.custom_op("w2vbert_fast::rel_key_attention", mutates_args=())
def _rel_key_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, distance_embedding: torch.Tensor, left: int, right: int,
    scale: float, lengths: Optional[torch.Tensor], zero_padded_queries: bool,
) -> torch.Tensor:
    return _launch(q, k, v, distance_embedding, left, right, scale, lengths, zero_padded_queries)


@_rel_key_attention_op.register_fake
def _(q, k, v, distance_embedding, left, right, scale, lengths, zero_padded_queries):
    batch, length, heads, head_dim = q.shape
    return q.new_empty(batch, length, heads * head_dim)


# ------------------------------------------------------------------------------------------------ dispatch
_MAX_HEAD_DIM = 256


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
    """Relative-key attention over right-padded sequences.

    q, k, v: (B, L, H, D), any strides (views of the projections' output need no copy);
    distance_embedding: (left + right + 1, D); left, right: clip distances; scale: softmax scale;
    lengths: optional (B,) integer key lengths in [1, L] (keys at or past a sequence's length are ignored);
    zero_padded_queries: write zeros to query rows at or past the length (True) or compute them like transformers,
    attending to the valid keys (False; needed when something downstream, e.g. the adapter, reads padded rows).
    Returns (B, L, H·D) in q's dtype.

    The Triton kernel is forward only: when autograd needs gradients through q, k, v or the embedding, the
    PyTorch reference runs instead (it builds the L×L bias).
    """
    _check_inputs(q, k, v, distance_embedding, left, right, lengths)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, distance_embedding))
    if use_triton(q, k, v, distance_embedding) and not needs_grad and q.numel() > 0:
        if q.shape[-1] > _MAX_HEAD_DIM:
            raise ValueError(f"head_dim must be at most {_MAX_HEAD_DIM} for the Triton kernel, got {q.shape[-1]}")
        if lengths is not None:
            lengths = lengths.to(torch.int32)
        return _rel_key_attention_op(q, k, v, distance_embedding, left, right, float(scale), lengths,
                                     bool(zero_padded_queries))
    key_mask = None
    if lengths is not None:
        key_mask = torch.arange(q.shape[1], device=q.device)[None, :] < lengths.to(q.device)[:, None]
    out = rel_key_attention_reference(q, k, v, distance_embedding, left, right, scale, key_mask)
    if key_mask is not None and zero_padded_queries:
        out = out.masked_fill(~key_mask[..., None], 0)
    return out
