"""Shaw relative-key self-attention (w2v-bert-2.0's ``position_embeddings_type="relative_key"``).

    scores[b,h,i,j] = scale * q_i·k_j + scale * q_i·E[clamp(j - i, -left, right) + left]
    out = softmax_j(scores + key mask) @ v

Reading order: reference → kernel → launcher → dispatch.
"""

import torch

from ._backend import use_triton


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


# ------------------------------------------------------------------------------------------------ dispatch
def rel_key_attention(q, k, v, distance_embedding, left, right, scale, lengths=None, zero_padded_queries=True):
    """Relative-key attention over right-padded sequences.

    q, k, v: (B, L, H, D), any strides with a unit stride on D (views of the projections' output);
    distance_embedding: (left + right + 1, D); left, right: clip distances; scale: softmax scale;
    lengths: optional (B,) integer key lengths (keys at or past a sequence's length are ignored);
    zero_padded_queries: write zeros to query rows at or past the length (True) or compute them like transformers,
    attending to the valid keys (False; needed when something downstream, e.g. the adapter, reads padded rows).
    Returns (B, L, H·D) in q's dtype.
    """
    use_triton(q, k, v)  # validates W2VBERT_FAST_BACKEND; the Triton kernel plugs in here
    key_mask = None
    if lengths is not None:
        key_mask = torch.arange(q.shape[1], device=q.device)[None, :] < lengths.to(q.device)[:, None]
    out = rel_key_attention_reference(q, k, v, distance_embedding, left, right, scale, key_mask)
    if key_mask is not None and zero_padded_queries:
        out = out.masked_fill(~key_mask[..., None], 0)
    return out
