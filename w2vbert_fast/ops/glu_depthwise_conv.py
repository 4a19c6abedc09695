"""The conformer convolution module's middle: GLU → causal depthwise conv → LayerNorm → swish, channel-last.

Input is the (B, T, 2C) output of pointwise_conv1; output (B, T, C) goes to pointwise_conv2. transformers runs
these as five ops with two transposes, moving the activations five or six times; the kernel reads x once and
writes the output once.

Each program owns a tile of BLOCK_T time steps × all C channels (LayerNorm needs the whole row) and walks the
channels in chunks of BLOCK_C. Per chunk it computes the GLU of the BLOCK_T + K - 1 input rows the tile's outputs
read, once, into a per-program scratch window small enough (a few tens of KiB) to stay in L1, then sums the K taps
from it: the GLU's sigmoid is evaluated about (BLOCK_T + K - 1) / BLOCK_T times per element instead of K times, and
the K-fold re-reading hits L1 rather than L2. The un-normalised conv rows (fp32) go to a per-program row buffer;
LayerNorm (two-pass: mean while convolving, then the centred variance, then normalise + swish + store) reads them
back from cache. The grid is persistent (a few programs per SM) so every program's scratch is reused tile after
tile and stays cache-resident instead of being written back to DRAM. The forward also writes each row's LayerNorm
mean and rstd (8 bytes a row): with x, all the backward keeps.

Backward, two kernels (conv output h, n = LayerNorm(h) before its affine, z = n·γ + β, y = swish(z)):

* the LayerNorm backward, a row kernel like the forward (same persistent grid, same scratch): it recomputes the
  conv rows from x, then dz = dy·σ(z)·(1 + z·(1 − σ(z))), and writes dh = rstd·(dn − mean(dn) − n·mean(dn·n)) with
  dn = dz·γ, fp32 (B, T, C), the one intermediate; per-program partial sums of dγ = Σ dz·n and dβ = Σ dz.
* the GLU/conv backward, over (sequence × time split, channel chunk): dGLU[s] = Σ_k w[k]·dh[s + K − 1 − k] (the
  anti-causal conv, its K shifted dh tiles L1 hits), dx from the GLU's backward (0 at the zero-input rows), and
  per-(sequence, split) partials of dw[k] = Σ_s GLU[s]·dh[s + K − 1 − k] from the same tiles.

Zero input: a row at or past its sequence's length (HAS_LENGTHS, one int per sequence) or, with HAS_FRAME_MASK, a
row whose byte in the (B, T) frame mask is 0 — left padding and holes, at any position, as transformers'
masked_fill before pointwise_conv1 makes them. Both flags are constexprs: right padding (lengths alone) compiles to
the code it had before frame masks existed. With the mask, each kernel also reads one byte per input row a tile
reads (DRAM: one byte a frame, against 2C elements of x; the row kernels re-read it per channel chunk from cache).
The row kernels still read x at a masked frame and drop its GLU; the GLU/conv backward does not read it.

The partials are reduced with torch.sum. Why Triton rather than a recompute plus PyTorch's backward (no GPU has
timed either; DRAM bytes counted per element of (B, T, C), bf16 x): the kernels move 6 forward (x 4, y 2) and
22-24 backward (x 4, dy 2, its second read 0-2, dh 4 written; x 4, dh 4, dx 4). Recompute + eager backward
writes and rereads every stage's output (GLU, padded copy, conv, LayerNorm, swish) and their gradients, with
transposes around the channel-first conv: by the same count about 24 to recompute and 36 backward, and several
(B, T, C) tensors alive at once instead of one.

Reading order: reference → kernels → configs → launchers → torch.library ops → dispatch → LAUNCH_META.
"""

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._backend import (TRITON, KernelLaunch, check_lengths, checks_values, dispatch, triton_interpreter_enabled,
                       values_checkable)


# ----------------------------------------------------------------------------------------------- reference
def glu_depthwise_conv_reference(x, conv_weight, ln_weight, ln_bias, eps, lengths=None, frame_mask=None):
    """PyTorch reference. x: (B, T, 2C); conv_weight: (C, 1, K); ln_weight, ln_bias: (C,); lengths: optional (B,);
    frame_mask: optional (B, T), nonzero / True at real frames.

    A frame at or past its sequence's length, or False in frame_mask, is zero input to the conv (transformers'
    masked_fill before pointwise_conv1, which has no bias); output t reads inputs t-K+1 … t.
    """
    real = None
    if lengths is not None:
        real = torch.arange(x.shape[1], device=x.device)[None, :] < lengths.to(x.device)[:, None]
    if frame_mask is not None:
        real = frame_mask.to(x.device).bool() if real is None else real & frame_mask.to(x.device).bool()
    if real is not None:
        x = x.masked_fill(~real[..., None], 0)
    channels, _, kernel_size = conv_weight.shape
    h = F.glu(x, dim=-1).transpose(1, 2)  # (B, C, T)
    h = F.conv1d(F.pad(h, (kernel_size - 1, 0)), conv_weight.to(h.dtype), groups=channels)
    h = F.layer_norm(h.transpose(1, 2), (channels,), ln_weight.to(h.dtype), ln_bias.to(h.dtype), eps)
    return F.silu(h)


# -------------------------------------------------------------------------------------------------- kernels
def _window_rows(block_t, kernel_size):
    """Scratch rows of one GLU window: BLOCK_T + K - 1 rounded up to whole BLOCK_T chunks (the loads' shape)."""
    return triton.cdiv(block_t + kernel_size - 1, block_t) * block_t


def _scratch_per_program(block_t, block_c, channels, kernel_size):
    """fp32 elements: the GLU window of one channel chunk, then the tile's un-normalised conv rows."""
    return _window_rows(block_t, kernel_size) * block_c + block_t * triton.cdiv(channels, block_c) * block_c


@triton.jit
def _row_program(scratch_ptr, scratch_stride, batch, length, channels, KERNEL_SIZE: tl.constexpr,
                 BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """What a persistent row program (the forward, the conv/LayerNorm backward) walks and where its scratch lies:
    (pid, channel chunks, time blocks per sequence, tiles in all, row and channel offsets, the window's tile of GLU
    rows, the tile of conv rows after the window)."""
    WINDOW_ROWS: tl.constexpr = (BLOCK_T + KERNEL_SIZE - 1 + BLOCK_T - 1) // BLOCK_T * BLOCK_T
    num_chunks = tl.cdiv(channels, BLOCK_C)
    padded_channels = num_chunks * BLOCK_C
    num_time_blocks = tl.cdiv(length, BLOCK_T)
    pid = tl.program_id(0)
    offs_t = tl.arange(0, BLOCK_T)
    offs_c = tl.arange(0, BLOCK_C)
    window = scratch_ptr + pid.to(tl.int64) * scratch_stride
    window_tile = window + offs_t[:, None] * BLOCK_C + offs_c[None, :]
    conv_tile = window + WINDOW_ROWS * BLOCK_C + offs_t[:, None] * padded_channels + offs_c[None, :]
    return pid, num_chunks, num_time_blocks, batch * num_time_blocks, offs_t, offs_c, window_tile, conv_tile


@triton.jit
def _tile_rows(tile, num_time_blocks, lengths_ptr, length, HAS_LENGTHS: tl.constexpr, BLOCK_T: tl.constexpr):
    """A tile's sequence, first row and the sequence's length (clamped to the buffer's, so unchecked lengths stay in
    bounds)."""
    b = tile // num_time_blocks
    t0 = (tile % num_time_blocks) * BLOCK_T
    seq_length = length
    if HAS_LENGTHS:
        seq_length = tl.minimum(tl.load(lengths_ptr + b).to(tl.int32), length)
    return b, t0, seq_length


@triton.jit
def _conv_rows(x_base, stride_xt, weight_ptr, window_tile, conv_tile, t0, seq_length, frame_mask_ptr, b, length,
               channels, offs_t, offs_c, KERNEL_SIZE: tl.constexpr, HAS_FRAME_MASK: tl.constexpr,
               SYNC_SCRATCH: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """One tile's un-normalised conv rows (fp32) into the row buffer, chunk by chunk; returns the rows' sums.

    Scratch row s of the window holds the GLU of input row t0 - (K - 1) + s, for one chunk of channels.
    With HAS_FRAME_MASK, frame_mask_ptr[b · length + t] is input row t's byte of the (B, T) frame mask (0: zero
    input; int32 offsets: B · T bytes stay far below 2^31, x being 2C times larger)."""
    WINDOW_CHUNKS: tl.constexpr = (BLOCK_T + KERNEL_SIZE - 1 + BLOCK_T - 1) // BLOCK_T
    num_chunks = tl.cdiv(channels, BLOCK_C)
    row_sum = tl.zeros([BLOCK_T], dtype=tl.float32)
    for chunk in range(num_chunks):
        cols = chunk * BLOCK_C + offs_c
        c_valid = cols < channels
        if SYNC_SCRATCH:
            tl.debug_barrier()  # every thread has finished the previous chunk's (or tile's) reads of the scratch
        # a loop, not unrolled: one slice's loads live at a time keeps the registers (and so the occupancy) low
        for part in tl.range(WINDOW_CHUNKS, loop_unroll_factor=1):
            rows = t0 - (KERNEL_SIZE - 1) + part * BLOCK_T + offs_t
            # rows before 0 are the conv's left padding, rows at or past the length zero input; rows past the
            # window's end are never read by a tap, so not loaded either
            row_valid = (rows >= 0) & (rows < seq_length) & (part * BLOCK_T + offs_t < BLOCK_T + KERNEL_SIZE - 1)
            mask = row_valid[:, None] & c_valid[None, :]
            x_rows = x_base + rows[:, None].to(tl.int64) * stride_xt + cols[None, :]
            value = tl.load(x_rows, mask=mask, other=0.0).to(tl.float32)
            gate = tl.load(x_rows + channels, mask=mask, other=0.0).to(tl.float32)
            # (the address before the GLU: the order the code had before frame masks, so flag-off code is identical)
            window_rows = window_tile + part * BLOCK_T * BLOCK_C
            glu = value * tl.sigmoid(gate)
            if HAS_FRAME_MASK:
                # a masked frame (a hole, left padding) is zero input too. Its byte is read beside x (one byte a
                # row, per channel chunk: cache hits after the first) and applied after the GLU (a NaN there is
                # dropped): masking the x loads with it instead made ptxas spill (sm_80 LayerNorm backward, bf16)
                real = tl.load(frame_mask_ptr + b * length + rows, mask=row_valid, other=0) != 0
                glu = tl.where(real[:, None], glu, 0.0)
            tl.store(window_rows, glu)
        if SYNC_SCRATCH:
            tl.debug_barrier()  # the window is visible to every thread of the program

        acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
        for tap in tl.range(KERNEL_SIZE, loop_unroll_factor=1):
            glu = tl.load(window_tile + tap * BLOCK_C)
            # channels past C get weight 0, so their conv rows are exact zeros for the LayerNorm sums
            tap_weight = tl.load(weight_ptr + tap * channels + cols, mask=c_valid, other=0.0).to(tl.float32)
            acc += glu * tap_weight[None, :]
        row_sum += tl.sum(acc, 1)
        tl.store(conv_tile + chunk * BLOCK_C, acc)
    return row_sum


@triton.jit
def _glu_depthwise_conv_kernel(
    x_ptr, weight_ptr, ln_weight_ptr, ln_bias_ptr, lengths_ptr, frame_mask_ptr, out_ptr, mean_ptr, rstd_ptr,
    scratch_ptr, stride_xb, stride_xt, stride_ob, stride_ot,
    batch, length, channels, eps, scratch_stride,
    KERNEL_SIZE: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_FRAME_MASK: tl.constexpr, SYNC_SCRATCH: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
    PROGRAMS_PER_SM: tl.constexpr,  # read by the launcher's grid only (see the configs)
):
    pid, num_chunks, num_time_blocks, num_tiles, offs_t, offs_c, window_tile, conv_tile = _row_program(
        scratch_ptr, scratch_stride, batch, length, channels, KERNEL_SIZE, BLOCK_T, BLOCK_C)

    for tile in range(pid, num_tiles, tl.num_programs(0)):
        b, t0, seq_length = _tile_rows(tile, num_time_blocks, lengths_ptr, length, HAS_LENGTHS, BLOCK_T)
        x_base = x_ptr + b.to(tl.int64) * stride_xb
        row_sum = _conv_rows(x_base, stride_xt, weight_ptr, window_tile, conv_tile, t0, seq_length, frame_mask_ptr,
                             b, length, channels, offs_t, offs_c, KERNEL_SIZE, HAS_FRAME_MASK, SYNC_SCRATCH, BLOCK_T,
                             BLOCK_C)

        # the centred variance (two-pass: conv rows can have a mean large against their spread)
        mean = row_sum / channels
        if SYNC_SCRATCH:
            tl.debug_barrier()  # the conv rows are visible to every thread
        row_sq = tl.zeros([BLOCK_T], dtype=tl.float32)
        for chunk in range(num_chunks):
            c_valid = chunk * BLOCK_C + offs_c < channels
            centred = tl.where(c_valid[None, :], tl.load(conv_tile + chunk * BLOCK_C) - mean[:, None], 0.0)
            row_sq += tl.sum(centred * centred, 1)
        rstd = 1.0 / tl.sqrt(row_sq / channels + eps)
        out_rows = t0 + offs_t
        row_valid = out_rows < length
        # the backward's LayerNorm statistics: 8 bytes a row, against 2C elements of input
        stats_offset = b.to(tl.int64) * length + out_rows
        tl.store(mean_ptr + stats_offset, mean, mask=row_valid)
        tl.store(rstd_ptr + stats_offset, rstd, mask=row_valid)

        # normalise, swish, the one store
        out_base = out_ptr + b.to(tl.int64) * stride_ob + out_rows[:, None].to(tl.int64) * stride_ot
        for chunk in range(num_chunks):
            cols = chunk * BLOCK_C + offs_c
            c_valid = cols < channels
            ln_weight = tl.load(ln_weight_ptr + cols, mask=c_valid, other=0.0).to(tl.float32)
            ln_bias = tl.load(ln_bias_ptr + cols, mask=c_valid, other=0.0).to(tl.float32)
            y = (tl.load(conv_tile + chunk * BLOCK_C) - mean[:, None]) * rstd[:, None] * ln_weight[None, :]
            y = y + ln_bias[None, :]
            y = y * tl.sigmoid(y)
            tl.store(out_base + cols[None, :], y.to(out_ptr.dtype.element_ty),
                     mask=row_valid[:, None] & c_valid[None, :])


@triton.jit
def _swish_layer_norm_backward(conv_chunk, mean, rstd, ln_weight_ptr, ln_bias_ptr, dout_rows, cols, c_valid,
                               row_valid):
    """One channel chunk of a tile back through swish and the LayerNorm's affine, as both passes of the LayerNorm
    backward need it: (norm, the rows normalised before the affine; dz = ∂L/∂z at z = norm·γ + β; dnorm = dz·γ).
    Channels past C load γ = 0, so their dnorm is 0; rows past T load dout = 0, so they add nothing anywhere."""
    ln_weight = tl.load(ln_weight_ptr + cols, mask=c_valid, other=0.0).to(tl.float32)
    ln_bias = tl.load(ln_bias_ptr + cols, mask=c_valid, other=0.0).to(tl.float32)
    norm = (tl.load(conv_chunk) - mean[:, None]) * rstd[:, None]
    z = norm * ln_weight[None, :] + ln_bias[None, :]
    sig = tl.sigmoid(z)
    dout = tl.load(dout_rows + cols[None, :], mask=row_valid[:, None] & c_valid[None, :], other=0.0)
    dz = dout.to(tl.float32) * sig * (1.0 + z * (1.0 - sig))
    return norm, dz, dz * ln_weight[None, :]


@triton.jit
def _conv_norm_backward_kernel(
    x_ptr, weight_ptr, ln_weight_ptr, ln_bias_ptr, lengths_ptr, frame_mask_ptr, mean_ptr, rstd_ptr, dout_ptr,
    dconv_ptr, dnorm_partial_ptr, scratch_ptr,
    stride_xb, stride_xt, stride_db, stride_dt,
    batch, length, channels, scratch_stride,
    KERNEL_SIZE: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_FRAME_MASK: tl.constexpr, SYNC_SCRATCH: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
    PROGRAMS_PER_SM: tl.constexpr,  # read by the launcher's grid only (see the configs)
):
    """dconv = ∂L/∂(conv output), (B, T, C) fp32, through swish and LayerNorm; this program's partial sums of
    dgamma (row 0) and dbeta (row 1) of ``dnorm_partial[pid]``. The conv rows are recomputed as the forward does."""
    pid, num_chunks, num_time_blocks, num_tiles, offs_t, offs_c, window_tile, conv_tile = _row_program(
        scratch_ptr, scratch_stride, batch, length, channels, KERNEL_SIZE, BLOCK_T, BLOCK_C)
    dgamma_partial = dnorm_partial_ptr + pid.to(tl.int64) * 2 * channels
    dbeta_partial = dgamma_partial + channels

    for tile in range(pid, num_tiles, tl.num_programs(0)):
        b, t0, seq_length = _tile_rows(tile, num_time_blocks, lengths_ptr, length, HAS_LENGTHS, BLOCK_T)
        _conv_rows(x_ptr + b.to(tl.int64) * stride_xb, stride_xt, weight_ptr, window_tile, conv_tile, t0,
                   seq_length, frame_mask_ptr, b, length, channels, offs_t, offs_c, KERNEL_SIZE, HAS_FRAME_MASK,
                   SYNC_SCRATCH, BLOCK_T, BLOCK_C)
        rows = t0 + offs_t
        row_valid = rows < length
        stats_offset = b.to(tl.int64) * length + rows
        mean = tl.load(mean_ptr + stats_offset, mask=row_valid, other=0.0)
        rstd = tl.load(rstd_ptr + stats_offset, mask=row_valid, other=0.0)
        dout_base = dout_ptr + b.to(tl.int64) * stride_db + rows[:, None].to(tl.int64) * stride_dt
        if SYNC_SCRATCH:
            tl.debug_barrier()  # the conv rows are visible to every thread

        # pass 1: the rows' Σ dnorm and Σ dnorm·norm (LayerNorm's backward needs both before any dconv)
        sum_dnorm = tl.zeros([BLOCK_T], dtype=tl.float32)
        sum_dnorm_norm = tl.zeros([BLOCK_T], dtype=tl.float32)
        for chunk in range(num_chunks):
            cols = chunk * BLOCK_C + offs_c
            norm, _, dnorm = _swish_layer_norm_backward(conv_tile + chunk * BLOCK_C, mean, rstd, ln_weight_ptr,
                                                        ln_bias_ptr, dout_base, cols, cols < channels, row_valid)
            sum_dnorm += tl.sum(dnorm, 1)
            sum_dnorm_norm += tl.sum(dnorm * norm, 1)
        mean_dnorm = sum_dnorm / channels
        mean_dnorm_norm = sum_dnorm_norm / channels

        # pass 2: dconv = rstd · (dnorm − mean(dnorm) − norm · mean(dnorm · norm)), dnorm recomputed from dout;
        # the gamma/beta partials
        dconv_base = dconv_ptr + (b.to(tl.int64) * length + rows[:, None]) * channels
        for chunk in range(num_chunks):
            cols = chunk * BLOCK_C + offs_c
            c_valid = cols < channels
            norm, dz, dnorm = _swish_layer_norm_backward(conv_tile + chunk * BLOCK_C, mean, rstd, ln_weight_ptr,
                                                         ln_bias_ptr, dout_base, cols, c_valid, row_valid)
            dconv = rstd[:, None] * (dnorm - mean_dnorm[:, None] - norm * mean_dnorm_norm[:, None])
            tl.store(dconv_base + cols[None, :], dconv, mask=row_valid[:, None] & c_valid[None, :])
            # the gamma/beta partials here rather than in pass 1: fewer values live there (sm_80 spilled)
            dgamma_old = tl.load(dgamma_partial + cols, mask=c_valid, other=0.0)
            dbeta_old = tl.load(dbeta_partial + cols, mask=c_valid, other=0.0)
            if SYNC_SCRATCH:
                tl.debug_barrier()  # a column sum lives in several warps: every copy reads before any writes
            tl.store(dgamma_partial + cols, dgamma_old + tl.sum(dz * norm, 0), mask=c_valid)
            tl.store(dbeta_partial + cols, dbeta_old + tl.sum(dz, 0), mask=c_valid)


@triton.jit
def _glu_conv_backward_kernel(
    x_ptr, weight_ptr, lengths_ptr, frame_mask_ptr, dconv_ptr, dx_ptr, dweight_partial_ptr,
    stride_xb, stride_xt, stride_dxb, stride_dxt,
    length, channels, splits, rows_per_split,
    KERNEL_SIZE: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_FRAME_MASK: tl.constexpr,
    SYNC_PARTIALS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Program (b · splits + split, chunk) walks input rows [split · rows_per_split, + rows_per_split) of sequence b
    for one channel chunk: dglu[s] = Σ_k w[k] · dconv[s + K - 1 - k] (the anti-causal conv), dx from the GLU's
    backward, and Σ_s glu[s] · dconv[s + K - 1 - k] into its own partial dweight[k] (reduced by the launcher)."""
    pid = tl.program_id(0)
    chunk = tl.program_id(1)
    b = pid // splits
    split = pid % splits
    offs_t = tl.arange(0, BLOCK_T)
    cols = chunk * BLOCK_C + tl.arange(0, BLOCK_C)
    c_valid = cols < channels
    seq_length = length
    if HAS_LENGTHS:
        seq_length = tl.minimum(tl.load(lengths_ptr + b).to(tl.int32), length)
    x_base = x_ptr + b.to(tl.int64) * stride_xb
    dx_base = dx_ptr + b.to(tl.int64) * stride_dxb
    dconv_base = dconv_ptr + b.to(tl.int64) * length * channels
    partial = dweight_partial_ptr + pid.to(tl.int64) * KERNEL_SIZE * channels + cols
    start = split * rows_per_split
    end = tl.minimum(start + rows_per_split, length)
    if HAS_FRAME_MASK:
        # the step's mask bytes at mask_rows + s0: these pointers are loop-invariant, where rebuilding them from
        # rows each step made ptxas spill offs_t (triton 3.6, sm_80, 16 × 64 on 4 warps)
        mask_rows = frame_mask_ptr + b * length + offs_t

    for s0 in range(start, end, BLOCK_T):
        rows = s0 + offs_t
        # rows at or past the length, and masked frames, were zero input: their GLU is 0 and no gradient reaches x
        # there (transformers' masked_fill makes them a constant)
        real = rows < seq_length
        if HAS_FRAME_MASK:
            real &= tl.load(mask_rows + s0, mask=real, other=0) != 0  # a byte per row
        in_valid = real[:, None] & c_valid[None, :]
        x_rows = x_base + rows[:, None].to(tl.int64) * stride_xt + cols[None, :]
        value = tl.load(x_rows, mask=in_valid, other=0.0).to(tl.float32)
        gate_sig = tl.sigmoid(tl.load(x_rows + channels, mask=in_valid, other=0.0).to(tl.float32))
        glu = value * gate_sig
        dglu = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
        for tap in tl.range(KERNEL_SIZE, loop_unroll_factor=1):
            out_rows = rows + (KERNEL_SIZE - 1 - tap)
            dconv = tl.load(dconv_base + out_rows[:, None].to(tl.int64) * channels + cols[None, :],
                            mask=(out_rows < length)[:, None] & c_valid[None, :], other=0.0)
            tap_weight = tl.load(weight_ptr + tap * channels + cols, mask=c_valid, other=0.0).to(tl.float32)
            dglu += dconv * tap_weight[None, :]
            old = tl.load(partial + tap * channels, mask=c_valid, other=0.0)
            if SYNC_PARTIALS:
                tl.debug_barrier()  # a column sum lives in several warps: every copy reads before any writes
            tl.store(partial + tap * channels, old + tl.sum(glu * dconv, 0), mask=c_valid)
        dvalue = tl.where(in_valid, dglu * gate_sig, 0.0)
        dgate = dglu * value * gate_sig * (1.0 - gate_sig)  # value is 0 where the input was masked
        store_mask = (rows < length)[:, None] & c_valid[None, :]
        dx_rows = dx_base + rows[:, None].to(tl.int64) * stride_dxt + cols[None, :]
        tl.store(dx_rows, dvalue.to(dx_ptr.dtype.element_ty), mask=store_mask)
        tl.store(dx_rows + channels, dgate.to(dx_ptr.dtype.element_ty), mask=store_mask)


# ------------------------------------------------------------------------------------------------- configs
# PROGRAMS_PER_SM rides in a row kernel's config but is no tiling: the kernel ignores it and the launcher's grid reads
# it (persistent programs = PROGRAMS_PER_SM × the SM count, at most one per tile), so each tiling comes with the
# occupancy it was checked at. A test may force a program count instead (the launchers' ``programs``).
#
# The forward: 16 resident warps per SM (PROGRAMS_PER_SM × num_warps; 4-8 before): a streaming kernel needs them to
# hide HBM latency. The window is filled one BLOCK_T slice at a time and the taps loop is not unrolled, so only the
# accumulator and one slice are live: 40-72 registers a thread and no spill on sm_90 and sm_80, triton 3.6 and 3.9,
# bf16/fp16/fp32 (the compile check). Other shapes tried (8 × 128 on 4 or 8 warps, 8 × 256, 16 × 64, 16 × 32) each
# had a config × target × dtype where ptxas spilled a few bytes: not offered. The GLU window (BLOCK_T + K - 1 rows ×
# BLOCK_C × 4 bytes, 5-10 KiB) stays in L1; the row buffers (BLOCK_T × C × 4 bytes per program, 32 rows per SM)
# total 17 MiB at C = 1024 on 132 SMs, inside the L2, so the scratch is not written back to DRAM.
FORWARD_CONFIGS = [
    triton.Config({"BLOCK_T": block_t, "BLOCK_C": block_c, "PROGRAMS_PER_SM": per_sm}, num_warps=warps, num_stages=1)
    for block_t, block_c, warps, per_sm in [(8, 64, 4, 4), (8, 32, 2, 8)]
]
# The LayerNorm backward, a row kernel like the forward with more live tiles (norm, z, sigmoid, dout, dnorm): ≤ 128
# registers and no spill on sm_90 and sm_80 in bf16, fp16 and fp32 (16-28 resident warps). Left out, for a few bytes
# of spill ptxas chose on sm_80: 128 columns on 8 warps, 32 or 64 on 2 warps.
NORM_BACKWARD_CONFIGS = [
    triton.Config({"BLOCK_T": 8, "BLOCK_C": block_c, "PROGRAMS_PER_SM": per_sm}, num_warps=warps, num_stages=1)
    for block_c, warps, per_sm in [(64, 4, 4), (128, 4, 4), (256, 8, 2)]
]
# The GLU/conv backward: BLOCK_T input rows × BLOCK_C channels per step, no scratch. 8 elements of a tile per thread:
# 64-121 registers (sm_90 / sm_80, triton 3.6 and 3.9), ≥ 16 resident warps, no spills. At 16 a thread (e.g. 32 × 64
# on 4 warps) the value, gate, GLU, dGLU and dconv tiles take 120-255 registers and some spill.
GLU_BACKWARD_CONFIGS = [
    triton.Config({"BLOCK_T": block_t, "BLOCK_C": block_c}, num_warps=warps, num_stages=1)
    for block_t, block_c, warps in [(16, 64, 4), (32, 64, 8), (16, 128, 8), (32, 32, 4), (8, 128, 4)]
]
# Its grid: time is split so that batch × splits × channel chunks comes to about this many programs per SM.
GLU_BACKWARD_PROGRAMS_PER_SM = 4
# Under the interpreter the cost is per op, not per element: one config with few tiles keeps CI fast, and tiles
# smaller than the tests' lengths and channel counts exercise ragged last tiles and chunks.
INTERPRETER_ROW_CONFIG = triton.Config({"BLOCK_T": 16, "BLOCK_C": 64, "PROGRAMS_PER_SM": 1}, num_warps=4,
                                       num_stages=1)
INTERPRETER_GLU_BACKWARD_CONFIG = triton.Config({"BLOCK_T": 16, "BLOCK_C": 32}, num_warps=4, num_stages=1)


def _autotuned(kernel, configs, interpreter_config, reset_to_zero=None):
    # keyed on the real dimensions; the autotuner adds every tensor argument's dtype to them
    return triton.autotune(configs=[interpreter_config] if triton_interpreter_enabled() else configs,
                           key=["channels", "KERNEL_SIZE"], reset_to_zero=reset_to_zero)(kernel)


_forward_tuned = _autotuned(_glu_depthwise_conv_kernel, FORWARD_CONFIGS, INTERPRETER_ROW_CONFIG)
_norm_backward_tuned = _autotuned(_conv_norm_backward_kernel, NORM_BACKWARD_CONFIGS, INTERPRETER_ROW_CONFIG,
                                  reset_to_zero=["dnorm_partial_ptr"])
_glu_backward_tuned = _autotuned(_glu_conv_backward_kernel, GLU_BACKWARD_CONFIGS, INTERPRETER_GLU_BACKWARD_CONFIG,
                                 reset_to_zero=["dweight_partial_ptr"])


# ----------------------------------------------------------------------------------------------- launchers
def _sm_count(x):
    # the interpreter: 3 "SMs", so programs walk several tiles and the persistent loops are exercised
    return torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 3


def _sync_scratch():
    # the interpreter runs a program's threads in lock step: no barrier needed (nor implemented)
    return not triton_interpreter_enabled()


def _kernel_layout(x, conv_weight):
    """x with unit channel stride (any row strides are read in place) and the conv weight as (K, C): one tap's
    weights for all channels contiguous."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    channels, _, kernel_size = conv_weight.shape
    return x, conv_weight.reshape(channels, kernel_size).t().contiguous()


def _kernel_frame_mask(frame_mask):
    """The bool (B, T) frame mask as the kernels read it, one byte a frame: contiguous uint8 (a view, no copy, of a
    contiguous mask); None stays None (HAS_FRAME_MASK off: the pointer argument is a constexpr None)."""
    return None if frame_mask is None else frame_mask.contiguous().view(torch.uint8)


def _chosen(tuned, config):
    """(kernel to call, the configs it may run, keywords to add): the autotuner and its configs, or, for a forced
    ``config`` (a triton.Config), the plain JIT function with that config's meta-parameters and launch options."""
    if config is None:
        return tuned, tuned.configs, {}
    return tuned.fn, [config], config.all_kwargs()


def _row_launch(tuned, x, channels, kernel_size, config, programs, sm_count):
    """What a row kernel (the forward, the LayerNorm backward) needs besides its tensors: (kernel, grid, keywords of
    a forced config, the scratch, its per-program stride, the most programs any candidate config launches). The
    scratch is sized for whichever candidate the autotuner picks. ``programs``: a forced persistent program count,
    instead of PROGRAMS_PER_SM × ``sm_count``."""
    batch, length = x.shape[:2]
    kernel, configs, extra = _chosen(tuned, config)
    if config is not None:
        # the kernel's signature takes it; a forced tiling without one gets one program per SM
        extra = {"PROGRAMS_PER_SM": 1, **extra}

    def programs_for(meta):
        wanted = programs if programs is not None else meta.get("PROGRAMS_PER_SM", 1) * sm_count
        return max(1, min(wanted, batch * triton.cdiv(length, meta["BLOCK_T"])))

    scratch_stride = max(_scratch_per_program(c.kwargs["BLOCK_T"], c.kwargs["BLOCK_C"], channels, kernel_size)
                         for c in configs)
    max_programs = max(programs_for(c.kwargs) for c in configs)
    scratch = torch.empty(max_programs * scratch_stride, device=x.device, dtype=torch.float32)
    return kernel, lambda meta: (programs_for(meta),), extra, scratch, scratch_stride, max_programs


def _forward_launch(x, conv_weight, ln_weight, ln_bias, eps, lengths, frame_mask, out, config, programs, sm_count):
    """(kernel, grid, keyword arguments, (out, mean, rstd)) of the forward; ``_launch`` runs it, LAUNCH_META
    describes it."""
    x, weight = _kernel_layout(x, conv_weight)
    frame_mask = _kernel_frame_mask(frame_mask)
    batch, length, two_channels = x.shape
    channels, kernel_size = two_channels // 2, weight.shape[0]
    if out is None:
        out = torch.empty(batch, length, channels, device=x.device, dtype=x.dtype)
    mean = torch.empty(batch, length, device=x.device, dtype=torch.float32)
    rstd = torch.empty(batch, length, device=x.device, dtype=torch.float32)
    kernel, grid, extra, scratch, scratch_stride, _ = _row_launch(
        _forward_tuned, x, channels, kernel_size, config, programs, sm_count)
    args = dict(
        x_ptr=x, weight_ptr=weight, ln_weight_ptr=ln_weight, ln_bias_ptr=ln_bias,
        lengths_ptr=lengths if lengths is not None else x, frame_mask_ptr=frame_mask, out_ptr=out, mean_ptr=mean,
        rstd_ptr=rstd, scratch_ptr=scratch, stride_xb=x.stride(0), stride_xt=x.stride(1), stride_ob=out.stride(0),
        stride_ot=out.stride(1), batch=batch, length=length, channels=channels, eps=float(eps),
        scratch_stride=scratch_stride, KERNEL_SIZE=kernel_size, HAS_LENGTHS=lengths is not None,
        HAS_FRAME_MASK=frame_mask is not None, SYNC_SCRATCH=_sync_scratch(), **extra,
    )
    return kernel, grid, args, (out, mean, rstd)


def _launch(x, conv_weight, ln_weight, ln_bias, eps, lengths, frame_mask=None, out=None, config=None, programs=None):
    """The forward: returns (out (B, T, C) in x's dtype, mean, rstd (B, T) fp32). ``frame_mask``: None or (B, T)
    bool; ``out``: a preallocated buffer (tests pass one filled with NaN); ``config``: a triton.Config to force
    instead of the autotuned one (tests run every candidate); ``programs``: a persistent program count to force."""
    kernel, grid, args, outputs = _forward_launch(x, conv_weight, ln_weight, ln_bias, eps, lengths, frame_mask, out,
                                                  config, programs, _sm_count(x))
    kernel[grid](**args)
    return outputs


def _time_splits(batch, length, channels, configs, target_programs):
    """(splits, rows per split) of the GLU/conv backward's time axis, so that batch × splits × channel chunks fills
    about ``target_programs``. Each split is a whole number of every candidate's BLOCK_T (all powers of two), so the
    split does not depend on the config the autotuner picks."""
    row_align = max(c.kwargs["BLOCK_T"] for c in configs)
    chunks = triton.cdiv(channels, max(c.kwargs["BLOCK_C"] for c in configs))
    splits = max(1, min(triton.cdiv(length, row_align), triton.cdiv(target_programs, batch * chunks)))
    rows_per_split = triton.cdiv(triton.cdiv(length, splits), row_align) * row_align
    return triton.cdiv(length, rows_per_split), rows_per_split


def _backward_launches(dout, x, conv_weight, ln_weight, ln_bias, lengths, frame_mask, mean, rstd, dx, dconv,
                       norm_config, glu_config, norm_programs, glu_programs, sm_count):
    """The backward's two launches, [(kernel, grid, keyword arguments)]: the LayerNorm backward, then the GLU/conv
    backward that reads its dconv; ``_launch_backward`` runs them, LAUNCH_META describes them."""
    x, weight = _kernel_layout(x, conv_weight)
    frame_mask = _kernel_frame_mask(frame_mask)
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    batch, length, two_channels = x.shape
    channels, kernel_size = two_channels // 2, weight.shape[0]
    lengths_arg = lengths if lengths is not None else x
    if dconv is None:
        dconv = torch.empty(batch, length, channels, device=x.device, dtype=torch.float32)
    if dx is None:
        dx = torch.empty(batch, length, two_channels, device=x.device, dtype=x.dtype)

    kernel, grid, extra, scratch, scratch_stride, max_programs = _row_launch(
        _norm_backward_tuned, x, channels, kernel_size, norm_config, norm_programs, sm_count)
    norm_backward = (kernel, grid, dict(
        x_ptr=x, weight_ptr=weight, ln_weight_ptr=ln_weight, ln_bias_ptr=ln_bias, lengths_ptr=lengths_arg,
        frame_mask_ptr=frame_mask, mean_ptr=mean, rstd_ptr=rstd, dout_ptr=dout, dconv_ptr=dconv,
        dnorm_partial_ptr=torch.zeros(max_programs, 2, channels, device=x.device, dtype=torch.float32),
        scratch_ptr=scratch, stride_xb=x.stride(0), stride_xt=x.stride(1), stride_db=dout.stride(0),
        stride_dt=dout.stride(1), batch=batch, length=length, channels=channels, scratch_stride=scratch_stride,
        KERNEL_SIZE=kernel_size, HAS_LENGTHS=lengths is not None, HAS_FRAME_MASK=frame_mask is not None,
        SYNC_SCRATCH=_sync_scratch(), **extra,
    ))

    kernel, configs, extra = _chosen(_glu_backward_tuned, glu_config)
    target = glu_programs if glu_programs is not None else GLU_BACKWARD_PROGRAMS_PER_SM * sm_count
    splits, rows_per_split = _time_splits(batch, length, channels, configs, target)
    glu_backward = (kernel, lambda meta: (batch * splits, triton.cdiv(channels, meta["BLOCK_C"])), dict(
        x_ptr=x, weight_ptr=weight, lengths_ptr=lengths_arg, frame_mask_ptr=frame_mask, dconv_ptr=dconv, dx_ptr=dx,
        # one (K, C) slab per (sequence, split): a program writes only its own chunk's columns of it
        dweight_partial_ptr=torch.zeros(batch * splits, kernel_size, channels, device=x.device, dtype=torch.float32),
        stride_xb=x.stride(0), stride_xt=x.stride(1), stride_dxb=dx.stride(0), stride_dxt=dx.stride(1),
        length=length, channels=channels, splits=splits, rows_per_split=rows_per_split,
        KERNEL_SIZE=kernel_size, HAS_LENGTHS=lengths is not None, HAS_FRAME_MASK=frame_mask is not None,
        SYNC_PARTIALS=_sync_scratch(), **extra,
    ))
    return [norm_backward, glu_backward]


def _launch_backward(dout, x, conv_weight, ln_weight, ln_bias, lengths, frame_mask, mean, rstd, dx=None, dconv=None,
                     norm_config=None, glu_config=None, norm_programs=None, glu_programs=None):
    """Gradients of x (B, T, 2C, x's dtype), conv_weight, ln_weight, ln_bias (each in its own dtype).

    Two kernels: the LayerNorm backward writes dconv = ∂L/∂(conv output) (fp32, (B, T, C): the only intermediate,
    freed on return) and per-program dgamma/dbeta partials; the GLU/conv backward reads it to write dx and per-split
    dweight partials. ``dx``/``dconv``: preallocated buffers (tests fill them with NaN); ``norm_config``,
    ``glu_config``: triton.Configs to force; ``norm_programs``: as ``_launch``'s ``programs``; ``glu_programs``: the
    program count the GLU backward's time splits aim at, instead of GLU_BACKWARD_PROGRAMS_PER_SM × the SM count."""
    launches = _backward_launches(dout, x, conv_weight, ln_weight, ln_bias, lengths, frame_mask, mean, rstd, dx,
                                  dconv, norm_config, glu_config, norm_programs, glu_programs, _sm_count(x))
    for kernel, grid, args in launches:
        kernel[grid](**args)
    (_, _, norm_args), (_, _, glu_args) = launches
    channels, kernel_size = ln_weight.shape[0], conv_weight.shape[-1]
    dweight = glu_args["dweight_partial_ptr"].sum(0).t().contiguous().reshape(channels, 1, kernel_size)
    dnorm_partial = norm_args["dnorm_partial_ptr"]
    # two sums, not two views of one: a custom op's outputs must not alias each other
    dgamma = dnorm_partial[:, 0].sum(0).to(ln_weight.dtype)
    dbeta = dnorm_partial[:, 1].sum(0).to(ln_bias.dtype)
    return glu_args["dx_ptr"], dweight.to(conv_weight.dtype), dgamma, dbeta


# ---------------------------------------------------------------------------------------- torch.library ops
@torch.library.custom_op("w2vbert_fast::glu_depthwise_conv", mutates_args=())
def _glu_depthwise_conv_op(
    x: torch.Tensor, conv_weight: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, eps: float,
    lengths: Optional[torch.Tensor], frame_mask: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch(x, conv_weight, ln_weight, ln_bias, eps, lengths, frame_mask)


@_glu_depthwise_conv_op.register_fake
def _(x, conv_weight, ln_weight, ln_bias, eps, lengths, frame_mask):
    batch, length = x.shape[:2]
    stats = x.new_empty(batch, length, dtype=torch.float32)
    return x.new_empty(batch, length, x.shape[2] // 2), stats, torch.empty_like(stats)


@torch.library.custom_op("w2vbert_fast::glu_depthwise_conv_backward", mutates_args=())
def _glu_depthwise_conv_backward_op(
    dout: torch.Tensor, x: torch.Tensor, conv_weight: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor,
    lengths: Optional[torch.Tensor], frame_mask: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch_backward(dout, x, conv_weight, ln_weight, ln_bias, lengths, frame_mask, mean, rstd)


@_glu_depthwise_conv_backward_op.register_fake
def _(dout, x, conv_weight, ln_weight, ln_bias, lengths, frame_mask, mean, rstd):
    # contiguous, as the launcher allocates them (empty_like would copy a permuted x's strides)
    return tuple(t.new_empty(t.shape) for t in (x, conv_weight, ln_weight, ln_bias))


def _setup_context(ctx, inputs, output):
    x, conv_weight, ln_weight, ln_bias, _, lengths, frame_mask = inputs
    _, mean, rstd = output
    # O(B·T·C): the input and two floats (and the mask's byte) a row; the conv rows are recomputed in the backward
    ctx.save_for_backward(x, conv_weight, ln_weight, ln_bias, lengths, frame_mask, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, dout, _dmean, _drstd):
    x, conv_weight, ln_weight, ln_bias, lengths, frame_mask, mean, rstd = ctx.saved_tensors
    dx, dweight, dgamma, dbeta = _glu_depthwise_conv_backward_op(dout, x, conv_weight, ln_weight, ln_bias, lengths,
                                                                 frame_mask, mean, rstd)
    return dx, dweight, dgamma, dbeta, None, None, None


_glu_depthwise_conv_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------ dispatch
def _check_frame_mask(frame_mask, batch, length):
    """frame_mask: a (B, T) bool or 0/1 integer tensor; its values are checked where that costs no device sync
    (unchecked, any nonzero value is a real frame, as transformers' ``attention_mask.bool()`` reads it)."""
    if not isinstance(frame_mask, torch.Tensor) or tuple(frame_mask.shape) != (batch, length):
        shape = tuple(frame_mask.shape) if isinstance(frame_mask, torch.Tensor) else type(frame_mask).__name__
        raise ValueError(f"frame_mask must be a (batch, time) = ({batch}, {length}) tensor, got {shape}")
    if frame_mask.dtype.is_floating_point or frame_mask.dtype.is_complex:
        raise ValueError(f"frame_mask must be a bool or 0/1 integer tensor, got {frame_mask.dtype}")
    if frame_mask.dtype != torch.bool and frame_mask.numel() and checks_values(frame_mask):
        values = frame_mask.unique()
        if ((values != 0) & (values != 1)).any():
            raise ValueError(f"frame_mask must hold only 0 and 1, got the values {values.tolist()[:8]}")


def _check_inputs(x, conv_weight, ln_weight, ln_bias, lengths, frame_mask):
    for name, t in (("x", x), ("conv_weight", conv_weight), ("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if x.dim() != 3 or x.shape[-1] % 2:
        raise ValueError(f"x must have shape (batch, time, 2 * channels) with an even last dim, got {tuple(x.shape)}")
    channels = x.shape[-1] // 2
    if conv_weight.dim() != 3 or conv_weight.shape[:2] != (channels, 1) or conv_weight.shape[2] % 2 == 0:
        raise ValueError(
            f"conv_weight must have shape (channels, 1, kernel_size) = ({channels}, 1, odd K), "
            f"got {tuple(conv_weight.shape)}"
        )
    for name, t in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        if tuple(t.shape) != (channels,):
            raise ValueError(f"{name} must have shape (channels,) = ({channels},), got {tuple(t.shape)}")
    devices = {t.device for t in (x, conv_weight, ln_weight, ln_bias)}
    if lengths is not None:
        check_lengths(lengths, x.shape[0])
        devices.add(lengths.device)
        # (unchecked on a GPU, a negative length means no real frame, as 0 does, in the kernel and the reference)
        if values_checkable(lengths) and int(lengths.min()) < 0:
            raise ValueError(f"lengths must be non-negative, got {lengths.tolist()}")
    if frame_mask is not None:
        _check_frame_mask(frame_mask, *x.shape[:2])
        devices.add(frame_mask.device)
    if len(devices) > 1:
        raise ValueError("x, conv_weight, ln_weight, ln_bias, lengths and frame_mask must be on one device, "
                         f"got {sorted(map(str, devices))}")


def glu_depthwise_conv(x, conv_weight, ln_weight, ln_bias, eps, lengths=None, frame_mask=None):
    """swish(LayerNorm(causal_depthwise_conv(GLU(x)))) over the channel-last (B, T, 2C) x; returns (B, T, C).

    x: (B, T, 2C), the output of pointwise_conv1 (value half first, gate half second, as ``F.glu``);
    conv_weight: (C, 1, K), K odd; ln_weight, ln_bias: (C,), eps: the depthwise LayerNorm's; lengths: optional (B,)
    integer lengths; frame_mask: optional (B, T) bool or 0/1 integer, True / 1 at real frames (transformers'
    attention_mask). Frame t of sequence b is zero input to the GLU and the conv iff t >= lengths[b] (lengths given)
    or not frame_mask[b, t] (frame_mask given): left padding and holes as well as right padding, as transformers'
    ``masked_fill`` before pointwise_conv1 (no bias) makes them. Every output row is still computed, masked ones
    too (the conv of their neighbours, as transformers does). Both may be given: lengths one past the last real
    frame, frame_mask for the holes before it. Math in fp32; the result in x's dtype.

    Differentiable with respect to x, conv_weight, ln_weight and ln_bias on every backend (dx is 0 at a zero-input
    frame); the kernels run forward and backward (saving x and two floats a row, and the mask, nothing else). Under torch.autocast x may be half precision while
    the weights stay fp32: each gradient comes back in its input's dtype. T = 0 gives an empty (B, 0, C) result.

    Backends (``W2VBERT_FAST_BACKEND``): ``triton``, or ``auto`` on a GPU arch and dtype ``_backend``'s table lists
    as clean in the compile check, the kernels; elsewhere (other GPUs and dtypes, fp64 on a GPU, ``portable``, CPU
    tensors) and with ``torch`` the reference, as PyTorch ops, which is the CPU's fast path too. lengths' and frame_mask's values are checked where that costs no device sync; the
    kernels clamp lengths, and read any nonzero frame_mask value as a real frame.
    """
    _check_inputs(x, conv_weight, ln_weight, ln_bias, lengths, frame_mask)
    if x.numel() == 0:
        # nothing to convolve (F.conv1d would reject the padded empty sequence); still connected to x for autograd
        return F.glu(x, dim=-1)
    if dispatch(x, conv_weight, op="glu_depthwise_conv") == TRITON:
        if lengths is not None:
            lengths = lengths.to(torch.int32)
        if frame_mask is not None and frame_mask.dtype != torch.bool:
            frame_mask = frame_mask != 0  # on the device; the kernels read the bool mask's bytes
        return _glu_depthwise_conv_op(x, conv_weight, ln_weight, ln_bias, float(eps), lengths, frame_mask)[0]
    # FAST and REFERENCE alike run the reference: on a CPU it is the fast path too. At the model's size (B = 1,
    # T = 1500, C = 1024, K = 31, fp32, lengths given) it takes 34 ms on 1 thread and 17 ms on 2 (best of 40, on the
    # shared 2-core development machine). Rewrites in plain PyTorch were no faster: the GLU made contiguous first
    # 37 / 17 ms, written into a pre-padded buffer 38 / 19, the conv's own padding then a slice 73 / 38, the conv as
    # 31 shifted multiply-adds over channel-last rows 197 / 41. Masking after the GLU (half the bytes) took 31 / 15,
    # within the machine's noise, and would let a NaN in a padded gate reach dx.
    return glu_depthwise_conv_reference(x, conv_weight, ln_weight, ln_bias, eps, lengths, frame_mask)


# --------------------------------------------------------------------------------------------- LAUNCH_META
# An H100 SXM's SMs, for the examples: the count sets only grids and the GLU backward's time splits, and leaves those
# a real launch's specialisation (splits > 1, rows per split a multiple of 16).
_EXAMPLE_SM_COUNT = 132
_EXAMPLE_EPS = 1e-5  # the model's layer_norm_eps


def _example_inputs(shape, dtype, with_frame_mask):
    """Meta tensors as the op gets them for one of the compile check's shapes (channels = heads · head_dim, the
    model's hidden size): x, conv_weight, ln_weight, ln_bias in ``dtype``; int32 lengths, as dispatch passes them;
    a (B, T) bool frame mask or None."""
    t, (batch, length) = getattr(torch, dtype), (shape["batch"], shape["length"])
    channels = shape["heads"] * shape["head_dim"]
    meta = dict(device="meta", dtype=t)
    frame_mask = torch.empty(batch, length, device="meta", dtype=torch.bool) if with_frame_mask else None
    return (torch.empty(batch, length, 2 * channels, **meta), torch.empty(channels, 1, shape["kernel_size"], **meta),
            torch.empty(channels, **meta), torch.empty(channels, **meta),
            torch.empty(batch, device="meta", dtype=torch.int32), frame_mask)


def _described(args):
    """A launch's keyword arguments as the compile check takes them: a tensor by its dtype."""
    return {name: value.dtype if isinstance(value, torch.Tensor) else value for name, value in args.items()}


def _forward_example(with_frame_mask):
    def example(shape, dtype):
        x, conv_weight, ln_weight, ln_bias, lengths, frame_mask = _example_inputs(shape, dtype, with_frame_mask)
        return _described(_forward_launch(x, conv_weight, ln_weight, ln_bias, _EXAMPLE_EPS, lengths, frame_mask,
                                          None, None, None, _EXAMPLE_SM_COUNT)[2])

    return example


def _backward_example(which, with_frame_mask):
    def example(shape, dtype):
        x, conv_weight, ln_weight, ln_bias, lengths, frame_mask = _example_inputs(shape, dtype, with_frame_mask)
        stats = torch.empty(x.shape[:2], device="meta", dtype=torch.float32)
        dout = x.new_empty(*x.shape[:2], x.shape[2] // 2)
        launches = _backward_launches(dout, x, conv_weight, ln_weight, ln_bias, lengths, frame_mask, stats, stats,
                                      None, None, None, None, None, None, _EXAMPLE_SM_COUNT)
        return _described(launches[which][2])

    return example


# Each kernel twice: as the model launches it for right padding (lengths alone, HAS_FRAME_MASK off: the code of
# before frame masks existed) and with a frame mask (left padding, holes), keyed "<kernel>+frame_mask". The kernels
# compute in fp32 whatever the input dtype: no fp64 anywhere, no local memory.
_EXPECT = ("no_fp64", "no_local")
LAUNCH_META = {
    f"{name}{suffix}": KernelLaunch(kernel, example(with_frame_mask), configs, expect=_EXPECT)
    for suffix, with_frame_mask in (("", False), ("+frame_mask", True))
    for name, kernel, example, configs in (
        ("_glu_depthwise_conv_kernel", _forward_tuned, _forward_example, lambda dtype: FORWARD_CONFIGS),
        ("_conv_norm_backward_kernel", _norm_backward_tuned, lambda mask: _backward_example(0, mask),
         lambda dtype: NORM_BACKWARD_CONFIGS),
        ("_glu_conv_backward_kernel", _glu_backward_tuned, lambda mask: _backward_example(1, mask),
         lambda dtype: GLU_BACKWARD_CONFIGS),
    )
}
