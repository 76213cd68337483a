"""Triton NVFP4 GEMMs for sm_80 / sm_90: exact dequantization to bf16/fp16, fp32 accumulation.

    out[m, n] = alpha * sum_k A[m, k] * W[n, k] + bias[n]        (fp32 accumulation, one cast at the end)

W is NVFP4: packed e2m1 pairs (uint8 ``[N, K/2]``, element ``2j`` in the low nibble) with e4m3 block scales
(uint8 bits ``[N, K/16]``) and a global scale ``w_pts``. A is either bf16/fp16 (``gemm_a16``) or NVFP4 too
(``gemm``). Every ``e2m1 * S_b`` has at most 6 significant bits (NVFP4.md), so the dequantized tile is exact in
fp16 and bf16 and the tensor-core products are exact in fp32; the global scales multiply the accumulator once
(``alpha``, read from device memory: no host sync, CUDA-graph safe).

Dequantization is integer bit moves and one fp16 multiply: a nibble ``s e1 e0 m`` shifted into fp16 bits
``s..e1 e0 m`` (bit 15, bits 11..9) is the e2m1 value times 2**-14, fp16 subnormals included; an e4m3 byte
shifted left by 7 is its value times 2**-8. Tiles therefore hold ``value * 2**-14`` and ``alpha`` carries the
2**14 (2**28 when both operands are NVFP4). On sm_89+ GPUs the nibble moves run as inline PTX on 4 bytes at a
time and e4m3 uses the native conversion; sm_80 and the interpreter use the portable Triton version.

Three paths, chosen by M: ``_gemv_kernel`` for M == 1 (no tensor cores, each block scale applied once per 16
products), ``_tiled_kernel`` with BLOCK_M = 16 up to M = 16, and above that ``_dequant_kernel`` writing the exact
``e2m1 * S_b`` operands as bf16/fp16 scratch for one cuBLAS GEMM with fp32 output, followed by
``_epilogue_kernel`` (global scales, bias, cast). Triton 3.6 crashed compiling the in-register-dequant tiles
with wgmma-sized blocks, and the variant that compiled ran at a tenth of cuBLAS (tools/KERNEL_NOTES.md).
Configurations come from short lists, timed on first use per key.
"""

import os

import torch
import triton
import triton.language as tl
from triton import knobs

GEMV_MAX_M = 1  # M == 1: _gemv_kernel
TILED_MAX_M = 16  # M <= 16: _tiled_kernel; larger M: dequantize to a scratch operand and multiply with cuBLAS
_DEQUANT_BLOCK = (32, 256)  # (rows, K elements) per program of _dequant_kernel
_EPILOGUE_BLOCK = (32, 128)
_SUBNORMAL_SHIFT = tl.constexpr(2.0**14)  # unpacked tiles hold value * 2**-14

# Tiled-kernel configs as (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages); the first is the default.
_TILED_CONFIGS = [(16, 32, 256, 1, 4, 4), (16, 64, 256, 1, 4, 3), (16, 16, 512, 1, 4, 3), (16, 32, 512, 1, 4, 3),
                  (16, 64, 128, 1, 4, 4), (16, 128, 128, 1, 8, 3)]
# GEMV configs as (BLOCK_N, BLOCK_K, num_warps).
_GEMV_CONFIGS = [(8, 512, 4), (4, 1024, 4), (16, 256, 4), (8, 1024, 8), (16, 512, 8), (32, 256, 8)]
# Small tiles for the CPU interpreter, where the number of programs dominates the run time.
_INTERPRET_TILED = (16, 32, 64, 1, 4, 1)
_INTERPRET_GEMV = (16, 64, 4)

AUTOTUNE = True  # time every config of a list on first use of a key; False: always take the first
# Unpack nibbles with inline PTX on 4 bytes at a time (the portable bit-op version costs ~4x the instructions,
# which decode-sized GEMMs cannot hide). FP4COMPILE_NO_PTX=1 turns it off.
USE_PTX = os.environ.get("FP4COMPILE_NO_PTX", "0") != "1"
_best: dict[tuple, tuple] = {}

# Per packed byte b (4 per register): low nibble -> fp16 bits (sign to bit 15, magnitude to bits 11..9),
# high nibble likewise; prmt spreads bytes 0,1 (then 2,3) into the two halves of a register first.
_UNPACK_PTX = tl.constexpr("""{
.reg .b32 z, t, u, v;
mov.b32 z, 0;
prmt.b32 t, $4, z, 0x4140;
shl.b32 u, t, 9;  shl.b32 v, t, 12; and.b32 u, u, 0x0E000E00; and.b32 v, v, 0x80008000; or.b32 $0, u, v;
shl.b32 u, t, 5;  shl.b32 v, t, 8;  and.b32 u, u, 0x0E000E00; and.b32 v, v, 0x80008000; or.b32 $2, u, v;
prmt.b32 t, $4, z, 0x4342;
shl.b32 u, t, 9;  shl.b32 v, t, 12; and.b32 u, u, 0x0E000E00; and.b32 v, v, 0x80008000; or.b32 $1, u, v;
shl.b32 u, t, 5;  shl.b32 v, t, 8;  and.b32 u, u, 0x0E000E00; and.b32 v, v, 0x80008000; or.b32 $3, u, v;
}""")


@triton.jit
def _e2m1_pair_to_f16(p, PTX: tl.constexpr):
    """Packed bytes -> (low-nibble, high-nibble) fp16 tensors holding each e2m1 value times 2**-14."""
    if PTX:
        lo, hi = tl.inline_asm_elementwise(_UNPACK_PTX, "=r,=r,=r,=r,r", [p], dtype=(tl.float16, tl.float16),
                                           is_pure=True, pack=4)
        return lo, hi
    p = p.to(tl.uint16)
    lo = ((p & 0x07) << 9) | ((p & 0x08) << 12)
    hi = ((p & 0x70) << 5) | ((p & 0x80) << 8)
    return lo.to(tl.uint16).to(tl.float16, bitcast=True), hi.to(tl.uint16).to(tl.float16, bitcast=True)


@triton.jit
def _e4m3_to_f16(s, PTX: tl.constexpr):
    """e4m3 bit patterns (uint8) -> their exact values in fp16 (NaN is never a block scale)."""
    if PTX:
        return s.to(tl.float8e4nv, bitcast=True).to(tl.float16)
    s = s.to(tl.uint16)
    raw = ((s & 0x7F) << 7) | ((s & 0x80) << 8)
    return raw.to(tl.uint16).to(tl.float16, bitcast=True) * 256.0


@triton.jit
def _unpack_scaled(p, s, DTYPE: tl.constexpr, PTX: tl.constexpr):
    """Packed bytes and, per byte, its block's e4m3 scale bits -> (even, odd) elements times 2**-14 as DTYPE."""
    even, odd = _e2m1_pair_to_f16(p, PTX)
    scale = _e4m3_to_f16(s, PTX)
    return (even * scale).to(DTYPE), (odd * scale).to(DTYPE)


@triton.jit
def _tiled_kernel(
    # pointers
    a_ptr, a_scale_ptr, a_pts_ptr, w_ptr, w_scale_ptr, w_pts_ptr, bias_ptr, out_ptr,
    # dims
    M, N, K,
    # strides (packed bytes and scales are contiguous along K)
    stride_am, stride_ak, stride_asm, stride_wn, stride_wsn, stride_om,
    # meta-parameters
    A_FP4: tl.constexpr, DOT_DTYPE: tl.constexpr, PTX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] output tile per program, K walked in steps of BLOCK_K.

    A K step is HALF = BLOCK_K/2 packed bytes. Their low nibbles (even elements) and high nibbles (odd
    elements) make two dots of depth HALF, so no tile is ever interleaved: the weight is read as a
    [HALF, BLOCK_N] K-contiguous view (the B operand as is), each byte with its block's scale (byte j uses
    scale j // 8); a bf16/fp16 activation is read as its even and odd columns. Row indices wrap modulo M and
    N so loads need no row masks (the store is masked); K is masked per byte (K is a multiple of 16).
    """
    HALF: tl.constexpr = BLOCK_K // 2
    pid = tl.program_id(0)
    # Grouped ordering: GROUP_M row tiles share each weight column tile while it is in L2.
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_m = offs_m % M
    rows_n = offs_n % N
    offs_j = tl.arange(0, HALF)
    num_pairs = K // 2

    w_ptrs = w_ptr + rows_n[None, :] * stride_wn + offs_j[:, None]
    ws_ptrs = w_scale_ptr + rows_n[None, :] * stride_wsn + (offs_j // 8)[:, None]
    if A_FP4:
        a_ptrs = a_ptr + rows_m[:, None] * stride_am + offs_j[None, :]
        as_ptrs = a_scale_ptr + rows_m[:, None] * stride_asm + (offs_j // 8)[None, :]
    else:
        a_ptrs = a_ptr + rows_m[:, None] * stride_am + (2 * offs_j)[None, :] * stride_ak

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(0, tl.cdiv(num_pairs, HALF)):
        j_mask = offs_j < num_pairs - step * HALF
        w_even, w_odd = _unpack_scaled(tl.load(w_ptrs, mask=j_mask[:, None], other=0),
                                       tl.load(ws_ptrs, mask=j_mask[:, None], other=0), DOT_DTYPE, PTX)
        if A_FP4:
            a_even, a_odd = _unpack_scaled(tl.load(a_ptrs, mask=j_mask[None, :], other=0),
                                           tl.load(as_ptrs, mask=j_mask[None, :], other=0), DOT_DTYPE, PTX)
            a_ptrs += HALF
            as_ptrs += HALF // 8
        else:
            a_even = tl.load(a_ptrs, mask=j_mask[None, :], other=0.0).to(DOT_DTYPE)
            a_odd = tl.load(a_ptrs + stride_ak, mask=j_mask[None, :], other=0.0).to(DOT_DTYPE)
            a_ptrs += BLOCK_K * stride_ak
        acc = tl.dot(a_even, w_even, acc)
        acc = tl.dot(a_odd, w_odd, acc)
        w_ptrs += HALF
        ws_ptrs += HALF // 8

    alpha = tl.load(w_pts_ptr) * 16384.0
    if A_FP4:
        alpha = alpha * (tl.load(a_pts_ptr) * 16384.0)
    acc = acc * alpha
    if bias_ptr is not None:
        acc += tl.load(bias_ptr + rows_n).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def _gemv_kernel(
    # pointers
    a_ptr, a_scale_ptr, a_pts_ptr, w_ptr, w_scale_ptr, w_pts_ptr, bias_ptr, out_ptr,
    # dims
    N, K,
    # strides (the single activation row: its K stride; packed bytes and scales are contiguous along K)
    stride_ak, stride_wn, stride_wsn,
    # meta-parameters
    A_FP4: tl.constexpr, PTX: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """M == 1: BLOCK_N output elements per program, on the CUDA cores.

    Weight bytes are loaded as [BLOCK_N, G, 8] (G = BLOCK_K/16 blocks of 8 bytes); the activation's even and
    odd elements as [G, 8]. Each block's 16 products are summed first and its scale applied once; the per-block
    partial sums stay in a [BLOCK_N, G] accumulator, reduced across G once at the end. Weight rows
    wrap modulo N (the store is masked); the K dim is masked per block.
    """
    G: tl.constexpr = BLOCK_K // 16
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_n = offs_n % N
    offs_g = tl.arange(0, G)
    offs_b = tl.arange(0, 8)
    num_groups = K // 16

    w_ptrs = w_ptr + rows_n[:, None, None] * stride_wn + offs_g[None, :, None] * 8 + offs_b[None, None, :]
    ws_ptrs = w_scale_ptr + rows_n[:, None] * stride_wsn + offs_g[None, :]
    if A_FP4:
        a_ptrs = a_ptr + offs_g[:, None] * 8 + offs_b[None, :]
        as_ptrs = a_scale_ptr + offs_g
    else:
        a_ptrs = a_ptr + (offs_g[:, None] * 16 + offs_b[None, :] * 2) * stride_ak

    acc = tl.zeros((BLOCK_N, G), dtype=tl.float32)
    for step in range(0, tl.cdiv(num_groups, G)):
        g_mask = offs_g < num_groups - step * G
        if A_FP4:
            ap = tl.load(a_ptrs, mask=g_mask[:, None], other=0)
            a_scale = _e4m3_to_f16(tl.load(as_ptrs, mask=g_mask, other=0), PTX)[:, None]
            a_even, a_odd = _e2m1_pair_to_f16(ap, PTX)
            a_even = (a_even * a_scale).to(tl.float32)
            a_odd = (a_odd * a_scale).to(tl.float32)
            a_ptrs += G * 8
            as_ptrs += G
        else:
            a_even = tl.load(a_ptrs, mask=g_mask[:, None], other=0.0).to(tl.float32)
            a_odd = tl.load(a_ptrs + stride_ak, mask=g_mask[:, None], other=0.0).to(tl.float32)
            a_ptrs += BLOCK_K * stride_ak
        p = tl.load(w_ptrs, mask=g_mask[None, :, None], other=0)
        s = tl.load(ws_ptrs, mask=g_mask[None, :], other=0)
        w_even, w_odd = _e2m1_pair_to_f16(p, PTX)
        block_sums = tl.sum(w_even.to(tl.float32) * a_even[None] + w_odd.to(tl.float32) * a_odd[None], axis=2)
        acc += block_sums * _e4m3_to_f16(s, PTX).to(tl.float32)
        w_ptrs += G * 8
        ws_ptrs += G

    alpha = tl.load(w_pts_ptr) * 16384.0
    if A_FP4:
        alpha = alpha * (tl.load(a_pts_ptr) * 16384.0)
    out = tl.sum(acc, axis=1) * alpha
    if bias_ptr is not None:
        out += tl.load(bias_ptr + rows_n).to(tl.float32)
    tl.store(out_ptr + offs_n, out.to(out_ptr.dtype.element_ty), mask=offs_n < N)


@triton.jit
def _dequant_kernel(
    # pointers
    p_ptr, s_ptr, out_ptr,
    # dims
    R, K,
    # strides (packed bytes, scales and the output are contiguous along K)
    stride_pr, stride_sr, stride_or,
    # meta-parameters
    PTX: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """[R, K/2] packed + [R, K/16] scales -> [R, K] of e2m1 * S_b (exact in bf16 and fp16; no global scale).

    A program covers [BLOCK_R, BLOCK_K] outputs from [BLOCK_R, BLOCK_K/2] bytes; byte j uses scale j // 8. The
    even and odd elements are interleaved in registers (join + reshape) for one contiguous store. Rows and K
    are masked.
    """
    HALF: tl.constexpr = BLOCK_K // 2
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_j = tl.program_id(1) * HALF + tl.arange(0, HALF)
    mask = (offs_r < R)[:, None] & (offs_j < K // 2)[None, :]
    p = tl.load(p_ptr + offs_r[:, None] * stride_pr + offs_j[None, :], mask=mask, other=0)
    s = tl.load(s_ptr + offs_r[:, None] * stride_sr + (offs_j // 8)[None, :], mask=mask, other=0)
    even, odd = _unpack_scaled(p, s, tl.float32, PTX)
    values = tl.reshape(tl.join(even * _SUBNORMAL_SHIFT, odd * _SUBNORMAL_SHIFT), (BLOCK_R, BLOCK_K))
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    out_ptrs = out_ptr + offs_r[:, None] * stride_or + offs_k[None, :]
    tl.store(out_ptrs, values.to(out_ptr.dtype.element_ty), mask=(offs_r < R)[:, None] & (offs_k < K)[None, :])


@triton.jit
def _epilogue_kernel(
    # pointers
    acc_ptr, a_pts_ptr, w_pts_ptr, bias_ptr, out_ptr,
    # dims
    M, N,
    # meta-parameters (acc and out are contiguous [M, N])
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out = acc * (a_pts * w_pts) + bias, cast once: the global scales of the cuBLAS path (masked tiles)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    offs = offs_m[:, None] * N + offs_n[None, :]
    alpha = tl.load(w_pts_ptr)
    if a_pts_ptr is not None:
        alpha = alpha * tl.load(a_pts_ptr)
    out = tl.load(acc_ptr + offs, mask=mask, other=0.0) * alpha
    if bias_ptr is not None:
        out += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def _ptx(device: torch.device) -> bool:
    """Inline PTX and native e4m3 conversion: on sm_89+ GPUs (not in the interpreter) unless turned off."""
    return USE_PTX and not knobs.runtime.interpret and torch.cuda.get_device_capability(device) >= (8, 9)


def _choose(key: tuple, configs: list, launch) -> tuple:
    """The fastest of ``configs`` for ``key`` (timed once, then cached); the first when not tuning."""
    if not AUTOTUNE or len(configs) == 1:
        return configs[0]
    if key not in _best:
        times = []
        for config in configs:
            try:
                times.append(triton.testing.do_bench(lambda: launch(config), warmup=5, rep=20, return_mode="median"))
            except triton.runtime.errors.OutOfResources:
                times.append(float("inf"))
        _best[key] = configs[min(range(len(configs)), key=times.__getitem__)]
    return _best[key]


def launch_tiled(a, a_scales, a_pts, w_packed, w_scales, w_pts, bias, out, config=None):
    """Run ``_tiled_kernel`` into ``out`` [M, N]; ``a_scales`` None means ``a`` is bf16/fp16, else packed NVFP4."""
    m, n, k = a.shape[0], w_packed.shape[0], w_packed.shape[1] * 2
    a_fp4 = a_scales is not None
    dot_dtype = tl.float16 if a_fp4 or a.dtype == torch.float16 else tl.bfloat16
    if knobs.runtime.interpret and dot_dtype == tl.bfloat16:
        dot_dtype = tl.float32  # the interpreter's bf16 tl.dot is wrong (Triton 3.9); fp32 tiles are as exact

    def run(cfg):
        block_m, block_n, block_k, group_m, warps, stages = cfg
        grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
        _tiled_kernel[grid](
            a, a_scales, a_pts, w_packed, w_scales, w_pts, bias, out,
            m, n, k,
            a.stride(0), a.stride(1), a_scales.stride(0) if a_fp4 else 0, w_packed.stride(0), w_scales.stride(0),
            out.stride(0),
            A_FP4=a_fp4, DOT_DTYPE=dot_dtype, PTX=_ptx(a.device),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m, num_warps=warps, num_stages=stages,
        )

    if config is None:
        if knobs.runtime.interpret:
            config = _INTERPRET_TILED
        else:
            key = ("tiled", a_fp4, a.dtype, out.dtype, bias is not None, n, k, triton.next_power_of_2(m))
            config = _choose(key, _TILED_CONFIGS, run)
    run(config)
    return out


def launch_gemv(a, a_scales, a_pts, w_packed, w_scales, w_pts, bias, out, config=None):
    """Run ``_gemv_kernel`` (M == 1) into ``out`` [1, N]; arguments as for :func:`launch_tiled`."""
    n, k = w_packed.shape[0], w_packed.shape[1] * 2
    a_fp4 = a_scales is not None

    def run(cfg):
        block_n, block_k, warps = cfg
        _gemv_kernel[(triton.cdiv(n, block_n),)](
            a, a_scales, a_pts, w_packed, w_scales, w_pts, bias, out,
            n, k,
            a.stride(1), w_packed.stride(0), w_scales.stride(0),
            A_FP4=a_fp4, PTX=_ptx(a.device), BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
        )

    if config is None:
        if knobs.runtime.interpret:
            config = _INTERPRET_GEMV
        else:
            key = ("gemv", a_fp4, a.dtype, out.dtype, bias is not None, n, k)
            config = _choose(key, _GEMV_CONFIGS, run)
    run(config)
    return out


def dequantize(packed, scales, dtype):
    """[R, K/2] packed + [R, K/16] scale bits -> [R, K] of ``e2m1 * S_b`` as ``dtype`` (exact for bf16/fp16)."""
    r, k = packed.shape[0], packed.shape[1] * 2
    out = torch.empty((r, k), device=packed.device, dtype=dtype)
    block_r, block_k = _DEQUANT_BLOCK
    grid = (triton.cdiv(r, block_r), triton.cdiv(k, block_k))
    _dequant_kernel[grid](packed, scales, out, r, k, packed.stride(0), scales.stride(0), out.stride(0),
                          PTX=_ptx(packed.device), BLOCK_R=block_r, BLOCK_K=block_k)
    return out


def launch_cublas(a, a_scales, a_pts, w_packed, w_scales, w_pts, bias, out):
    """Large M: dequantize to bf16/fp16 scratch (exact), one cuBLAS GEMM with fp32 output, then the epilogue.

    The block-scaled products are exact and accumulate in fp32 as in the tiled kernel; only the global
    scales, applied by ``_epilogue_kernel`` from device memory, stay out of cuBLAS (its alpha is a host value).
    """
    dtype = torch.bfloat16 if a_scales is not None else a.dtype
    a_values = dequantize(a, a_scales, dtype) if a_scales is not None else a
    w_values = dequantize(w_packed, w_scales, dtype)
    if a.is_cuda:
        acc = torch.mm(a_values, w_values.t(), out_dtype=torch.float32)
    else:  # the interpreter's tests: the same exact products, fp32 accumulation
        acc = torch.mm(a_values.float(), w_values.float().t())
    m, n = acc.shape
    block_m, block_n = _EPILOGUE_BLOCK
    _epilogue_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_n))](
        acc, a_pts, w_pts, bias, out, m, n, BLOCK_M=block_m, BLOCK_N=block_n)
    return out


def _launch(a, a_scales, a_pts, w_packed, w_scales, w_pts, bias, out_dtype, out):
    m, n = a.shape[0], w_packed.shape[0]
    if out is None:
        out = torch.empty((m, n), device=a.device, dtype=out_dtype)
    launch = launch_gemv if m <= GEMV_MAX_M else launch_tiled if m <= TILED_MAX_M else launch_cublas
    return launch(a, a_scales, a_pts, w_packed, w_scales, w_pts, bias, out)


def gemm_a16(x, w_packed, w_scales, w_pts, bias, out_dtype=None, out=None):
    """``x [M, K] (bf16/fp16) @ dequant(w).T + bias`` -> ``[M, N]`` of ``out_dtype`` (default x.dtype; float32
    gives the accumulator before the final cast). ``out`` may be a preallocated [M, N] buffer."""
    return _launch(x, None, None, w_packed, w_scales, w_pts, bias, out_dtype or x.dtype, out)


def gemm(a_packed, a_scales, a_pts, w_packed, w_scales, w_pts, bias, out_dtype, out=None):
    """``dequant(a) @ dequant(w).T + bias`` for packed NVFP4 ``a [M, K/2]`` -> ``[M, N]`` of ``out_dtype``."""
    return _launch(a_packed, a_scales, a_pts, w_packed, w_scales, w_pts, bias, out_dtype, out)
