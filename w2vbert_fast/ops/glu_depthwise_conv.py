"""The conformer convolution module's middle: GLU → causal depthwise conv → LayerNorm → swish, channel-last.

Input is the (B, T, 2C) output of pointwise_conv1; output (B, T, C) goes to pointwise_conv2. transformers runs
these as five ops with two transposes, moving the activations five or six times; the kernel reads x once and
writes the output once.

Each program owns a tile of BLOCK_T time steps × all C channels (LayerNorm needs the whole row). It computes the
GLU of the BLOCK_T + K - 1 input rows the tile's outputs read, once, into a small per-program scratch that stays in
cache, then sums the K taps from it: the GLU's sigmoid is evaluated about (BLOCK_T + K - 1) / BLOCK_T times per
element instead of K times. LayerNorm (two-pass, in registers) and swish follow before the one store. The grid is
persistent (about two programs per SM) so the scratch stays small and cache-resident.

Reading order: reference → kernel → launcher → torch.library op → dispatch.
"""

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._backend import triton_interpreter_enabled, use_triton


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
@triton.jit
def _glu_depthwise_conv_kernel(
    x_ptr, weight_ptr, ln_weight_ptr, ln_bias_ptr, lengths_ptr, out_ptr, scratch_ptr,
    stride_xb, stride_xt, stride_ob, stride_ot,
    length, channels, eps, num_time_blocks, num_tiles,
    KERNEL_SIZE: tl.constexpr, HAS_LENGTHS: tl.constexpr, SYNC_SCRATCH: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # the input rows one tile reads, in chunks of BLOCK_T rows: scratch row s holds input row t0 - (K - 1) + s
    WINDOW_CHUNKS: tl.constexpr = (BLOCK_T + KERNEL_SIZE - 1 + BLOCK_T - 1) // BLOCK_T
    pid = tl.program_id(0)
    scratch = scratch_ptr + pid.to(tl.int64) * (WINDOW_CHUNKS * BLOCK_T * BLOCK_C)
    offs_t = tl.arange(0, BLOCK_T)
    offs_c = tl.arange(0, BLOCK_C)
    c_valid = offs_c < channels
    ln_weight = tl.load(ln_weight_ptr + offs_c, mask=c_valid, other=0.0).to(tl.float32)
    ln_bias = tl.load(ln_bias_ptr + offs_c, mask=c_valid, other=0.0).to(tl.float32)

    for tile in range(pid, num_tiles, tl.num_programs(0)):
        b = tile // num_time_blocks
        t0 = (tile % num_time_blocks) * BLOCK_T
        seq_length = length
        if HAS_LENGTHS:
            seq_length = tl.minimum(tl.load(lengths_ptr + b).to(tl.int32), length)
        x_base = x_ptr + b.to(tl.int64) * stride_xb

        if SYNC_SCRATCH:
            tl.debug_barrier()  # every thread has finished reading the previous tile's scratch
        for chunk in tl.static_range(WINDOW_CHUNKS):
            rows = t0 - (KERNEL_SIZE - 1) + chunk * BLOCK_T + offs_t
            # rows before the start are the conv's left padding; rows at or past the length are masked to zero input
            row_valid = (rows >= 0) & (rows < seq_length) & (chunk * BLOCK_T + offs_t < BLOCK_T + KERNEL_SIZE - 1)
            mask = row_valid[:, None] & c_valid[None, :]
            x_rows = x_base + rows[:, None].to(tl.int64) * stride_xt + offs_c[None, :]
            value = tl.load(x_rows, mask=mask, other=0.0).to(tl.float32)
            gate = tl.load(x_rows + channels, mask=mask, other=0.0).to(tl.float32)
            scratch_rows = scratch + (chunk * BLOCK_T + offs_t)[:, None] * BLOCK_C + offs_c[None, :]
            tl.store(scratch_rows, value * tl.sigmoid(gate))
        if SYNC_SCRATCH:
            tl.debug_barrier()  # the GLU rows are visible to every thread of the program

        acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
        for tap in range(KERNEL_SIZE):
            glu = tl.load(scratch + (tap + offs_t)[:, None] * BLOCK_C + offs_c[None, :])
            tap_weight = tl.load(weight_ptr + tap * channels + offs_c, mask=c_valid, other=0.0).to(tl.float32)
            acc += glu * tap_weight[None, :]

        # LayerNorm over the channels, two-pass in registers (padded channels hold exact zeros)
        mean = tl.sum(acc, 1) / channels
        centred = tl.where(c_valid[None, :], acc - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, 1) / channels + eps)
        y = centred * rstd[:, None] * ln_weight[None, :] + ln_bias[None, :]
        y = y * tl.sigmoid(y)
        out_rows = t0 + offs_t
        out_ptrs = out_ptr + b.to(tl.int64) * stride_ob + out_rows[:, None].to(tl.int64) * stride_ot + offs_c[None, :]
        tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=(out_rows[:, None] < length) & c_valid[None, :])


# ------------------------------------------------------------------------------------------------ launcher
_MAX_CHANNELS = 4096  # all channels of a row live in one program's registers


def _pick_config(channels):
    """(BLOCK_T, num_warps): about 16k fp32 accumulators per program."""
    block_c = triton.next_power_of_2(channels)
    if triton_interpreter_enabled():
        return 8, 4  # small tiles: several tiles per program and a ragged last tile even at T = 100
    block_t = max(8, min(64, 16384 // block_c))
    return block_t, 8 if block_c >= 512 else 4


def _launch(x, conv_weight, ln_weight, ln_bias, eps, lengths, out=None, config=None):
    """``out``: a preallocated (B, T, C) buffer (tests pass one filled with NaN); ``config``: (BLOCK_T, num_warps,
    programs) to force a tiling (tests run several)."""
    batch, length, two_channels = x.shape
    channels = two_channels // 2
    kernel_size = conv_weight.shape[-1]
    if x.stride(-1) != 1:
        x = x.contiguous()
    # (K, C): one tap's weights for all channels are contiguous
    weight = conv_weight.reshape(channels, kernel_size).t().contiguous()
    if out is None:
        out = torch.empty(batch, length, channels, device=x.device, dtype=x.dtype)
    block_c = triton.next_power_of_2(channels)
    block_t, num_warps = _pick_config(channels)
    if config is not None:
        block_t, num_warps = config[0], config[1]
    num_time_blocks = triton.cdiv(length, block_t)
    num_tiles = batch * num_time_blocks
    if config is not None and len(config) > 2:
        programs = config[2]
    elif x.is_cuda:
        programs = 2 * torch.cuda.get_device_properties(x.device).multi_processor_count
    else:
        programs = 3  # the interpreter: a persistent loop of several tiles per program
    programs = max(1, min(programs, num_tiles))
    window_rows = triton.cdiv(block_t + kernel_size - 1, block_t) * block_t
    scratch = torch.empty(programs * window_rows * block_c, device=x.device, dtype=torch.float32)
    _glu_depthwise_conv_kernel[(programs,)](
        x, weight, ln_weight, ln_bias, lengths if lengths is not None else x, out, scratch,
        x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        length, channels, float(eps), num_time_blocks, num_tiles,
        KERNEL_SIZE=kernel_size, HAS_LENGTHS=lengths is not None,
        # the interpreter runs a program's threads in lock step: no barrier needed (nor implemented)
        SYNC_SCRATCH=not triton_interpreter_enabled(),
        BLOCK_T=block_t, BLOCK_C=block_c, num_warps=num_warps,
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
        if not isinstance(lengths, torch.Tensor) or lengths.dim() != 1 or lengths.shape[0] != x.shape[0]:
            shape = tuple(lengths.shape) if isinstance(lengths, torch.Tensor) else type(lengths).__name__
            raise ValueError(f"lengths must be a (batch,) = ({x.shape[0]},) integer tensor, got {shape}")
        if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
            raise ValueError(f"lengths must be an integer tensor, got {lengths.dtype}")
        devices.add(lengths.device)
        if x.shape[0] > 0 and not torch.compiler.is_compiling() and int(lengths.min()) < 0:
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
    channels = x.shape[-1] // 2
    if use_triton(x, conv_weight) and not needs_grad and x.numel() > 0 and channels <= _MAX_CHANNELS:
        if lengths is not None:
            lengths = lengths.to(torch.int32)
        return _glu_depthwise_conv_op(x, conv_weight, ln_weight, ln_bias, float(eps), lengths)
    return glu_depthwise_conv_reference(x, conv_weight, ln_weight, ln_bias, eps, lengths)
