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
tile and stays cache-resident instead of being written back to DRAM.

Reading order: reference → kernel → launcher → torch.library op → dispatch.
"""

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._backend import check_lengths, triton_interpreter_enabled, use_triton, values_checkable


# ----------------------------------------------------------------------------------------------- reference
def glu_depthwise_conv_reference(x, conv_weight, ln_weight, ln_bias, eps, lengths=None):
    """PyTorch reference. x: (B, T, 2C); conv_weight: (C, 1, K); ln_weight, ln_bias: (C,); lengths: optional (B,).

    Positions at or past a sequence's length are zero input to the conv; output t reads inputs t-K+1 … t.
    """
    if lengths is not None:
        valid = torch.arange(x.shape[1], device=x.device)[None, :] < lengths.to(x.device)[:, None]
        x = x.masked_fill(~valid[..., None], 0)
    channels, _, kernel_size = conv_weight.shape
    h = F.glu(x, dim=-1).transpose(1, 2)  # (B, C, T)
    h = F.conv1d(F.pad(h, (kernel_size - 1, 0)), conv_weight.to(h.dtype), groups=channels)
    h = F.layer_norm(h.transpose(1, 2), (channels,), ln_weight.to(h.dtype), ln_bias.to(h.dtype), eps)
    return F.silu(h)


# -------------------------------------------------------------------------------------------------- kernel
def _window_rows(block_t, kernel_size):
    """Scratch rows of one GLU window: BLOCK_T + K - 1 rounded up to whole BLOCK_T chunks (the loads' shape)."""
    return triton.cdiv(block_t + kernel_size - 1, block_t) * block_t


def _scratch_per_program(block_t, block_c, channels, kernel_size):
    """fp32 elements: the GLU window of one channel chunk, then the tile's un-normalised conv rows."""
    return _window_rows(block_t, kernel_size) * block_c + block_t * triton.cdiv(channels, block_c) * block_c


def _autotune_configs(interpreted=None):
    if triton_interpreter_enabled() if interpreted is None else interpreted:
        # The interpreter's cost is per op, not per element: one small config keeps CI fast, and tiles smaller than
        # the tests' lengths and channel counts exercise ragged last tiles and chunks.
        return [triton.Config({"BLOCK_T": 8, "BLOCK_C": 64, "PROGRAMS_PER_SM": 1}, num_warps=4, num_stages=1)]
    # The GLU window (16-40 KiB) stays in L1; the row buffer (BLOCK_T × C × 4 bytes per program) times the programs
    # stays at a fraction of the L2 for C = 1024 (11-23 MiB), so the scratch is not written back to DRAM. Registers
    # (ptxas, sm_90): 160-190 per thread at 8 accumulators a thread, 254 at 16, which bounds resident programs.
    return [
        triton.Config({"BLOCK_T": block_t, "BLOCK_C": block_c, "PROGRAMS_PER_SM": per_sm}, num_warps=warps,
                      num_stages=1)
        for block_t, block_c, warps, per_sm in [
            (16, 64, 4, 2), (8, 128, 4, 2), (8, 64, 2, 4), (16, 128, 8, 1), (16, 128, 4, 2), (32, 64, 4, 1),
        ]
    ]


@triton.autotune(configs=_autotune_configs(), key=["channels", "KERNEL_SIZE"])
@triton.jit
def _glu_depthwise_conv_kernel(
    x_ptr, weight_ptr, ln_weight_ptr, ln_bias_ptr, lengths_ptr, out_ptr, scratch_ptr,
    stride_xb, stride_xt, stride_ob, stride_ot,
    batch, length, channels, eps, scratch_stride,
    KERNEL_SIZE: tl.constexpr, HAS_LENGTHS: tl.constexpr, SYNC_SCRATCH: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
    PROGRAMS_PER_SM: tl.constexpr,  # read by the launcher's grid only
):
    # scratch row s of the window holds the GLU of input row t0 - (K - 1) + s, for one chunk of channels
    WINDOW_CHUNKS: tl.constexpr = (BLOCK_T + KERNEL_SIZE - 1 + BLOCK_T - 1) // BLOCK_T
    WINDOW_ROWS: tl.constexpr = WINDOW_CHUNKS * BLOCK_T
    num_chunks = tl.cdiv(channels, BLOCK_C)
    padded_channels = num_chunks * BLOCK_C
    num_time_blocks = tl.cdiv(length, BLOCK_T)
    num_tiles = batch * num_time_blocks

    pid = tl.program_id(0)
    offs_t = tl.arange(0, BLOCK_T)
    offs_c = tl.arange(0, BLOCK_C)
    window = scratch_ptr + pid.to(tl.int64) * scratch_stride
    window_tile = window + offs_t[:, None] * BLOCK_C + offs_c[None, :]
    conv_tile = window + WINDOW_ROWS * BLOCK_C + offs_t[:, None] * padded_channels + offs_c[None, :]

    for tile in range(pid, num_tiles, tl.num_programs(0)):
        b = tile // num_time_blocks
        t0 = (tile % num_time_blocks) * BLOCK_T
        seq_length = length
        if HAS_LENGTHS:
            seq_length = tl.minimum(tl.load(lengths_ptr + b).to(tl.int32), length)
        x_base = x_ptr + b.to(tl.int64) * stride_xb

        # pass 1, per channel chunk: GLU window → K taps → un-normalised conv rows, and the rows' sums
        row_sum = tl.zeros([BLOCK_T], dtype=tl.float32)
        for chunk in range(num_chunks):
            cols = chunk * BLOCK_C + offs_c
            c_valid = cols < channels
            if SYNC_SCRATCH:
                tl.debug_barrier()  # every thread has finished the previous chunk's (or tile's) reads of the scratch
            for part in tl.static_range(WINDOW_CHUNKS):
                rows = t0 - (KERNEL_SIZE - 1) + part * BLOCK_T + offs_t
                # rows before 0 are the conv's left padding, rows at or past the length zero input; rows past the
                # window's end are never read by a tap, so not loaded either
                row_valid = (rows >= 0) & (rows < seq_length) & (part * BLOCK_T + offs_t < BLOCK_T + KERNEL_SIZE - 1)
                mask = row_valid[:, None] & c_valid[None, :]
                x_rows = x_base + rows[:, None].to(tl.int64) * stride_xt + cols[None, :]
                value = tl.load(x_rows, mask=mask, other=0.0).to(tl.float32)
                gate = tl.load(x_rows + channels, mask=mask, other=0.0).to(tl.float32)
                tl.store(window_tile + part * BLOCK_T * BLOCK_C, value * tl.sigmoid(gate))
            if SYNC_SCRATCH:
                tl.debug_barrier()  # the window is visible to every thread of the program

            acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
            for tap in range(KERNEL_SIZE):
                glu = tl.load(window_tile + tap * BLOCK_C)
                # channels past C get weight 0, so their conv rows are exact zeros for the LayerNorm sums
                tap_weight = tl.load(weight_ptr + tap * channels + cols, mask=c_valid, other=0.0).to(tl.float32)
                acc += glu * tap_weight[None, :]
            row_sum += tl.sum(acc, 1)
            tl.store(conv_tile + chunk * BLOCK_C, acc)

        # pass 2: the centred variance (two-pass: conv rows can have a mean large against their spread)
        mean = row_sum / channels
        if SYNC_SCRATCH:
            tl.debug_barrier()  # the conv rows are visible to every thread
        row_sq = tl.zeros([BLOCK_T], dtype=tl.float32)
        for chunk in range(num_chunks):
            c_valid = chunk * BLOCK_C + offs_c < channels
            centred = tl.where(c_valid[None, :], tl.load(conv_tile + chunk * BLOCK_C) - mean[:, None], 0.0)
            row_sq += tl.sum(centred * centred, 1)
        rstd = 1.0 / tl.sqrt(row_sq / channels + eps)

        # pass 3: normalise, swish, the one store
        out_rows = t0 + offs_t
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
                     mask=(out_rows[:, None] < length) & c_valid[None, :])


# ------------------------------------------------------------------------------------------------ launcher
def _launch(x, conv_weight, ln_weight, ln_bias, eps, lengths, out=None, config=None):
    """``out``: a preallocated (B, T, C) buffer (tests pass one filled with NaN); ``config``: (BLOCK_T, BLOCK_C,
    num_warps, programs) to force a tiling instead of the autotuned one (tests run several)."""
    batch, length, two_channels = x.shape
    channels = two_channels // 2
    kernel_size = conv_weight.shape[-1]
    if x.stride(-1) != 1:
        x = x.contiguous()
    # (K, C): one tap's weights for all channels are contiguous
    weight = conv_weight.reshape(channels, kernel_size).t().contiguous()
    if out is None:
        out = torch.empty(batch, length, channels, device=x.device, dtype=x.dtype)
    if x.is_cuda:
        sm_count = torch.cuda.get_device_properties(x.device).multi_processor_count
    else:
        sm_count = 3  # the interpreter: several tiles per program, so the persistent loop is exercised

    if config is not None:
        block_t, block_c, num_warps, programs = config
        kernel = _glu_depthwise_conv_kernel.fn
        configs = [triton.Config({"BLOCK_T": block_t, "BLOCK_C": block_c, "PROGRAMS_PER_SM": 1}, num_warps=num_warps)]
        sm_count = programs
    else:
        kernel = _glu_depthwise_conv_kernel
        configs = _glu_depthwise_conv_kernel.configs

    def programs_for(meta):
        return max(1, min(meta["PROGRAMS_PER_SM"] * sm_count, batch * triton.cdiv(length, meta["BLOCK_T"])))

    # sized for whichever config the autotuner picks
    scratch_stride = max(_scratch_per_program(c.kwargs["BLOCK_T"], c.kwargs["BLOCK_C"], channels, kernel_size)
                         for c in configs)
    max_programs = max(programs_for(c.kwargs) for c in configs)
    scratch = torch.empty(max_programs * scratch_stride, device=x.device, dtype=torch.float32)
    extra = {}
    if config is not None:
        extra = dict(configs[0].kwargs, num_warps=configs[0].num_warps)
    kernel[lambda meta: (programs_for(meta),)](
        x, weight, ln_weight, ln_bias, lengths if lengths is not None else x, out, scratch,
        x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        batch, length, channels, float(eps), scratch_stride,
        KERNEL_SIZE=kernel_size, HAS_LENGTHS=lengths is not None,
        # the interpreter runs a program's threads in lock step: no barrier needed (nor implemented)
        SYNC_SCRATCH=not triton_interpreter_enabled(),
        **extra,
    )
    return out


# ---------------------------------------------------------------------------------------- torch.library op
@torch.library.custom_op("w2vbert_fast::glu_depthwise_conv", mutates_args=())
def _glu_depthwise_conv_op(
    x: torch.Tensor, conv_weight: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, eps: float,
    lengths: Optional[torch.Tensor],
) -> torch.Tensor:
    return _launch(x, conv_weight, ln_weight, ln_bias, eps, lengths)


@_glu_depthwise_conv_op.register_fake
def _(x, conv_weight, ln_weight, ln_bias, eps, lengths):
    return x.new_empty(x.shape[0], x.shape[1], x.shape[2] // 2)


# ------------------------------------------------------------------------------------------------ dispatch
def _check_inputs(x, conv_weight, ln_weight, ln_bias, lengths):
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
    if len(devices) > 1:
        raise ValueError(f"x, conv_weight, ln_weight, ln_bias and lengths must be on one device, got {sorted(map(str, devices))}")


def glu_depthwise_conv(x, conv_weight, ln_weight, ln_bias, eps, lengths=None):
    """swish(LayerNorm(causal_depthwise_conv(GLU(x)))) over the channel-last (B, T, 2C) x; returns (B, T, C).

    x: (B, T, 2C), the output of pointwise_conv1 (value half first, gate half second, as ``F.glu``);
    conv_weight: (C, 1, K), K odd; ln_weight, ln_bias: (C,), eps: the depthwise LayerNorm's; lengths: optional (B,)
    integer lengths: positions at or past a sequence's length are zero input to the conv (rows past the length are
    still computed, as transformers does). Math in fp32; the result in x's dtype.

    The Triton kernel is forward only: when autograd needs gradients, the PyTorch reference runs instead.
    """
    _check_inputs(x, conv_weight, ln_weight, ln_bias, lengths)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, conv_weight, ln_weight, ln_bias))
    if use_triton(x, conv_weight) and not needs_grad and x.numel() > 0:
        if lengths is not None:
            lengths = lengths.to(torch.int32)
        return _glu_depthwise_conv_op(x, conv_weight, ln_weight, ln_bias, float(eps), lengths)
    return glu_depthwise_conv_reference(x, conv_weight, ln_weight, ln_bias, eps, lengths)
