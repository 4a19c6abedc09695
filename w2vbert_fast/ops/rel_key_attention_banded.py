"""Relative-key attention, band-decomposed over the device's own attention primitive: query-chunked, O(L) memory,
forward and backward.

The CPU product path of ``ops.rel_key_attention`` (the ``auto`` backend on CPU tensors, ``_backend.FAST``). The same
idea as the Triton kernel, written around PyTorch's fused CPU flash attention: the bias of row i takes only left + right + 1
values, q_i·E[r], so one small Q·Eᵀ table (B, H, L, R) holds every bias there is. For a chunk of query rows
[i0, i1) the keys split three ways:

    keys [0, a),  a = i0 - left + 1       wholly left of every row's band: bias q_i·E[0]    → q_i·(k_j + E[0])
    keys [b, L),  b = i1 - 1 + right      wholly right of it:            bias q_i·E[R-1]  → q_i·(k_j + E[R-1])
    keys [a, b)                           the band: bias gathered from the chunk's rows of the table

The two outer parts are plain attention against keys with the edge embedding folded in (``k + E[0]``,
``k + E[R-1]``, computed once per call), so they run as PyTorch's flash kernel with no mask at all; only the band,
(chunk × (chunk + left + right)) scores, carries an explicit bias. The parts' outputs merge exactly by their row
log-sum-exps. Nothing of size L×L or L×L×D exists: the largest temporary is the band's bias.

Backward, flash-attention-2 style from the saved output and row log-sum-exp: the flash backward of each outer part,
given the *merged* output and log-sum-exp, yields exactly that part's share of dq, dk, dv (its P and
Δ = rowsum(dO∘O) are the global ones); the band's is done by hand because its bias needs a gradient too: dS scattered
back into the table's distance buckets, then dq += dT·E and dE += dTᵀ·q.
"""

import functools

import torch

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward

# Query rows per step. The flash kernel blocks the outer parts itself; the chunk only sets the band's share of the
# work (chunk + left + right keys per row, the only scores with an explicit bias) and the Python loop's length.
QUERY_CHUNK = 512


def _compute_dtype(dtype):
    # a half-precision softmax on the CPU is slower and less accurate; compute in fp32 and cast the result
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _chunks(length, left, right, chunk):
    """(i0, i1, a, b) per query chunk: keys [0, a) are wholly left of every row's band, [b, L) wholly right."""
    for i0 in range(0, length, chunk):
        i1 = min(i0 + chunk, length)
        b = min(max(i1 - 1 + right, 0), length)
        a = min(max(i0 - left + 1, 0), b)
        yield i0, i1, a, b


class _Inputs:
    """Everything a call derives from its arguments once: (B, H, L, D) contiguous operands with the scale folded
    into q, the table, the edge-shifted keys and the key mask as an additive bias."""

    def __init__(self, q, k, v, distance_embedding, left, right, scale, lengths, key_mask):
        self.batch, self.length, self.heads, self.head_dim = q.shape
        self.left, self.right = left, right
        dtype = _compute_dtype(q.dtype)
        self.q = (q.transpose(1, 2).to(dtype) * scale).contiguous()
        self.k = k.transpose(1, 2).to(dtype).contiguous()
        self.v = v.transpose(1, 2).to(dtype).contiguous()
        self.emb = distance_embedding.to(dtype)
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
        """(B, H, chunk, b - a): the band's scores' bias, plus the key mask; and the bucket of each column."""
        rows = torch.arange(i0, i1, device=self.q.device)
        cols = torch.arange(a, b, device=self.q.device)
        bucket = (cols[None, :] - rows[:, None]).clamp(-self.left, self.right) + self.left
        table = self.table[:, :, i0:i1]
        bias = torch.gather(table, 3, bucket.expand(*table.shape[:2], *bucket.shape))
        if self.key_bias is not None:
            bias = bias + self.key_bias[..., a:b]
        return bias, bucket

    def empty_rows(self, start, end, lse):
        """A part whose keys [start, end) are all masked for a sequence gives its rows lse 0 (an empty sum) in ATen's
        kernel, and output 0; they must weigh nothing in the merge. Computed from the mask on the device."""
        if self.key_valid is None:
            return lse
        empty = ~self.key_valid[:, start:end].any(dim=1)
        return lse.masked_fill(empty[:, None, None], float("-inf"))


def _query_mask(lengths, length, device):
    return torch.arange(length, device=device)[None, :] < lengths[:, None]  # (B, L)


def _finish(x, out, dtype):
    """(B, H, L, D) → (B, L, H·D) in ``dtype``."""
    return out.transpose(1, 2).reshape(x.batch, x.length, x.heads * x.head_dim).to(dtype)


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
                              zero_padded_queries=True, key_mask=None, chunk=QUERY_CHUNK):
    """Forward. Same arguments and result as ``rel_key_attention``; returns (out (B, L, H·D) in q's dtype,
    lse (B, H, L): the natural log of each row's Σ_j exp(score), fp32, or fp64 for fp64 inputs). No autograd."""
    x = _Inputs(q, k, v, distance_embedding, left, right, scale, lengths, key_mask)
    out = torch.empty_like(x.q)
    lse = torch.empty(x.batch, x.heads, x.length, device=q.device, dtype=torch.promote_types(x.q.dtype, torch.float32))
    for i0, i1, a, b in _chunks(x.length, left, right, chunk):
        q_c = x.q[:, :, i0:i1]
        parts = []
        if a > 0:
            part_out, part_lse = _flash(q_c, x.k_left[:, :, :a], x.v[:, :, :a], attn_mask=x.key_bias_of(0, a), scale=1.0)
            parts.append((part_out, x.empty_rows(0, a, part_lse)))
        if b > a:
            bias, _ = x.band_bias(i0, i1, a, b)
            part_out, part_lse = _flash(q_c, x.k[:, :, a:b], x.v[:, :, a:b], attn_mask=bias, scale=1.0)
            parts.append((part_out, x.empty_rows(a, b, part_lse)))
        if b < x.length:
            part_out, part_lse = _flash(q_c, x.k_right[:, :, b:], x.v[:, :, b:], attn_mask=x.key_bias_of(b, None),
                                        scale=1.0)
            parts.append((part_out, x.empty_rows(b, x.length, part_lse)))
        if len(parts) == 1:
            out[:, :, i0:i1], lse[:, :, i0:i1] = parts[0]
            continue
        chunk_lse = torch.logsumexp(torch.stack([part_lse for _, part_lse in parts]), dim=0)
        merged = sum(torch.exp(part_lse - chunk_lse)[..., None] * part_out for part_out, part_lse in parts)
        out[:, :, i0:i1], lse[:, :, i0:i1] = merged, chunk_lse
    if x.padded_rows is not None and zero_padded_queries:
        out.masked_fill_(x.padded_rows[:, None, :, None], 0.0)
    return _finish(x, out, q.dtype), lse


@_outside_autocast
def rel_key_attention_chunked_backward(grad_out, q, k, v, distance_embedding, out, lse, left, right, scale,
                                       lengths=None, zero_padded_queries=True, key_mask=None, chunk=QUERY_CHUNK):
    """Backward of ``rel_key_attention_chunked`` from its output and lse: (dq, dk, dv, d_distance_embedding), each
    in its input's dtype. No autograd; nothing of size L×L."""
    x = _Inputs(q, k, v, distance_embedding, left, right, scale, lengths, key_mask)
    dtype = x.q.dtype
    as_heads = lambda t: t.reshape(x.batch, x.length, x.heads, x.head_dim).transpose(1, 2).to(dtype)  # noqa: E731
    d_out, out = as_heads(grad_out), as_heads(out)
    if x.padded_rows is not None and zero_padded_queries:
        # those rows' output is the constant 0: their gradient reaches nothing
        d_out = d_out.masked_fill(x.padded_rows[:, None, :, None], 0.0)
    d_out, out, lse = d_out.contiguous(), out.contiguous(), lse.to(dtype)
    delta = (d_out * out).sum(dim=-1)  # (B, H, L)

    dq, dk, dv = torch.empty_like(x.q), torch.zeros_like(x.k), torch.zeros_like(x.v)
    d_emb = torch.zeros_like(x.emb)
    for i0, i1, a, b in _chunks(x.length, left, right, chunk):
        q_c, d_out_c, out_c, lse_c = x.q[:, :, i0:i1], d_out[:, :, i0:i1], out[:, :, i0:i1], lse[:, :, i0:i1]
        dq_c = torch.zeros_like(q_c)
        for keys, emb_row, start, end in ((x.k_left, 0, 0, a), (x.k_right, -1, b, x.length)):
            if end > start:
                dq_p, dk_p, dv_p = _flash_backward(
                    d_out_c, q_c, keys[:, :, start:end], x.v[:, :, start:end], out_c, lse_c, 0.0, False,
                    attn_mask=x.key_bias_of(start, end), scale=1.0)
                dq_c += dq_p
                dk[:, :, start:end] += dk_p
                dv[:, :, start:end] += dv_p
                d_emb[emb_row] += dk_p.sum(dim=(0, 1, 2))  # these keys carried E[0] / E[R-1]
        if b > a:
            bias, bucket = x.band_bias(i0, i1, a, b)
            k_band, v_band = x.k[:, :, a:b], x.v[:, :, a:b]
            probs = torch.matmul(q_c, k_band.transpose(-1, -2)).add_(bias).sub_(lse_c[..., None]).exp_()
            dv[:, :, a:b] += torch.matmul(probs.transpose(-1, -2), d_out_c)
            d_scores = torch.matmul(d_out_c, v_band.transpose(-1, -2)).sub_(delta[:, :, i0:i1, None]).mul_(probs)
            dq_c += torch.matmul(d_scores, k_band)
            dk[:, :, a:b] += torch.matmul(d_scores.transpose(-1, -2), q_c)
            d_table = torch.zeros(*d_scores.shape[:3], x.emb.shape[0], device=q.device, dtype=dtype)
            d_table.scatter_add_(3, bucket.expand(*d_scores.shape), d_scores)
            dq_c += torch.matmul(d_table, x.emb)
            d_emb += torch.einsum("bhcr,bhcd->rd", d_table, q_c)
        dq[:, :, i0:i1] = dq_c
    return (_finish(x, dq * scale, q.dtype).view(q.shape), _finish(x, dk, k.dtype).view(k.shape),
            _finish(x, dv, v.dtype).view(v.shape), d_emb.to(distance_embedding.dtype))
