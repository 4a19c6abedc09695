"""A static cost model of each kernel at the benchmark shapes: the arithmetic it must do and the bytes it must move
through HBM at least once, and the H100 roofline times they imply. A model, not a measurement: it says how fast a
kernel could be, never how fast it is.

Peaks, H100 SXM (NVIDIA H100 Tensor Core GPU datasheet): 989 TFLOP/s dense bf16/fp16 tensor core, 67 TFLOP/s fp32
and 34 TFLOP/s fp64 on the CUDA cores, 3.35 TB/s HBM3. Exponentials: 16 ex2 a clock per SM (CUDA C Programming
Guide, arithmetic instruction throughput, compute capability 9.0) × 132 SMs × 1.83 GHz (the clock the datasheet's
989 TFLOP/s implies at 4096 dense bf16 FLOP a clock per SM).
"""

PEAKS = {
    "bf16 tensor core": 989e12,
    "fp32 CUDA cores": 67e12,
    "fp64 CUDA cores": 34e12,
    "ex2 (MUFU)": 16 * 132 * 989e12 / (132 * 4096),
}
HBM_BYTES_PER_S = 3.35e12

# The benchmark shapes: 8 clips of 30 s (3000 fbank frames each, 1500 encoder frames), w2v-bert-2.0's sizes.
SHAPES = dict(batch=8, seconds=30, length=1500, heads=16, head_dim=64, left=64, right=8, channels=1024,
              kernel_size=31, half_bytes=2)


def kernels(s=SHAPES):
    """[(kernel, case, {unit: operations}, HBM bytes, note)] at shapes ``s`` (bf16 activations)."""
    b, n, h, d, c, k = s["batch"], s["length"], s["heads"], s["head_dim"], s["channels"], s["kernel_size"]
    r = s["left"] + s["right"] + 1
    e = s["half_bytes"]
    qkv = b * n * h * d * e  # one of Q, K, V, O, dO
    table = b * n * h * r * 4  # the fp32 Q·Eᵀ table (B, L, H, R)
    lse = b * h * n * 4
    pairs = b * h * n * n  # every (query, key) pair: the attention is dense, only the bias is banded
    samples = b * s["seconds"] * 16000
    frames = b * (1 + (s["seconds"] * 16000 - 400) // 160)
    return [
        ("_forward_kernel", "attention forward", {"bf16 tensor core": 2 * 2 * pairs * d, "ex2 (MUFU)": pairs},
         3 * qkv + table + qkv + lse, "Q·Kᵀ and P·V; the table is read, not computed, in the kernel"),
        ("_backward_dkdv_kernel", "attention backward, dK dV", {"bf16 tensor core": 4 * 2 * pairs * d,
                                                                  "ex2 (MUFU)": pairs},
         4 * qkv + table + 2 * lse + 2 * qkv, "recomputes Q·Kᵀ and dO·Vᵀ; P ᵀ·dO, dSᵀ·Q"),
        ("_backward_dq_kernel", "attention backward, dQ", {"bf16 tensor core": 3 * 2 * pairs * d,
                                                            "ex2 (MUFU)": pairs},
         4 * qkv + table + 2 * lse + 2 * qkv + table, "recomputes Q·Kᵀ and dO·Vᵀ; dS·K; dQ and the table's gradient in fp32"),
        ("_glu_depthwise_conv_kernel", "GLU + depthwise conv + LayerNorm + swish",
         {"fp32 CUDA cores": b * n * c * (2 * k + 12), "ex2 (MUFU)": 2 * b * n * c},
         b * n * 2 * c * e + b * n * c * e + 2 * b * n * 4, "x once in, out once; two sigmoids per channel"),
        ("_conv_norm_backward_kernel", "conv module backward, LayerNorm part",
         {"fp32 CUDA cores": b * n * c * (2 * k + 20), "ex2 (MUFU)": 2 * b * n * c},
         b * n * 2 * c * e + b * n * c * e + b * n * c * 4, "recomputes the conv; writes dconv in fp32"),
        ("_glu_conv_backward_kernel", "conv module backward, GLU + conv part",
         {"fp32 CUDA cores": b * n * c * (4 * k + 10), "ex2 (MUFU)": b * n * c},
         b * n * 2 * c * e + b * n * c * 4 + b * n * 2 * c * e, "reads x and dconv, writes dx"),
        ("_frames_kernel", "fbank framing", {"fp64 CUDA cores": frames * 512 * 6},
         samples * 4 + frames * 512 * 8, "fp32 samples in, fp64 frames out (512 per frame)"),
        ("_log_mel_kernel", "fbank power spectrum, mel sum, log", {"fp32 CUDA cores": frames * (2 * 256 * 128 + 3 * 256)},
         frames * 257 * 16 + frames * 80 * 4, "fp64 spectrum in; a dense 256 × 128 filter matmul (80 of 128 used)"),
    ]


def rows(s=SHAPES):
    """One dict per kernel: FLOPs by unit, bytes, each unit's time floor, the HBM floor, the roofline bound."""
    out = []
    for name, case, ops, moved, note in kernels(s):
        floors = {unit: count / PEAKS[unit] for unit, count in ops.items()}
        floors["HBM"] = moved / HBM_BYTES_PER_S
        bound = max(floors, key=floors.get)
        out.append(dict(kernel=name, case=case, operations=ops, bytes=moved, floors_s=floors, bound=bound,
                        bound_s=floors[bound], note=note))
    return out
