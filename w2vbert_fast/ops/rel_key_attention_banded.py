"""Relative-key attention, band-decomposed over the device's own attention primitive: query-chunked, O(L) memory,
forward and backward, on CPU tensors and on any CUDA GPU.

``ops.rel_key_attention``'s ``_backend.FAST`` path: the CPU product path (``auto`` on CPU tensors) and the portable
GPU path (``auto`` on the GPUs the dispatch table sends here, or ``W2VBERT_FAST_BACKEND=portable``). The same idea as
the Triton kernel, written around fused attention kernels that return the row log-sum-exp: the bias of row i takes
only left + right + 1 values, q_i·E[r], so one small Q·Eᵀ table (B, H, L, R) holds every bias there is. For a chunk
of query rows [i0, i1) the keys split three ways:

    keys [0, a),  a = i0 - left + 1       wholly left of every row's band: bias q_i·E[0]    → q_i·(k_j + E[0])
    keys [b, L),  b = i1 - 1 + right      wholly right of it:            bias q_i·E[R-1]  → q_i·(k_j + E[R-1])
    keys [a, b)                           the band: bias gathered from the chunk's rows of the table

The two outer parts are plain attention against keys with the edge embedding folded in (``k + E[0]``,
``k + E[R-1]``, computed once per call), so they run as the device's fused kernel with no bias at all (a key mask
only, when there is padding); only the band, (chunk × (chunk + left + right)) scores, carries an explicit bias. The
parts' outputs merge exactly by their row log-sum-exps. Nothing of size L×L or L×L×D exists: the largest temporary
is the band's bias.

Backward, flash-attention-2 style from the saved output and row log-sum-exp: the fused backward of each part, given
the *merged* output and log-sum-exp, yields exactly that part's share of dq, dk, dv (its P and Δ = rowsum(dO∘O) are
the global ones); the band's also yields dS, the gradient of its bias, which is scattered back into the table's
distance buckets: dq += dT·E and dE += dTᵀ·q.

The algorithm is written once (``rel_key_attention_chunked`` and its backward); what differs per device is the
primitive (``primitive_for``): forward (out, lse) with an optional additive bias, and backward (dq, dk, dv and,
when asked, the bias's gradient).

- CPU: ``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward, in fp32 for half inputs (a half
  softmax on the CPU is slower and less accurate) except a bf16 forward where the CPU multiplies bf16 in hardware
  (``CpuFlash.compute_dtype``); the band's backward, which needs dS, by matmuls.
- CUDA: the memory-efficient (CUTLASS) kernels, ``aten._efficient_attention_forward`` / ``_backward``: an additive
  bias, the log-sum-exp, dS for the band, fp16 on tensor cores from sm_75, bf16 from sm_80, fp32; and FlashAttention-2
  (``aten._scaled_dot_product_flash_attention``) for the forward of the unbiased outer parts in fp16/bf16 on sm_80 to
  sm_90. Their contracts, read from PyTorch's sources: inputs (B, M, H, K) with a unit last stride; a bias of q's
  dtype, shape (B, H, M, N) (broadcast strides allowed), pointer and row strides aligned to 16 bytes; the forward's
  lse padded to a multiple of 32 rows (sliced here), the backward's read through its batch and head strides (padded
  here too), its ``out`` with rows H·K apart; the head dim padded here with zeros to a multiple of 8 (exact: a zero
  column adds nothing to q·k, and the output's padding is sliced off). **No GPU has run this path yet**: its CUDA
  branch is tested in CI only through emulations of those contracts on the CPU (tests/test_rel_key_attention_banded.py).
"""

import functools

import torch
import torch.nn.functional as F


# ------------------------------------------------------------------------------------ primitives, per device
def _round_up(n, multiple):
    return -(-n // multiple) * multiple


def _matmul_backward(d_out, q, k, v, bias, out, lse):
    """Attention's backward with the bias's gradient, by matmuls on any device: (dq, dk, dv, dS) for one part of a
    chunk (B, H, M, ·) against N keys; P is recomputed from the merged lse. (M × N) temporaries only."""
    probs = torch.matmul(q, k.transpose(-1, -2))
    if bias is not None:
        probs = probs.add_(bias)
    probs = probs.sub_(lse[..., None].to(probs.dtype)).exp_()
    delta = (d_out * out).sum(dim=-1, keepdim=True)
    d_scores = torch.matmul(d_out, v.transpose(-1, -2)).sub_(delta).mul_(probs)
    return (torch.matmul(d_scores, k), torch.matmul(d_scores.transpose(-1, -2), q),
            torch.matmul(probs.transpose(-1, -2), d_out), d_scores)


@functools.lru_cache(maxsize=None)
def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX), as torch.cpu reports it (False where this
    torch cannot tell)."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


class CpuFlash:
    """PyTorch's fused CPU flash attention."""

    name = "CPU flash attention (aten._scaled_dot_product_flash_attention_for_cpu)"
    def rows_per_chunk(self, length, dtype):
        """Query rows per step for ``length`` frames computed in ``dtype``. The flash kernel blocks the outer parts
        itself; the chunk sets the band's share of the work (chunk + left + right keys a row, the only scores with
        an explicit bias) and the size of the band's bias buffer, fresh memory each chunk (page faults: the cost
        that grows fastest with it). Measured on 2 cores, L = 300 … 3,000 (fp32 and bf16, one call, 16 heads):
        256 rows in fp32 and 512 in bf16 are at or near the fastest from L ≈ 500 up (512 fp32 rows were 1.1–1.5×
        slower there), and one chunk is fastest up to about 1.5 of those (fp32 L = 450: 9.2 ms against 10.5;
        bf16 L = 700: 9.9 against 11.0), not beyond (fp32 520: 20.7 against 14.6; bf16 800: 21.8 against 15.8)."""
        rows = 1024 // dtype.itemsize
        return length if length <= rows * 3 // 2 else rows
    head_dim_multiple = 1  # any head dim
    bias_alignment = 1  # any bias strides

    def __init__(self):
        self._forward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        self._backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward

    @staticmethod
    def compute_dtype(dtype, backward=False):
        """fp32 for half inputs (a half softmax on the CPU is slower and less accurate), except a bf16 forward on a
        CPU with bf16 matrix instructions: there the flash kernel runs its GEMMs in bf16 (AMX tiles, AVX512-BF16) at
        1.5–2× its fp32 speed (2 cores with AMX, L = 300 … 1,500), with the output's error against fp64 twice
        bf16's rounding (0.7 % of the largest value against 0.33 %). The backward stays fp32: the band's matmul
        backward recomputes P from the lse, which a bf16 subtraction would round."""
        if dtype == torch.bfloat16 and not backward and native_bf16():
            return dtype
        return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype

    def forward(self, q, k, v, bias):
        """(out (B, H, M, D), lse (B, H, M)) of softmax(q·kᵀ + bias)·v, q already scaled."""
        return self._forward(q, k, v, attn_mask=bias, scale=1.0)

    def backward(self, d_out, q, k, v, bias, out, lse, bias_grad):
        """(dq, dk, dv, d_bias or None) from the merged out and lse."""
        if bias_grad:  # the CPU kernel gives no gradient for its mask
            return _matmul_backward(d_out, q, k, v, bias, out, lse)
        return (*self._backward(d_out, q, k, v, out, lse, 0.0, False, attn_mask=bias, scale=1.0), None)


class _AtenCudaOps:
    """The CUDA attention ops the CUDA primitive calls (tests swap in emulations of their contracts)."""

    efficient_forward = torch.ops.aten._efficient_attention_forward
    efficient_backward = torch.ops.aten._efficient_attention_backward
    flash_forward = torch.ops.aten._scaled_dot_product_flash_attention


_LSE_ALIGNMENT = 32  # the memory-efficient kernels pad the lse to multiples of 32 rows (kAlignLSE)
_FLASH_MAX_HEAD_DIM = 256


class CudaSdpa:
    """PyTorch's CUDA attention kernels: memory-efficient (any part, forward and backward, dS for the band) and,
    where it applies, FlashAttention-2 for the unbiased forward parts."""

    # Fewer, larger chunks than this leave the band (chunk + left + right keys a row, the biased share) large;
    # smaller ones launch more and fill the GPU less at batch 1. Not tuned on a GPU yet.
    chunk = 256
    head_dim_multiple = 8  # the kernels' aligned (vectorised) variants; zero-padded by the algorithm
    bias_alignment = 16  # elements: 16-byte rows for every dtype (8 would do for half, 4 for fp32)

    def rows_per_chunk(self, length, dtype):
        return self.chunk

    def __init__(self, capability, dtype, ops=_AtenCudaOps):
        self.capability = tuple(capability)
        self.ops = ops
        # FlashAttention-2 is built for sm_80 … sm_90 in half precision; it takes no bias
        self.flash = (8, 0) <= self.capability < (10, 0) and dtype in (torch.float16, torch.bfloat16)
        self.name = ("CUDA memory-efficient attention (aten._efficient_attention_forward/_backward)"
                     + (" + FlashAttention-2 for the unbiased parts (aten._scaled_dot_product_flash_attention)"
                        if self.flash else ""))

    @staticmethod
    def compute_dtype(dtype, backward=False):
        return dtype  # the tensor cores' dtype; the kernels accumulate in fp32

    def _bias(self, bias, q, k):
        """``bias`` as the kernels take it: q's dtype, (B, H, M, N), 16-byte aligned pointer and row strides
        (a copy only when the given layout is not)."""
        if bias is None:
            return None
        bias = bias.to(q.dtype)
        step = max(16 // bias.element_size(), 1)
        aligned = (bias.stride(-1) == 1 and bias.data_ptr() % 16 == 0
                   and all(s % step == 0 for s, n in zip(bias.stride()[:-1], bias.shape[:-1]) if n > 1))
        if not aligned:
            padded = bias.new_empty(*bias.shape[:-1], _round_up(bias.shape[-1], self.bias_alignment))
            bias = padded[..., :bias.shape[-1]].copy_(bias)
        return bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])

    def forward(self, q, k, v, bias):
        rows = q.shape[2]
        if bias is None and self.flash and q.shape[-1] <= _FLASH_MAX_HEAD_DIM:
            out, lse = self.ops.flash_forward(q, k, v, 0.0, False, False, scale=1.0)[:2]
            return out, lse[..., :rows]
        out, lse = self.ops.efficient_forward(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              self._bias(bias, q, k), None, None, None, None, 0.0, 0, True,
                                              scale=1.0)[:2]
        return out.transpose(1, 2), lse[..., :rows]

    def backward(self, d_out, q, k, v, bias, out, lse, bias_grad):
        batch, heads, rows, _ = q.shape
        # the backward reads the lse through its batch and head strides: a buffer padded as the forward's is
        padded_lse = lse.new_zeros(batch, heads, _round_up(rows, _LSE_ALIGNMENT))
        padded_lse[..., :rows] = lse
        # and ``out`` as (B, M, H, K) with rows H·K apart
        out_rows = out.transpose(1, 2).contiguous()
        no_rng = torch.empty(0, dtype=torch.int64, device=q.device)  # dropout 0: never read
        dq, dk, dv, d_bias = self.ops.efficient_backward(
            d_out.transpose(1, 2), q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self._bias(bias, q, k),
            out_rows, None, None, rows, k.shape[2], padded_lse[..., :rows], 0.0, no_rng, no_rng, 0, bias_grad,
            scale=1.0)
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2), (d_bias if bias_grad else None)


_CPU = CpuFlash()


@functools.lru_cache(maxsize=None)
def _cuda_primitive(capability, dtype):
    return CudaSdpa(capability, dtype)


def primitive_for(device, dtype):
    """The attention primitive the algorithm runs on ``device`` for inputs of ``dtype``: the one per-device choice."""
    device = torch.device(device)
    if device.type == "cpu":
        return _CPU
    if device.type == "cuda":
        return _cuda_primitive(tuple(torch.cuda.get_device_capability(device)), dtype)
    raise ValueError(f"the band-decomposed attention runs on CPU and CUDA tensors, got a tensor on {device}")


# ------------------------------------------------------------------------------------------------ algorithm
def _chunks(length, left, right, chunk):
    """(i0, i1, a, b) per query chunk: keys [0, a) are wholly left of every row's band, [b, L) wholly right."""
    for i0 in range(0, length, chunk):
        i1 = min(i0 + chunk, length)
        b = min(max(i1 - 1 + right, 0), length)
        a = min(max(i0 - left + 1, 0), b)
        yield i0, i1, a, b


class _Inputs:
    """Everything a call derives from its arguments once: (B, H, L, D) contiguous operands in the primitive's
    compute dtype with the scale folded into q (the head dim zero-padded to the primitive's multiple), the table,
    the edge-shifted keys and the key mask as an additive bias."""

    def __init__(self, q, k, v, distance_embedding, left, right, scale, lengths, key_mask, primitive, backward=False):
        self.batch, self.length, self.heads, self.head_dim = q.shape
        self.left, self.right, self.primitive = left, right, primitive
        self.dtype = dtype = primitive.compute_dtype(q.dtype, backward)
        self.accumulate = torch.promote_types(dtype, torch.float32)  # gradients and lse, whatever the inputs
        pad = (0, _round_up(self.head_dim, primitive.head_dim_multiple) - self.head_dim)
        heads_first = lambda t: F.pad(t.transpose(1, 2).to(dtype), pad).contiguous()  # noqa: E731
        self.q = heads_first(q) * scale
        self.k, self.v = heads_first(k), heads_first(v)
        self.emb = F.pad(distance_embedding.to(dtype), pad)
        self.table = torch.matmul(self.q, self.emb.t())  # (B, H, L, R), already scaled
        self.k_left = self.k + self.emb[0]
        self.k_right = self.k + self.emb[-1]
        # real: the (B, L) frames that are real keys; key_valid: the keys attended, which are the real ones except
        # in a row with none (the caller's error, unchecked here): it attends every key, so its output stays finite
        # instead of 0/0. padded_rows: the query rows at or past lengths, the ones zero_padded_queries zeroes (rows
        # before it that are masked are computed as transformers computes them: its heads read them under left
        # padding)
        self.real = self.key_valid = self.key_bias = self.padded_rows = None
        if lengths is not None:
            self.real = _query_mask(lengths.to(q.device).clamp(1, self.length), self.length, q.device)
            self.padded_rows = ~self.real
        if key_mask is not None:
            mask = key_mask.to(q.device) != 0
            self.real = mask if self.real is None else self.real & mask
        if self.real is not None:
            self.key_valid = self.real | ~self.real.any(dim=1, keepdim=True)
            self.key_bias = torch.zeros(self.real.shape, device=q.device, dtype=dtype)
            self.key_bias = self.key_bias.masked_fill_(~self.key_valid, float("-inf"))[:, None, None, :]  # (B,1,1,L)

    def key_bias_of(self, start, end):
        return None if self.key_bias is None else self.key_bias[..., start:end]

    def band_bias(self, i0, i1, a, b):
        """(B, H, chunk, b - a): the band's scores' bias, plus the key mask. Row i, column j holds
        table[i, clamp(j - i, -left, right) + left], a function of j - i along the row: so the bias is a skewed view
        (row stride one less than its buffer's row length) of rows that each hold their table row laid out by
        distance, the edge values repeated. Three copies write it, nothing gathers it (a gather's index alone would
        be (B, H, chunk, b - a) int64), and the kernel reads it through its strides. The buffer's rows and heads are
        padded so that the view's pointer and strides meet the primitive's bias alignment; the padding is never read."""
        rows, width, align = i1 - i0, b - a, self.primitive.bias_alignment
        span = width + rows - 1  # distances (a - i1 + 1) … (b - 1 - i0), in this order along a buffer row
        first = a - i1 + 1
        lead = -(rows - 1) % align  # so that the view starts aligned
        row_length = _round_up(lead + span - 1, align) + 1  # the view's row stride, row_length - 1, aligned
        head_length = _round_up(rows * row_length, align)
        left_edge = min(max(-self.left - first, 0), span)  # distances below -left: E[0]'s value
        right_edge = min(max(first + span - 1 - self.right, 0), span)  # above right: E[R-1]'s
        inside = span - left_edge - right_edge
        low = max(first, -self.left) + self.left  # the table column of the first distance inside the window
        table = self.table[:, :, i0:i1]
        batch, heads = table.shape[:2]
        buffer = table.new_empty(batch, heads, head_length)
        rows_view = buffer[..., :rows * row_length].view(batch, heads, rows, row_length)[..., lead:lead + span]
        rows_view[..., :left_edge] = table[..., :1]
        rows_view[..., left_edge:left_edge + inside] = table[..., low:low + inside]
        rows_view[..., left_edge + inside:] = table[..., -1:]
        bias = buffer.as_strided((batch, heads, rows, width), (heads * head_length, head_length, row_length - 1, 1),
                                 buffer.storage_offset() + lead + rows - 1)
        if self.key_bias is not None:
            bias += self.key_bias[..., a:b]
        return bias

    def band_buckets(self, i0, i1, a, b):
        """(chunk, b - a): the table column each of the band's scores took its bias from (the backward's scatter)."""
        rows = torch.arange(i0, i1, device=self.q.device)
        cols = torch.arange(a, b, device=self.q.device)
        return (cols[None, :] - rows[:, None]).clamp(-self.left, self.right) + self.left

    def attend(self, q_c, keys, start, end, bias):
        """One part's (out, lse). A part whose keys [start, end) are all masked for a sequence has no softmax (ATen's
        CPU kernel gives its rows lse 0, others may give NaN): its rows must weigh nothing in the merge, so they get
        lse -inf and output 0, selected from the mask on the device."""
        out, lse = self.primitive.forward(q_c, keys[:, :, start:end], self.v[:, :, start:end], bias)
        if self.key_valid is None:
            return out, lse
        empty = ~self.key_valid[:, start:end].any(dim=1)
        return out.masked_fill(empty[:, None, None, None], 0.0), lse.masked_fill(empty[:, None, None], float("-inf"))


def _query_mask(lengths, length, device):
    return torch.arange(length, device=device)[None, :] < lengths[:, None]  # (B, L)


def _finish(x, out, dtype):
    """(B, H, L, D') → (B, L, H·D) in ``dtype``, the head dim's padding dropped."""
    out = out[..., :x.head_dim].transpose(1, 2)
    return out.reshape(x.batch, x.length, x.heads * x.head_dim).to(dtype)


def _outside_autocast(fn):
    """These functions choose their own compute dtype; an autocast region around the call (a forward, or a backward
    run inside one) must not recast their matmuls, or fp32 accumulators would meet bf16 scores."""

    @functools.wraps(fn)
    def run(q, *args, **kwargs):
        with torch.autocast(q.device.type, enabled=False):
            return fn(q, *args, **kwargs)

    return run


@_outside_autocast
def rel_key_attention_chunked(q, k, v, distance_embedding, left, right, scale, lengths=None,
                              zero_padded_queries=True, key_mask=None, chunk=None, primitive=None):
    """Forward. Same arguments and result as ``rel_key_attention``; returns (out (B, L, H·D) in q's dtype,
    lse (B, H, L): the natural log of each row's Σ_j exp(score), fp32, or fp64 for fp64 inputs). No autograd.
    ``primitive``: the attention primitive (default ``primitive_for(q.device, q.dtype)``); ``chunk``: query rows per
    step (default the primitive's)."""
    primitive = primitive or primitive_for(q.device, q.dtype)
    x = _Inputs(q, k, v, distance_embedding, left, right, scale, lengths, key_mask, primitive)
    chunk = chunk or primitive.rows_per_chunk(x.length, x.dtype)
    out = torch.empty_like(x.q)
    lse = torch.empty(x.batch, x.heads, x.length, device=q.device, dtype=x.accumulate)
    for i0, i1, a, b in _chunks(x.length, left, right, chunk):
        q_c = x.q[:, :, i0:i1]
        parts = []
        if a > 0:
            parts.append(x.attend(q_c, x.k_left, 0, a, x.key_bias_of(0, a)))
        if b > a:
            parts.append(x.attend(q_c, x.k, a, b, x.band_bias(i0, i1, a, b)))
        if b < x.length:
            parts.append(x.attend(q_c, x.k_right, b, x.length, x.key_bias_of(b, None)))
        if len(parts) == 1:
            out[:, :, i0:i1], lse[:, :, i0:i1] = parts[0]
            continue
        chunk_lse = torch.logsumexp(torch.stack([part_lse.to(x.accumulate) for _, part_lse in parts]), dim=0)
        merged = sum(torch.exp(part_lse - chunk_lse)[..., None] * part_out for part_out, part_lse in parts)
        out[:, :, i0:i1], lse[:, :, i0:i1] = merged, chunk_lse
    if x.padded_rows is not None and zero_padded_queries:
        out.masked_fill_(x.padded_rows[:, None, :, None], 0.0)
    return _finish(x, out, q.dtype), lse


@_outside_autocast
def rel_key_attention_chunked_backward(grad_out, q, k, v, distance_embedding, out, lse, left, right, scale,
                                       lengths=None, zero_padded_queries=True, key_mask=None, chunk=None,
                                       primitive=None):
    """Backward of ``rel_key_attention_chunked`` from its output and lse: (dq, dk, dv, d_distance_embedding), each
    in its input's dtype. No autograd; nothing of size L×L. Gradients accumulate in fp32 (fp64 for fp64 inputs)."""
    primitive = primitive or primitive_for(q.device, q.dtype)
    x = _Inputs(q, k, v, distance_embedding, left, right, scale, lengths, key_mask, primitive, backward=True)
    chunk = chunk or primitive.rows_per_chunk(x.length, x.dtype)
    acc, padded_dim = x.accumulate, x.q.shape[-1]

    def as_heads(t):
        t = t.reshape(x.batch, x.length, x.heads, x.head_dim).transpose(1, 2).to(x.dtype)
        return F.pad(t, (0, padded_dim - x.head_dim))

    d_out, out = as_heads(grad_out), as_heads(out)
    if x.padded_rows is not None and zero_padded_queries:
        # those rows' output is the constant 0: their gradient reaches nothing
        d_out = d_out.masked_fill(x.padded_rows[:, None, :, None], 0.0)
    d_out, out, lse = d_out.contiguous(), out.contiguous(), lse.to(acc)

    dq = torch.empty(x.q.shape, device=q.device, dtype=acc)
    dk, dv = torch.zeros_like(dq), torch.zeros_like(dq)
    emb = x.emb.to(acc)
    d_emb = torch.zeros_like(emb)
    for i0, i1, a, b in _chunks(x.length, left, right, chunk):
        q_c, d_out_c, out_c, lse_c = x.q[:, :, i0:i1], d_out[:, :, i0:i1], out[:, :, i0:i1], lse[:, :, i0:i1]
        dq_c = torch.zeros_like(dq[:, :, i0:i1])
        for keys, emb_row, start, end in ((x.k_left, 0, 0, a), (x.k_right, -1, b, x.length)):
            if end > start:
                dq_p, dk_p, dv_p, _ = primitive.backward(d_out_c, q_c, keys[:, :, start:end], x.v[:, :, start:end],
                                                         x.key_bias_of(start, end), out_c, lse_c, False)
                dq_c += dq_p
                dk[:, :, start:end] += dk_p
                dv[:, :, start:end] += dv_p
                d_emb[emb_row] += dk_p.sum(dim=(0, 1, 2), dtype=acc)  # these keys carried E[0] / E[R-1]
        if b > a:
            bias, bucket = x.band_bias(i0, i1, a, b), x.band_buckets(i0, i1, a, b)
            dq_p, dk_p, dv_p, d_scores = primitive.backward(d_out_c, q_c, x.k[:, :, a:b], x.v[:, :, a:b], bias,
                                                            out_c, lse_c, True)
            dq_c += dq_p
            dk[:, :, a:b] += dk_p
            dv[:, :, a:b] += dv_p
            d_table = torch.zeros(*d_scores.shape[:3], emb.shape[0], device=q.device, dtype=acc)
            d_table.scatter_add_(3, bucket.expand(*d_scores.shape), d_scores.to(acc))
            dq_c += torch.matmul(d_table, emb)
            d_emb += torch.einsum("bhcr,bhcd->rd", d_table, q_c.to(acc))
        dq[:, :, i0:i1] = dq_c
    return (_finish(x, dq * scale, q.dtype).view(q.shape), _finish(x, dk, k.dtype).view(k.shape),
            _finish(x, dv, v.dtype).view(v.shape), d_emb[:, :x.head_dim].to(distance_embedding.dtype))


def describe_primitive(device, dtype):
    """One line: the attention kernels the band-decomposed path runs on ``device`` for ``dtype``."""
    primitive = primitive_for(device, dtype)
    forward, backward = (str(primitive.compute_dtype(dtype, b)).replace("torch.", "") for b in (False, True))
    math = f"{forward} math" if forward == backward else f"{forward} forward / {backward} backward math"
    forward_rows = primitive.rows_per_chunk(1 << 20, primitive.compute_dtype(dtype))
    backward_rows = primitive.rows_per_chunk(1 << 20, primitive.compute_dtype(dtype, True))
    rows = forward_rows if forward_rows == backward_rows else f"{forward_rows} forward / {backward_rows} backward"
    return f"{primitive.name}, {math}, query chunks of {rows} rows"
