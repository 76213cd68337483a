"""Triton NVFP4 activation quantize: one read of ``x``, packed e2m1 pairs and e4m3 block scales out, or the
quantized values themselves (``quantize_values``: ``e2m1 * S_b``, exact in bf16/fp16) for GEMMs that take them so.

    S_b = e4m3(clamp((amax_block / 6) / pts, 2**-6, 448));  q = rne_e2m1(clamp(x * ((1 / pts) / S_b), -6, 6))

Bit-identical to ``format.quantize_blocks``: divisions are IEEE round-to-nearest (``div_rn``, not Triton's fast
``/``), and the e4m3 rounding is done on the fp32 bits (round to 3 mantissa bits, ties to even), which is exact
for every scale the clamp allows (all are e4m3 normals) and needs no fp8 type, so it runs unchanged in Triton's
CPU interpreter. The per-tensor scale ``pts`` comes in as a device scalar (its amax computed by Inductor, in the
code ``ops`` generates once per activation shape).
"""

import torch
import triton
import triton.language as tl

from .. import format as nvfp4

BLOCK_M = 16  # rows per program
BLOCK_K = 128  # elements along K per program: 8 blocks of 16, 64 packed bytes
_PTS_DIVISOR = tl.constexpr(nvfp4.F8_E4M3_MAX * nvfp4.F4_E2M1_MAX)  # pts = amax / 2688


@triton.jit
def row_global_scale(a_ptr, K, BLOCK: tl.constexpr):
    """The dynamic per-tensor scale of one activation row, ``format.global_scale_of``: amax(|a|) / 2688, correctly
    rounded; NaN if the row holds a NaN (``tl.max`` would drop it). ``BLOCK`` elements a step, all loads of a step
    issued at once: each step waits for its loads."""
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    nan = tl.zeros((BLOCK,), dtype=tl.int32)
    for start in range(0, K, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        a = tl.load(a_ptr + offs, mask=offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(a))
        nan = nan | (a != a).to(tl.int32)
    pts = tl.math.div_rn(tl.max(amax, axis=0), _PTS_DIVISOR)
    return tl.where(tl.max(nan, axis=0) > 0, float("nan"), pts)


@triton.jit
def _e2m1_magnitude(a):
    """|y| in [0, 6] -> e2m1 magnitude code 0..7, round to nearest, ties to even (NVFP4.md's thresholds)."""
    return ((a > 0.25).to(tl.uint8) + (a >= 0.75).to(tl.uint8) + (a > 1.25).to(tl.uint8)
            + (a >= 1.75).to(tl.uint8) + (a > 2.5).to(tl.uint8) + (a >= 3.5).to(tl.uint8) + (a > 5.0).to(tl.uint8))


@triton.jit
def block_scales(xb, pts):
    """fp32 blocks ``xb`` [..., G, 16] and the per-tensor scale -> (S_b as fp32, S_b's e4m3 bits), both [..., G].

    A block holding a NaN gets the NaN scale, as in torch (``tl.max`` drops NaN, so it is flagged apart), and so
    does a NaN quotient (0 / 0 when ``pts`` is 0: an all-zero tensor's dynamic scale); the others are clamped, then
    rounded to e4m3 on the fp32 bits. The NaN is set after the rounding: on the GPU a quotient's NaN is 0x7FFFFFFF,
    whose rounding would carry into the sign bit."""
    has_nan = tl.max((xb != xb).to(tl.int32), axis=-1) > 0
    s = tl.math.div_rn(tl.math.div_rn(tl.max(tl.abs(xb), axis=-1), 6.0), pts)
    is_nan = has_nan | (s != s)
    bits = tl.clamp(s, 0.015625, 448.0).to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000
    nan = tl.full(s.shape, 0x7FC00000, tl.uint32).to(tl.float32, bitcast=True)
    s_code = ((((bits >> 23) - 120) << 3) | ((bits >> 20) & 7)).to(tl.uint8)
    return tl.where(is_nan, nan, bits.to(tl.float32, bitcast=True)), tl.where(is_nan, 0x7F, s_code)  # e4m3 NaN: 0x7F


@triton.jit
def e2m1_codes(xb, s, pts):
    """Blocks ``xb`` [..., G, 16] with their scales ``s`` [..., G] -> e2m1 codes (uint8, sign in bit 3): multiply
    by the reciprocal, clamp, round onto the e2m1 grid, keep the sign bit (-0 included)."""
    recip = tl.math.div_rn(tl.math.div_rn(1.0, pts), s)
    y = tl.clamp(xb * tl.expand_dims(recip, -1), -6.0, 6.0,
                 propagate_nan=tl.PropagateNan.ALL)
    sign = ((y.to(tl.uint32, bitcast=True) >> 31) << 3).to(tl.uint8)
    return _e2m1_magnitude(tl.abs(y)) | sign


@triton.jit
def _e2m1_round(a):
    """|y| in [0, 6] -> the nearest e2m1 magnitude as fp32, ties to even, in four operations: ``(a + c) - c``
    rounds ``a`` to a multiple of the spacing of ``c``'s floats, by fp32's own round-to-nearest-even, and ``c`` =
    1.5 * 2**22, 2**23 or 2**24 has spacing 0.5, 1 or 2: e2m1's spacing below 2, below 4 and up to 6. Equal to the
    value of :func:`_e2m1_magnitude`'s code for every such ``a`` (tested)."""
    c = tl.where(a < 2.0, 6291456.0, tl.where(a < 4.0, 12582912.0, 25165824.0))
    return (a + c) - c


@triton.jit
def quantized_values(xb, pts):
    """Blocks ``xb`` [..., G, 16] -> their NVFP4 values without the per-tensor scale, ``e2m1 * S_b``, as fp32 (exact:
    at most 6 significant bits), as :func:`e2m1_codes` would give them but with fewer operations. NaN handling
    rides on the scale: a block with a NaN has the NaN scale, so all its values are NaN, as in the reference, while
    an element's NaN ``y`` (only possible then) is clamped to 6 by ``tl.minimum``, which drops NaN."""
    s, _ = block_scales(xb, pts)
    recip = tl.math.div_rn(tl.math.div_rn(1.0, pts), s)
    y = xb * tl.expand_dims(recip, -1)
    magnitude = _e2m1_round(tl.minimum(tl.abs(y), 6.0))
    sign = y.to(tl.uint32, bitcast=True) & 0x80000000
    value = (magnitude.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)
    return value * tl.expand_dims(s, -1)


@triton.jit
def _tile_blocks(x_ptr, M, K, stride_xm, stride_xk, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """This program's [BLOCK_M, BLOCK_K] tile of x as fp32 blocks [BLOCK_M, BLOCK_K/16, 16], with its rows, columns
    and mask (rows past M and columns past K load 0)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk, mask=mask, other=0.0)
    return tl.reshape(x.to(tl.float32), (BLOCK_M, BLOCK_K // 16, 16)), rows, cols, mask


@triton.jit
def _quantize_kernel(
    # pointers
    x_ptr, pts_ptr, packed_ptr, scales_ptr,
    # dims
    M, K,
    # strides (x may have any row stride; outputs are contiguous)
    stride_xm, stride_xk,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_K] tile of x per program; rows past M and columns past K are masked."""
    GROUPS: tl.constexpr = BLOCK_K // 16
    xb, rows, _, _ = _tile_blocks(x_ptr, M, K, stride_xm, stride_xk, BLOCK_M, BLOCK_K)
    pts = tl.load(pts_ptr)
    s, s_code = block_scales(xb, pts)
    codes = tl.reshape(e2m1_codes(xb, s, pts), (BLOCK_M, BLOCK_K // 2, 2))
    even, odd = tl.split(codes)
    packed = even | (odd << 4)

    half = tl.program_id(1) * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
    tl.store(packed_ptr + rows[:, None] * (K // 2) + half[None, :], packed,
             mask=(rows[:, None] < M) & (half[None, :] < K // 2))
    groups = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
    tl.store(scales_ptr + rows[:, None] * (K // 16) + groups[None, :], s_code,
             mask=(rows[:, None] < M) & (groups[None, :] < K // 16))


@triton.jit
def _values_kernel(x_ptr, pts_ptr, out_ptr, M, K, stride_xm, stride_xk, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """As ``_quantize_kernel``, but each tile's values ``e2m1 * S_b`` are stored in ``out``'s dtype."""
    xb, rows, cols, mask = _tile_blocks(x_ptr, M, K, stride_xm, stride_xk, BLOCK_M, BLOCK_K)
    values = quantized_values(xb, tl.load(pts_ptr))
    tl.store(out_ptr + rows[:, None] * K + cols[None, :],
             tl.reshape(values, (BLOCK_M, BLOCK_K)).to(out_ptr.dtype.element_ty), mask=mask)


def quantize_values(x: torch.Tensor, pts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x [..., K]`` -> its NVFP4 values without the per-tensor scale, ``e2m1 * S_b`` as ``dtype`` (exact for bf16,
    fp16 and fp32: at most 6 significant bits, magnitudes 2**-10 to 2688), equal to dequantizing
    :func:`quantize_blocks`'s output. One launch where quantize + dequantize take two, and no packed bytes written."""
    nvfp4.check_quantizable(x)
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    out = torch.empty(x2.shape, dtype=dtype, device=x.device)
    if x2.shape[0]:
        grid = (triton.cdiv(x2.shape[0], BLOCK_M), triton.cdiv(k, BLOCK_K))
        _values_kernel[grid](x2, pts.float().reshape(()), out, x2.shape[0], k, x2.stride(0), x2.stride(1),
                             BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K)
    return out.view(x.shape)


def quantize_blocks(x: torch.Tensor, pts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``format.quantize_blocks`` on the GPU: ``x [..., K]`` -> (packed uint8 [..., K/2], scales uint8 [..., K/16])."""
    nvfp4.check_quantizable(x)
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    packed = torch.empty((m, k // 2), dtype=torch.uint8, device=x.device)
    scales = torch.empty((m, k // nvfp4.BLOCK_SIZE), dtype=torch.uint8, device=x.device)
    if m:
        grid = (triton.cdiv(m, BLOCK_M), triton.cdiv(k, BLOCK_K))
        _quantize_kernel[grid](x2, pts.float().reshape(()), packed, scales, m, k, x2.stride(0), x2.stride(1),
                               BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K)
    return packed.view(*lead, k // 2), scales.view(*lead, k // nvfp4.BLOCK_SIZE)
