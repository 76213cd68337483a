"""Triton NVFP4 GEMMs for sm_80 / sm_90: exact dequantization to bf16/fp16, fp32 accumulation.

    out[m, n] = alpha * sum_k A[m, k] * W[n, k] + bias[n]        (fp32 accumulation, one cast at the end)

W is NVFP4: packed e2m1 pairs (uint8 ``[N, K/2]``, element ``2j`` in the low nibble) with e4m3 block scales
(uint8 bits ``[N, K/16]``) and a global scale ``w_pts``. A is either bf16/fp16 (``gemm_a16``) or NVFP4 too
(``gemm``). Every ``e2m1 * S_b`` has at most 6 significant bits (NVFP4.md), so a dequantized operand is exact in
fp16 and bf16 and the tensor-core products are exact in fp32; the global scales multiply the accumulator once
(``alpha``, read from device memory: no host sync, CUDA-graph safe).

Dequantization is integer bit moves: a nibble ``s e1 e0 m`` moved into a float's sign, lowest exponent bits and
highest mantissa bit is the e2m1 value times a power of two, subnormals included (fp16: 2**-14; bf16: 2**-126,
then one exact bf16 multiply by the scale times 2**119). The GEMV's fp32 values go through e4m3 instead: a
nibble placed in a byte is an e4m3 value (e2m1 * 2**-6), which the native conversion widens, see
``_word_to_f32_ptx``. ``alpha`` carries any power of two left back. On sm_89+ GPUs the bit moves run
as inline PTX on 4 bytes at a time and e4m3 uses the native conversion; sm_80 and the interpreter use the portable
Triton version.

Three paths, chosen by M. A few rows run on the CUDA cores, each weight word unpacked once for all rows and each
block scale applied once per 16 products: ``_gemv_kernel`` for a bf16/fp16 activation (up to
``GEMV_A16_MAX_ROWS`` rows) in fp32, ``_gemv_w4a4_kernel`` for an NVFP4 one (up to ``GEMV_MAX_ROWS``) in exact
integer arithmetic (dp4a on twice the e2m1 values), after ``_int8_operand_kernel`` has turned the rows (packed, or
high precision that it quantizes) into those integers; ``_mma_kernel``
up to ``DIRECT_MAX_ROWS`` = 128 (tensor cores, the weight dequantized in registers as the MMA's left operand, K
split across programs); above that ``_dequant_kernel`` writes the exact
``e2m1 * S_b`` operands as bf16/fp16 scratch for one cuBLAS GEMM with fp32 output, and ``_epilogue_kernel``
applies the global scales, bias and cast. On Hopper, 2 to ``FUSED_MAX_ROWS`` rows with K a multiple of 256 go to
the fused Gluon kernel of ``gluon_gemm`` instead (``kernels.fused_problem``). Configurations come from short
lists, timed in CUDA graphs on first use per key (tools/KERNEL_NOTES.md has the runs behind these choices).

Groups: up to ``MAX_GROUP`` weights that multiply the same activation (a layer's q/k/v or gate/up projections)
run as one launch of the same kernels, each program reading the pointers of the weight its output tile belongs
to (``_member``, ``_pick``); every weight keeps its own buffers, scales and output. A single weight is a group of
one.
"""

import os

import torch
import triton
import triton.language as tl
from triton import knobs
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .. import format as nvfp4
from .. import kernels  # its GEMV row limits are read at each call, so that one setting of them holds everywhere
from . import DIRECT_MAX_ROWS, GROUP_ALIGN, MAX_GROUP, fused_problem, triton_quantize

_DEQUANT_BLOCK = (32, 256)  # (rows, K elements) per program of _dequant_kernel
_EPILOGUE_BLOCK = (32, 64)  # BLOCK_N <= GROUP_ALIGN
_SUBNORMAL_SHIFT = tl.constexpr(2.0**14)  # unpacked tiles hold value * 2**-14

# GEMV configs as (BLOCK_N, BLOCK_K, num_warps): the four best of a 36-config H200 sweep (KERNEL_NOTES.md, version 8),
# and (32, 512, 4), the best at 2 rows on the wider shapes in a sweep of 22 at 1-4 rows (version 30).
_GEMV_CONFIGS = [(16, 1024, 4), (8, 1024, 2), (8, 1024, 4), (16, 512, 4), (32, 512, 4)]
# The integer GEMV of NVFP4 activations: each config the best on one of the four benchmark shapes at one row in an
# H200 sweep of 13 (tools/KERNEL_NOTES.md, version 28), (32, 512, 4), close on all, and (16, 512, 4) and
# (16, 1024, 8), the best at 2 rows on some shapes in a sweep of 18 at 1-4 rows (version 30).
_GEMV_W4A4_CONFIGS = [(16, 1024, 4), (16, 2048, 8), (8, 2048, 4), (64, 512, 8), (32, 512, 4), (16, 512, 4),
                      (16, 1024, 8)]
_OPERAND_BLOCK_K = 1024  # activation elements per program of _int8_operand_kernel
_OPERAND_ROW_BLOCK = 16384  # its amax pass: up to this many elements a step (64 a thread at 8 warps)
_OPERAND_WARPS = 8
# Small tiles for the CPU interpreter, where the number of programs dominates the run time.
_INTERPRET_GEMV = (16, 64, 4)
_INTERPRET_MMA = (16, 16, 64, 2, 4, 1, False)

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


def _word_to_f32_ptx() -> str:
    """Inline PTX: one 32-bit word of 8 packed nibbles -> their e2m1 values times 2**-6 as fp32, $0..$7 in element
    order, with 7 integer instructions per word instead of 3 per element.

    A nibble ``s e1 e0 m`` placed in a byte as ``s 0 0 e1 e0 m 0 0`` is an e4m3 value: its exponent field is
    ``e1 e0`` and its mantissa ``m 0 0``, so the byte is the e2m1 value times 2**-6 (bias 7 against 1), subnormals
    included. One shift and one ``lop3`` (with the signs masked first) build those bytes for the four high nibbles
    of the word at once, two shifts and a ``lop3`` more for the four low ones; the native conversion turns each
    pair of bytes into an fp16 pair (exact), and each fp16 into an fp32 (exact)."""
    return """{
.reg .b32 s, t, h, l, p<4>;
.reg .b16 b<4>, q<8>;
and.b32 s, $8, 0x80808080; shr.b32 t, $8, 2; lop3.b32 h, t, 0x1C1C1C1C, s, 0xEA;
shl.b32 s, $8, 4; and.b32 s, s, 0x80808080; shl.b32 t, $8, 2; lop3.b32 l, t, 0x1C1C1C1C, s, 0xEA;
mov.b32 {b0, b1}, l; mov.b32 {b2, b3}, h;
cvt.rn.f16x2.e4m3x2 p0, b0; cvt.rn.f16x2.e4m3x2 p1, b1; cvt.rn.f16x2.e4m3x2 p2, b2; cvt.rn.f16x2.e4m3x2 p3, b3;
mov.b32 {q0, q1}, p0; mov.b32 {q2, q3}, p1; mov.b32 {q4, q5}, p2; mov.b32 {q6, q7}, p3;
cvt.f32.f16 $0, q0; cvt.f32.f16 $2, q1; cvt.f32.f16 $4, q2; cvt.f32.f16 $6, q3;
cvt.f32.f16 $1, q4; cvt.f32.f16 $3, q5; cvt.f32.f16 $5, q6; cvt.f32.f16 $7, q7;
}"""


_WORD_TO_F32_PTX = tl.constexpr(_word_to_f32_ptx())
_UNPACKED_SCALE = tl.constexpr(2.0**-6)  # what _e2m1_word_to_f32 leaves on each value
_UNPACK_SHIFT = tl.constexpr(2.0**6)  # what alpha takes back for each operand unpacked by _e2m1_word_to_f32


@triton.jit
def _e2m1_word_to_f32(word, PTX: tl.constexpr):
    """uint32 words of 8 packed e2m1 nibbles (element j in bits 4j..4j+3) -> fp32 values times 2**-6, one
    more dimension of 8 in element order."""
    if PTX:
        v0, v1, v2, v3, v4, v5, v6, v7 = tl.inline_asm_elementwise(
            _WORD_TO_F32_PTX, "=r,=r,=r,=r,=r,=r,=r,=r,r", [word], dtype=(tl.float32,) * 8, is_pure=True, pack=1)
    else:
        code = word.to(tl.int32, bitcast=True)
        v0, v1 = _e2m1_value(code & 15), _e2m1_value((code >> 4) & 15)
        v2, v3 = _e2m1_value((code >> 8) & 15), _e2m1_value((code >> 12) & 15)
        v4, v5 = _e2m1_value((code >> 16) & 15), _e2m1_value((code >> 20) & 15)
        v6, v7 = _e2m1_value((code >> 24) & 15), _e2m1_value((code >> 28) & 15)
    # tl.join stacks along a new last dimension, so after three nested joins position 4i + 2k + l holds the
    # i-th argument of an innermost join, inside the k-th middle one, inside the l-th outer one: element 4i + 2k + l.
    values = tl.join(tl.join(tl.join(v0, v4), tl.join(v2, v6)), tl.join(tl.join(v1, v5), tl.join(v3, v7)))
    if not PTX:
        values = values * _UNPACKED_SCALE
    return tl.reshape(values, word.shape + (8,))


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


def _operand_ptx(dtype: str) -> str:
    """Inline PTX: 4 packed bytes + their 4 block scales (2 registers of DTYPE pairs) -> the 8 products
    ``e2m1 * scale`` as DTYPE pairs: $0, $1 the low nibbles (even elements) of bytes 0-1 and 2-3, $2, $3 the high.

    ``prmt`` moves byte j to the top byte of 16-bit half j; a nibble at the top of a half (bits 12..15) has its
    sign at bit 15 already, and its magnitude ``e1 e0 m`` shifted right lands in the exponent's two lowest bits
    and the mantissa's highest (bf16: bits 8..6, value e2m1 * 2**-126; fp16: bits 11..9, e2m1 * 2**-14). The
    low nibble is moved up by 4 for its sign. Subnormal results (0.5) are exact, and the fma by the scale pair
    (bf16: scale * 2**119, fp16: scale) is exact because both factors have few significant bits.
    """
    hi_shift, lo_shift, mask = ("shr.b32 t, y, 6", "shr.b32 t, y, 2", "0x01C001C0") if dtype == "bf16" else \
        ("shr.b32 t, y, 3", "shl.b32 t, y, 1", "0x0E000E00")
    pair = f"""{hi_shift}; and.b32 t, t, {mask}; lop3.b32 u, y, nz, t, 0xEA; fma.rn.{dtype}x2 $H, u, $S, nz;
shl.b32 z, y, 4; {lo_shift}; and.b32 t, t, {mask}; lop3.b32 u, z, nz, t, 0xEA; fma.rn.{dtype}x2 $L, u, $S, nz;"""
    return "\n".join([
        "{", ".reg .b32 y, z, t, u, nz, zero;", "mov.b32 nz, 0x80008000;", "mov.b32 zero, 0;",
        "prmt.b32 y, $4, zero, 0x1404;", pair.replace("$H", "$2").replace("$L", "$0").replace("$S", "$5"),
        "prmt.b32 y, $4, zero, 0x3424;", pair.replace("$H", "$3").replace("$L", "$1").replace("$S", "$6"),
        "}"])


_OPERAND_PTX_BF16 = tl.constexpr(_operand_ptx("bf16"))
_OPERAND_PTX_F16 = tl.constexpr(_operand_ptx("f16"))
_BF16_SCALE_SHIFT = tl.constexpr(2.0**119)  # bf16 operands hold e2m1 * S_b * 2**-7; fp16 ones e2m1 * S_b * 2**-14


@triton.jit
def _e2m1_value(code):
    """e2m1 codes (0..15, int32) -> their values as fp32, by arithmetic (the portable path)."""
    mag = code & 7
    e = mag >> 1
    m = (mag & 1).to(tl.float32)
    value = tl.where(e == 0, 0.5 * m, (2.0 + m) * (1 << e).to(tl.float32) * 0.25)
    return tl.where((code & 8) != 0, -value, value)


@triton.jit
def _operand_pair(p, scale, DTYPE: tl.constexpr, PTX: tl.constexpr):
    """Packed bytes and, per byte, its block scale (as ``_scale_operand`` gives it) -> (low-nibble,
    high-nibble) products ``e2m1 * S_b`` as DTYPE, times ``2**-7`` (bf16) or ``2**-14`` (fp16, and fp32 in the
    interpreter). Any shape; the two results have the shape of ``p``."""
    if PTX:
        if DTYPE == tl.bfloat16:
            lo, hi = tl.inline_asm_elementwise(_OPERAND_PTX_BF16, "=r,=r,=r,=r,r,r,r", [p, scale],
                                               dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
        else:
            lo, hi = tl.inline_asm_elementwise(_OPERAND_PTX_F16, "=r,=r,=r,=r,r,r,r", [p, scale],
                                               dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
    else:
        code = p.to(tl.int32)
        lo = (_e2m1_value(code & 15) * scale).to(DTYPE)
        hi = (_e2m1_value(code >> 4) * scale).to(DTYPE)
    return lo, hi


@triton.jit
def _scale_operand(s, DTYPE: tl.constexpr, PTX: tl.constexpr):
    """e4m3 scale bits -> the factor ``_operand_pair`` multiplies by (bf16 ``S * 2**119`` for the PTX, whose
    nibbles hold ``e2m1 * 2**-126``; fp16 ``S``; in the interpreter fp32 ``S`` times the output's shift)."""
    if PTX:
        if DTYPE == tl.bfloat16:
            scale = (s.to(tl.float8e4nv, bitcast=True).to(tl.float32) * _BF16_SCALE_SHIFT).to(DTYPE)
        else:
            scale = s.to(tl.float8e4nv, bitcast=True).to(DTYPE)
    else:
        shift: tl.constexpr = 2.0**-7 if DTYPE == tl.bfloat16 else 2.0**-14
        scale = _e4m3_to_f16(s, False).to(tl.float32) * shift
    return scale


@triton.jit
def _member(start, ends):
    """Which GEMM of a group owns output column ``start``, and that GEMM's columns ``[first, end)``.

    A group is up to three GEMMs over one activation (q/k/v, gate/up), run by one launch: their outputs are
    numbered one after the other and ``ends`` holds each one's last column + 1. No tile straddles two members
    (``GROUP_ALIGN``). A group of one is a plain GEMM: member 0, first 0, end N."""
    member = 0
    first = 0
    end = ends[0]
    for j in tl.static_range(1, len(ends)):
        later = start >= ends[j - 1]
        member = tl.where(later, j, member)
        first = tl.where(later, ends[j - 1], first)
        end = tl.where(later, ends[j], end)
    return member, first, end


@triton.jit
def _pick(member, values):
    """``values[member]`` for a tuple of pointers (one per member of a group)."""
    value = values[0]
    for j in tl.static_range(1, len(values)):
        value = tl.where(member == j, values[j], value)
    return value


@triton.jit
def _mma_kernel(
    # pointers (w_ptrs to out_ptrs: one per member of the group; partial_ptr: [SPLIT_K, M, ends[-1]] fp32)
    a_ptr, a_pts_ptr, w_ptrs, w_scale_ptrs, w_pts_ptrs, bias_ptrs, out_ptrs, partial_ptr,
    # dims (ends: see _member)
    M, ends, K,
    # strides (everything is contiguous along K; each output is contiguous [M, its columns])
    stride_am, stride_wn, stride_wsn,
    # meta-parameters
    DOT_DTYPE: tl.constexpr, ALPHA_SHIFT: tl.constexpr, PTX: tl.constexpr, A_DOT_ORDER: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """Few rows on tensor cores, operands swapped: out^T tile [BLOCK_N, BLOCK_M] = W tile @ A tile^T.

    The weight is the MMA's left operand, dequantized in registers, so the MMA's long side (64 rows on
    Hopper) is N and the activation's rows fill its short side (BLOCK_M >= 16; rows past M wrap modulo M and
    are not stored). K is split over programs: program (n, m, s) takes the s-th of SPLIT_K slices of the K
    steps; with one slice it applies the global scales, bias and cast, with more it stores its raw fp32
    partial for ``_epilogue_kernel``. A group of GEMMs (``_member``) runs as one: each program reads the
    pointers of the member its N tile belongs to.

    A sum over K may take K in any order, as long as both operands take the same one. The MMA's register
    fragment gives lane t (of each 4) elements 2t, 2t+1, 2t+8, 2t+9 of every 16 in the dot's K order, so the
    dot's order is chosen to make them the lane's own contiguous bytes of the packed weight: in each chunk of
    64 elements (32 bytes), lane t owns bytes [8t, 8t + 8), one whole block of 16 elements with one scale.
    Dot position ``J*16 + h*8 + t*2 + n`` (J < 4; h, n < 2) is weight element ``t*16 + J*4 + h*2 + n``, and
    the activation tile is read in that order (pairs of elements, 4-byte copies). Each lane thus dequantizes
    8 contiguous bytes with one scale, and the dequantized tile needs no trip through shared memory on its way
    to the MMA (Triton 3.6 still moves the halves of some registers between lanes: tools/KERNEL_NOTES.md). With
    A_DOT_ORDER the activation arrives already in that order (``_dot_order``: rows padded to a multiple of 64)
    and is read contiguously, which pays when many rows would otherwise be copied a pair at a time. The
    block scales of step i+1 are loaded during step i (the compiler pipelines the weight and activation tiles
    through shared memory, but not loads this small). An NVFP4 activation arrives dequantized (exact fp16
    values, its global scale in ``a_pts_ptr``).
    """
    C: tl.constexpr = BLOCK_K // 64  # chunks per K step
    G: tl.constexpr = BLOCK_K // 16  # scale blocks per K step
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    member, first_n, end_n = _member(pid_n * BLOCK_N, ends)
    w_ptr, w_scale_ptr = _pick(member, w_ptrs), _pick(member, w_scale_ptrs)
    N = end_n - first_n
    offs_n = pid_n * BLOCK_N - first_n + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_n = offs_n % N
    rows_m = offs_m % M
    num_groups = K // 16
    steps = tl.cdiv(num_groups, G)
    per_split = tl.cdiv(steps, SPLIT_K)
    first = pid_s * per_split
    last = tl.minimum(first + per_split, steps)

    # Weight bytes [BLOCK_N, C, 4, 8] (lane-owned runs of 8 bytes) and their scale blocks [BLOCK_N, C, 4, 1].
    chunk, lane = tl.arange(0, C)[:, None, None], tl.arange(0, 4)[None, :, None]
    byte = chunk * 32 + lane * 8 + tl.arange(0, 8)[None, None, :]
    block = chunk * 4 + lane + tl.zeros((1, 1, 1), tl.int32)
    w_ptrs = w_ptr + rows_n[:, None, None, None] * stride_wn + (first * (BLOCK_K // 2) + byte)[None]
    ws_ptrs = w_scale_ptr + rows_n[:, None, None, None] * stride_wsn + (first * G + block)[None]
    # Activation [BLOCK_K, BLOCK_M] in the dot's K order: position -> element, as in the docstring.
    pos = tl.arange(0, BLOCK_K)
    if A_DOT_ORDER:
        offs_k = pos
        k_end = tl.cdiv(K, 64) * 64
    else:
        inner = pos % 64
        offs_k = (pos - inner) + (inner // 2 % 4) * 16 + inner // 16 * 4 + inner // 8 % 2 * 2 + inner % 2
        offs_k = tl.max_contiguous(tl.multiple_of(offs_k, 2), 2)  # even-aligned pairs: 4-byte async copies
        k_end = K
    a_ptrs = a_ptr + rows_m[None, :] * stride_am + (first * BLOCK_K + offs_k)[:, None]

    s = tl.load(ws_ptrs, mask=(first * G + block < num_groups)[None], other=0)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for step in range(first, last):
        scale = _scale_operand(s, DOT_DTYPE, PTX)
        ws_ptrs += G
        s = tl.load(ws_ptrs, mask=((step + 1) * G + block < num_groups)[None], other=0)
        p = tl.load(w_ptrs, mask=(step * G + byte // 8 < num_groups)[None], other=0)
        lo, hi = _operand_pair(p, tl.broadcast_to(scale, (BLOCK_N, C, 4, 8)), DOT_DTYPE, PTX)
        w = tl.reshape(tl.join(lo, hi), (BLOCK_N, C, 4, 4, 2, 2))  # [row, c, t, J, h, nibble]
        w = tl.reshape(tl.permute(w, (0, 1, 3, 4, 2, 5)), (BLOCK_N, BLOCK_K))  # dot order: c, J, h, t, nibble
        a = tl.load(a_ptrs, mask=(offs_k < k_end - step * BLOCK_K)[:, None], other=0.0).to(DOT_DTYPE)
        acc = tl.dot(w, a, acc)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K // 2

    mask = (offs_n[:, None] < N) & (offs_m[None, :] < M)
    if SPLIT_K == 1:
        alpha = tl.load(_pick(member, w_pts_ptrs)) * ALPHA_SHIFT
        if a_pts_ptr is not None:
            alpha = alpha * tl.load(a_pts_ptr)
        acc = acc * alpha
        if bias_ptrs is not None:
            acc += tl.load(_pick(member, bias_ptrs) + rows_n).to(tl.float32)[:, None]
        out_ptr = _pick(member, out_ptrs)
        tl.store(out_ptr + offs_m[None, :] * N + offs_n[:, None], acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        total_n = ends[len(ends) - 1]
        partial = partial_ptr + (pid_s * M + offs_m[None, :]) * total_n + first_n + offs_n[:, None]
        tl.store(partial, acc, mask=mask)


@triton.jit
def _gemv_rows(ends, w_ptrs, w_scale_ptrs, BLOCK_N: tl.constexpr):
    """This GEMV program's weight (the group member its rows belong to, see ``_member``) and its BLOCK_N output
    rows: (member, weight and scale pointers, the member's N, the rows' offsets, the rows wrapped modulo N)."""
    member, first_n, end_n = _member(tl.program_id(0) * BLOCK_N, ends)
    offs_n = tl.program_id(0) * BLOCK_N - first_n + tl.arange(0, BLOCK_N)
    N = end_n - first_n
    return member, _pick(member, w_ptrs), _pick(member, w_scale_ptrs), N, offs_n, offs_n % N


@triton.jit
def _gemv_weight_tiles(w_ptr, w_scale_ptr, rows_n, step, K_WORDS, stride_wn, stride_wsn, BLOCK_K: tl.constexpr):
    """The weight tiles of K step ``step`` of a GEMV: words [BLOCK_N, W] (W = BLOCK_K/8 words of 8 elements) and
    block scales [BLOCK_N, W/2]. Masked past K (a step past the end loads nothing)."""
    W: tl.constexpr = BLOCK_K // 8
    offs_u = step * W + tl.arange(0, W)
    offs_g = step * (W // 2) + tl.arange(0, W // 2)
    p = tl.load(w_ptr.to(tl.pointer_type(tl.uint32)) + rows_n[:, None] * (stride_wn // 4) + offs_u[None, :],
                mask=(offs_u < K_WORDS)[None, :], other=0)
    s = tl.load(w_scale_ptr + rows_n[:, None] * stride_wsn + offs_g[None, :], mask=(offs_g < K_WORDS // 2)[None, :],
                other=0)
    return p, s


@triton.jit
def _gemv_store(acc, alpha, member, bias_ptrs, out_ptrs, offs_n, rows_n, N, row):
    """Output row ``row`` of a GEMV: its [BLOCK_N, G] accumulator summed over G, times ``alpha``, plus the bias,
    cast, into the member's contiguous output rows of N (nothing past N)."""
    out = tl.sum(acc, axis=1) * alpha
    if bias_ptrs is not None:
        out += tl.load(_pick(member, bias_ptrs) + rows_n).to(tl.float32)
    out_ptr = _pick(member, out_ptrs)
    tl.store(out_ptr + row * N + offs_n, out.to(out_ptr.dtype.element_ty), mask=offs_n < N)


@triton.jit
def _gemv_values(a_ptr, row, step, K_WORDS, BLOCK_K: tl.constexpr):
    """Activation row ``row``'s values [W, 8] of K step ``step`` of ``_gemv_kernel`` as fp32 (rows contiguous, K
    apart), masked past K."""
    offs_u = step * (BLOCK_K // 8) + tl.arange(0, BLOCK_K // 8)
    a = tl.load(a_ptr + row * (K_WORDS * 8) + offs_u[:, None] * 8 + tl.arange(0, 8)[None, :],
                mask=(offs_u < K_WORDS)[:, None], other=0.0)
    return a.to(tl.float32)


@triton.jit
def _gemv_row(acc, w, scale, a):
    """``acc`` [BLOCK_N, G] plus one K step of one row of ``_gemv_kernel``: the unpacked weight ``w`` [BLOCK_N, W, 8]
    with block scales ``scale`` [BLOCK_N, G] (W = 2G) times the activation values ``a`` [W, 8], each block's
    products summed first and its scale applied once."""
    word_sums = tl.sum(w * a[None], axis=2)
    return acc + tl.sum(tl.reshape(word_sums, (acc.shape[0], acc.shape[1], 2)), axis=2) * scale


@triton.jit
def _gemv_activation(a_ptr, step, K_WORDS, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """The activation values of K step ``step`` of ``_gemv_kernel``, one [W, 8] tile per row (up to four; the slots
    past ROWS repeat row 0 and go unused)."""
    a0 = _gemv_values(a_ptr, 0, step, K_WORDS, BLOCK_K)
    a1, a2, a3 = a0, a0, a0
    if ROWS > 1:
        a1 = _gemv_values(a_ptr, 1, step, K_WORDS, BLOCK_K)
    if ROWS > 2:
        a2 = _gemv_values(a_ptr, 2, step, K_WORDS, BLOCK_K)
    if ROWS > 3:
        a3 = _gemv_values(a_ptr, 3, step, K_WORDS, BLOCK_K)
    return a0, a1, a2, a3


@triton.jit
def _gemv_kernel(
    # pointers (w_ptrs to out_ptrs: one per member of the group, see _member)
    a_ptr, w_ptrs, w_scale_ptrs, w_pts_ptrs, bias_ptrs, out_ptrs,
    # dims (K in 32-bit words of the packed weight, K // 8, see below)
    ends, K_WORDS,
    # strides (of packed weight rows and of scale rows, in bytes; the activation rows are contiguous)
    stride_wn, stride_wsn,
    # meta-parameters
    PTX: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """ROWS (1 to 4) activation rows, bf16/fp16: BLOCK_N output columns of every row per program, on the CUDA cores.

    A decode GEMV has to keep weight bytes in flight and spend few instructions per weight element. Each K
    step loads the tiles of the next step before computing on its own, so a program always has a load
    outstanding. K comes in words (``K_WORDS``): Triton specializes an integer argument that is a
    multiple of 16, so with K a multiple of 128 it sees each load's mask constant over 16 words and lets every
    thread load 16 bytes at once; given K itself, it could not, and loaded each word on its own (4-byte loads,
    scales byte by byte: 9% slower over the four benchmark shapes, tools/KERNEL_NOTES.md version 27). The weight
    is read as 32-bit words of 8 elements, unpacked by ``_e2m1_word_to_f32`` (under one integer instruction per
    element, then the native e4m3 and fp16 conversions) into fp32 values that are the e2m1 values times 2**-6,
    once for all rows, and multiplied with each row's fp32 values, which every weight row of the program shares.
    Two words make a 16-element block: its products are summed first and its scale applied once; the per-block
    partial sums stay in one [BLOCK_N, G] accumulator a row, reduced across G once at the end. The rows are
    separate tensors, each with the one-row kernel's layout: as one [BLOCK_N, ROWS, ...] tensor, Triton spread the
    word's 8 products across threads (Triton 3.6: 1,476 instructions a step at one row instead of 600). Weight
    rows wrap modulo N (the store is masked). A group of GEMMs runs as one launch: each program reads the member
    its rows belong to.

    Every product is exact in fp32, subnormal ones included: a weight value has 2 significant bits and its
    lowest is at least 2**-7, a bf16/fp16 activation value has at most 8 (11) and its lowest is at least
    2**-133, so each product fits 10 (13) bits no finer than 2**-140, within fp32's 2**-149.
    """
    tl.static_assert(ROWS <= 4)
    G: tl.constexpr = BLOCK_K // 16
    member, w_ptr, w_scale_ptr, N, offs_n, rows_n = _gemv_rows(ends, w_ptrs, w_scale_ptrs, BLOCK_N)
    acc0 = tl.zeros((BLOCK_N, G), dtype=tl.float32)
    acc1, acc2, acc3 = acc0, acc0, acc0
    p, s = _gemv_weight_tiles(w_ptr, w_scale_ptr, rows_n, 0, K_WORDS, stride_wn, stride_wsn, BLOCK_K)
    a0, a1, a2, a3 = _gemv_activation(a_ptr, 0, K_WORDS, ROWS, BLOCK_K)
    for step in range(0, tl.cdiv(K_WORDS * 8, BLOCK_K)):
        p_step, s_step, a0_step, a1_step, a2_step, a3_step = p, s, a0, a1, a2, a3
        p, s = _gemv_weight_tiles(w_ptr, w_scale_ptr, rows_n, step + 1, K_WORDS, stride_wn, stride_wsn, BLOCK_K)
        a0, a1, a2, a3 = _gemv_activation(a_ptr, step + 1, K_WORDS, ROWS, BLOCK_K)
        w = _e2m1_word_to_f32(p_step, PTX)
        scale = _e4m3_to_f16(s_step, PTX).to(tl.float32)
        acc0 = _gemv_row(acc0, w, scale, a0_step)
        if ROWS > 1:
            acc1 = _gemv_row(acc1, w, scale, a1_step)
        if ROWS > 2:
            acc2 = _gemv_row(acc2, w, scale, a2_step)
        if ROWS > 3:
            acc3 = _gemv_row(acc3, w, scale, a3_step)
    alpha = tl.load(_pick(member, w_pts_ptrs)) * _UNPACK_SHIFT
    _gemv_stores(acc0, acc1, acc2, acc3, alpha, member, bias_ptrs, out_ptrs, offs_n, rows_n, N, ROWS)


@triton.jit
def _gemv_stores(acc0, acc1, acc2, acc3, alpha, member, bias_ptrs, out_ptrs, offs_n, rows_n, N, ROWS: tl.constexpr):
    """The GEMVs' output rows from their accumulators (``_gemv_store``), the first ROWS of four."""
    _gemv_store(acc0, alpha, member, bias_ptrs, out_ptrs, offs_n, rows_n, N, 0)
    if ROWS > 1:
        _gemv_store(acc1, alpha, member, bias_ptrs, out_ptrs, offs_n, rows_n, N, 1)
    if ROWS > 2:
        _gemv_store(acc2, alpha, member, bias_ptrs, out_ptrs, offs_n, rows_n, N, 2)
    if ROWS > 3:
        _gemv_store(acc3, alpha, member, bias_ptrs, out_ptrs, offs_n, rows_n, N, 3)


# The NVFP4 x NVFP4 GEMV multiplies integers: twice an e2m1 value is an integer of -12..12, so a 16-element block's
# sum of products is 1/4 of an exact int32 dot product of those integers, four products per dp4a instruction.
# _WORD_LOOKUP_PTX: $4 a weight word, $5 the table's low half; out $0..$3 (see _word_lookup). The table
# {$5, 0x0C080604} holds |2 * e2m1| of magnitude codes 0..7, one byte each: 0, 1, 2, 3, 4, 6, 8, 12.
_WORD_LOOKUP_PTX = tl.constexpr("""{
.reg .b32 h, n, nh;
shr.b32 h, $4, 16; xor.b32 n, $4, 0x88888888; shr.b32 nh, n, 16;
prmt.b32 $0, $5, 0x0C080604, $4; prmt.b32 $1, $5, 0x0C080604, h;
prmt.b32 $2, $5, 0x0C080604, n; prmt.b32 $3, $5, 0x0C080604, nh;
}""")
# _WORD_DOT_PTX: $1..$4 a word's lookups, $5..$8 the activation's words, $9 the sum to add to (see _word_dot).
_WORD_DOT_PTX = tl.constexpr("""{
.reg .b32 t;
dp4a.s32.s32 t, $1, $5, $9; dp4a.s32.s32 t, $2, $6, t;
dp4a.s32.s32 t, $3, $7, t; dp4a.s32.s32 $0, $4, $8, t;
}""")


@triton.jit
def _doubled_e2m1(code):
    """e2m1 codes (0..15, int32) -> twice their values as int32 (-12..12), from ``_e2m1_value`` (exact: halves of
    integers)."""
    return (_e2m1_value(code) * 2.0).to(tl.int32)


@triton.jit
def _word_lookup(word, table, PTX: tl.constexpr):
    """A weight word (8 e2m1 nibbles, element j in bits 4j..4j+3) as ``_word_dot``'s four operands: the magnitudes
    |2 * e2m1| of its positive elements 0-3 and 4-7 as bytes (0 for the negative ones), then those of its negative
    elements. ``table`` is 0x03020100 (the PTX's lookup table, low half). Any shape, int32.

    ``prmt`` is a byte table lookup: its selector nibbles are the weight's nibbles, the low 3 bits pick a byte of
    the table |2 * e2m1| and the fourth, the e2m1 sign, makes ``prmt`` copy that byte's sign bit instead, which is
    0. A lookup of the word with its signs flipped gives the negative elements. Seven integer instructions a word,
    shared by every activation row it multiplies. Without PTX (the interpreter, sm_80) the first two words hold the
    elements' signed values 2 * e2m1 instead, repeated in the last two, and ``_word_dot`` reads them so: half the
    byte products."""
    if PTX:
        return tl.inline_asm_elementwise(_WORD_LOOKUP_PTX, "=r,=r,=r,=r,r,r", [word, table],
                                         dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)
    code = word.to(tl.int32, bitcast=True)
    w_lo, w_hi = tl.zeros_like(code), tl.zeros_like(code)
    for j in tl.static_range(4):  # elements j and j + 4
        w_lo |= (_doubled_e2m1((code >> (4 * j)) & 15) & 255) << (8 * j)
        w_hi |= (_doubled_e2m1((code >> (4 * j + 16)) & 15) & 255) << (8 * j)
    return w_lo, w_hi, w_lo, w_hi


@triton.jit
def _word_dot(lookups, a_lo, a_hi, na_lo, na_hi, acc, PTX: tl.constexpr):
    """``acc`` plus the dot product of one weight word, as its ``_word_lookup`` ``lookups``, with 8 activation
    integers, all as twice their e2m1 values: ``a_lo`` holds elements 0-3 as signed bytes, ``a_hi`` elements 4-7,
    ``na_lo`` and ``na_hi`` the same negated (they multiply the negative elements' magnitudes). Four dp4a for 8
    products, where the fp32 GEMV spends 27 instructions. Shapes broadcast, int32."""
    w_lo, w_hi, nw_lo, nw_hi = lookups
    if PTX:
        return tl.inline_asm_elementwise(_WORD_DOT_PTX, "=r,r,r,r,r,r,r,r,r,r",
                                         [w_lo, w_hi, nw_lo, nw_hi, a_lo, a_hi, na_lo, na_hi, acc], dtype=tl.int32,
                                         is_pure=True, pack=1)
    return acc + _byte_dot(w_lo, a_lo) + _byte_dot(w_hi, a_hi)  # signed values (see _word_lookup)


@triton.jit
def _byte_dot(w, x):
    """dp4a without PTX: the four signed bytes of ``w`` times those of ``x``, summed."""
    total = ((w << 24) >> 24) * ((x << 24) >> 24)
    for i in tl.static_range(1, 4):
        total += ((w << (24 - 8 * i)) >> 24) * ((x << (24 - 8 * i)) >> 24)
    return total


@triton.jit
def _split8(t):
    """[..., 8] -> its 8 slices along the last dimension, in order."""
    lo, hi = tl.split(tl.reshape(t, t.shape[:-1] + (2, 2, 2)))
    a, b = tl.split(lo)
    c, d = tl.split(hi)
    s0, s4 = tl.split(a)
    s2, s6 = tl.split(b)
    s1, s5 = tl.split(c)
    s3, s7 = tl.split(d)
    return s0, s1, s2, s3, s4, s5, s6, s7


@triton.jit
def _int8_operand_kernel(x_ptr, x_scale_ptr, pts_ptr, words_ptr, factors_ptr, pts_out_ptr, NUMEL,
                         FROM_PACKED: tl.constexpr, PTX: tl.constexpr, PDL: tl.constexpr, BLOCK_K: tl.constexpr,
                         ROW_BLOCK: tl.constexpr):
    """An NVFP4 activation as ``_gemv_w4a4_kernel`` reads it, BLOCK_K elements per program: per 16-element block,
    8 int32 words ``[lo, hi, -lo, -hi]`` of its first 8 elements then of its last 8 (``_word_dot``'s operands:
    twice the e2m1 values as signed bytes), and the block factor ``S_b / 4`` as fp32. The activation's rows are
    contiguous and taken as one row of NUMEL elements: no block straddles two rows, and the amax of that row is the
    tensor's.

    ``FROM_PACKED``: ``x`` is packed with its e4m3 scale bits. Otherwise ``x`` is high precision and is quantized
    here as ``triton_quantize`` quantizes, with the per-tensor scale ``pts_ptr`` or, when that is None, its own
    (every program computes it; program 0 stores it to ``pts_out_ptr`` for the GEMV's alpha)."""
    G: tl.constexpr = BLOCK_K // 16
    if PDL:  # launched as a programmatic dependent: wait for the kernel before, then let the GEMV launch
        gdc_wait()
        gdc_launch_dependents()
    groups = tl.program_id(0) * G + tl.arange(0, G)
    g_mask = groups < NUMEL // 16
    if FROM_PACKED:
        half = tl.program_id(0) * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
        pair = tl.load(x_ptr + half, mask=half < NUMEL // 2, other=0).to(tl.int32)
        codes = tl.reshape(tl.join(pair & 15, pair >> 4), (G, 16))
        s = _e4m3_to_f16(tl.load(x_scale_ptr + groups, mask=g_mask, other=0), PTX).to(tl.float32)
    else:
        cols = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
        xb = tl.reshape(tl.load(x_ptr + cols, mask=cols < NUMEL, other=0.0).to(tl.float32), (G, 16))
        if pts_ptr is None:
            pts = triton_quantize.row_global_scale(x_ptr, NUMEL, ROW_BLOCK)
            if tl.program_id(0) == 0:
                tl.store(pts_out_ptr, pts)
        else:
            pts = tl.load(pts_ptr)
        s, _ = triton_quantize.block_scales(xb, pts)
        codes = triton_quantize.e2m1_codes(xb, s, pts).to(tl.int32)
    values = _doubled_e2m1(codes)
    shifts = (8 * tl.arange(0, 4))[None, None, :]
    quads = tl.sum(tl.reshape(values & 255, (G, 4, 4)) << shifts, axis=2)  # [G, 4]: four values a word
    negated = tl.sum(tl.reshape((0 - values) & 255, (G, 4, 4)) << shifts, axis=2)
    # [G, word, lo/hi] and its negation -> [G, word, sign, lo/hi]
    words = tl.permute(tl.join(tl.reshape(quads, (G, 2, 2)), tl.reshape(negated, (G, 2, 2))), (0, 1, 3, 2))
    tl.store(words_ptr + groups[:, None] * 8 + tl.arange(0, 8)[None, :], tl.reshape(words, (G, 8)),
             mask=g_mask[:, None])
    tl.store(factors_ptr + groups, s * 0.25, mask=g_mask)


@triton.jit
def _w4a4_row(a_ptr, a_factor_ptr, row, step, K_WORDS, BLOCK_K: tl.constexpr):
    """Activation row ``row``'s tiles of K step ``step``: operand words [G, 8] and block factors [G] (row r's
    blocks follow row r-1's). Masked past K."""
    G: tl.constexpr = BLOCK_K // 16
    offs_g = step * G + tl.arange(0, G)
    g_mask = offs_g < K_WORDS // 2
    blocks = row * (K_WORDS // 2) + offs_g
    a = tl.load(a_ptr + blocks[:, None] * 8 + tl.arange(0, 8)[None, :], mask=g_mask[:, None], other=0)
    f = tl.load(a_factor_ptr + blocks, mask=g_mask, other=0.0)
    return a, f


@triton.jit
def _w4a4_activation(a_ptr, a_factor_ptr, step, K_WORDS, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """``_w4a4_row`` of each row, up to four (the slots past ROWS repeat row 0 and go unused)."""
    a0, f0 = _w4a4_row(a_ptr, a_factor_ptr, 0, step, K_WORDS, BLOCK_K)
    a1, f1, a2, f2, a3, f3 = a0, f0, a0, f0, a0, f0
    if ROWS > 1:
        a1, f1 = _w4a4_row(a_ptr, a_factor_ptr, 1, step, K_WORDS, BLOCK_K)
    if ROWS > 2:
        a2, f2 = _w4a4_row(a_ptr, a_factor_ptr, 2, step, K_WORDS, BLOCK_K)
    if ROWS > 3:
        a3, f3 = _w4a4_row(a_ptr, a_factor_ptr, 3, step, K_WORDS, BLOCK_K)
    return a0, f0, a1, f1, a2, f2, a3, f3


@triton.jit
def _w4a4_block_sums(acc, l0, l1, scale, a, f, zero, PTX: tl.constexpr):
    """``acc`` [BLOCK_N, G] plus one K step of one row of ``_gemv_w4a4_kernel``: the lookups ``l0``, ``l1`` of each
    block's two weight words times the row's operand words ``a`` [G, 8], an exact int32 per block, then times the
    block scales ``scale`` [BLOCK_N, G] and the row's block factors ``f`` [G]. ``zero``: int32 zeros [BLOCK_N, G]."""
    lo0, hi0, nlo0, nhi0, lo1, hi1, nlo1, nhi1 = _split8(a)
    block = _word_dot(l0, lo0[None, :], hi0[None, :], nlo0[None, :], nhi0[None, :], zero, PTX)
    block = _word_dot(l1, lo1[None, :], hi1[None, :], nlo1[None, :], nhi1[None, :], block, PTX)
    return acc + block.to(tl.float32) * f[None, :] * scale


@triton.jit
def _gemv_w4a4_kernel(
    # pointers (a_ptr, a_factor_ptr: the activation rows from _int8_operand_kernel; w_ptrs to out_ptrs: one per
    # member of the group, see _member)
    a_ptr, a_factor_ptr, a_pts_ptr, w_ptrs, w_scale_ptrs, w_pts_ptrs, bias_ptrs, out_ptrs,
    # dims (K in 32-bit words of the packed weight, as for _gemv_kernel)
    ends, K_WORDS,
    # strides (of packed weight rows and of scale rows, in bytes)
    stride_wn, stride_wsn,
    # meta-parameters
    PTX: tl.constexpr, PDL: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """ROWS (1 to 4) activation rows, NVFP4: BLOCK_N output columns of every row per program, in integer arithmetic.

    Each 16-element block of a weight row is one exact int32 dot product with the activation's block (each weight
    word's ``_word_lookup`` once for all rows, then ``_word_dot`` per row; twice the e2m1 values on both sides),
    converted to fp32 and multiplied by the two block scales (the activation's divided by 4): at most 12 + 4 + 4
    significant bits, exact in fp32, then accumulated in fp32 as every kernel here does. The loads and the rows'
    separate accumulators are ``_gemv_kernel``'s: K in words, the next step's tiles loaded before this step's
    arithmetic."""
    tl.static_assert(ROWS <= 4)
    G: tl.constexpr = BLOCK_K // 16
    member, w_ptr, w_scale_ptr, N, offs_n, rows_n = _gemv_rows(ends, w_ptrs, w_scale_ptrs, BLOCK_N)
    acc0 = tl.zeros((BLOCK_N, G), dtype=tl.float32)
    acc1, acc2, acc3 = acc0, acc0, acc0
    # The table's low half 0x03020100 for the prmt, as a value of each thread's own (rows_n's top bit is 0):
    # as a constant, ptxas keeps it in a uniform register and copies it out before every prmt.
    table = ((rows_n.to(tl.uint32, bitcast=True) >> 31) | 0x03020100).to(tl.int32)[:, None]
    zero = tl.zeros((BLOCK_N, G), dtype=tl.int32)
    p, s = _gemv_weight_tiles(w_ptr, w_scale_ptr, rows_n, 0, K_WORDS, stride_wn, stride_wsn, BLOCK_K)
    if PDL:  # the weight is in flight while the operand kernel before finishes
        gdc_wait()
    a0, f0, a1, f1, a2, f2, a3, f3 = _w4a4_activation(a_ptr, a_factor_ptr, 0, K_WORDS, ROWS, BLOCK_K)
    for step in range(0, tl.cdiv(K_WORDS * 8, BLOCK_K)):
        p_step, s_step = p, s
        a0_step, f0_step, a1_step, f1_step, a2_step, f2_step, a3_step, f3_step = a0, f0, a1, f1, a2, f2, a3, f3
        p, s = _gemv_weight_tiles(w_ptr, w_scale_ptr, rows_n, step + 1, K_WORDS, stride_wn, stride_wsn,
                                  BLOCK_K)
        a0, f0, a1, f1, a2, f2, a3, f3 = _w4a4_activation(a_ptr, a_factor_ptr, step + 1, K_WORDS, ROWS, BLOCK_K)
        w0, w1 = tl.split(tl.reshape(p_step, (BLOCK_N, G, 2)))
        l0, l1 = _word_lookup(w0, table, PTX), _word_lookup(w1, table, PTX)
        scale = _e4m3_to_f16(s_step, PTX).to(tl.float32)
        acc0 = _w4a4_block_sums(acc0, l0, l1, scale, a0_step, f0_step, zero, PTX)
        if ROWS > 1:
            acc1 = _w4a4_block_sums(acc1, l0, l1, scale, a1_step, f1_step, zero, PTX)
        if ROWS > 2:
            acc2 = _w4a4_block_sums(acc2, l0, l1, scale, a2_step, f2_step, zero, PTX)
        if ROWS > 3:
            acc3 = _w4a4_block_sums(acc3, l0, l1, scale, a3_step, f3_step, zero, PTX)

    alpha = tl.load(_pick(member, w_pts_ptrs)) * tl.load(a_pts_ptr)
    _gemv_stores(acc0, acc1, acc2, acc3, alpha, member, bias_ptrs, out_ptrs, offs_n, rows_n, N, ROWS)


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
    # pointers (w_pts_ptrs to out_ptrs: one per member of the group, see _member)
    acc_ptr, a_pts_ptr, w_pts_ptrs, bias_ptrs, out_ptrs,
    # dims (acc holds SPLIT contiguous [M, ends[-1]] fp32 partials; each output is contiguous [M, its columns])
    M, ends, SPLIT,
    # meta-parameters
    ALPHA_SHIFT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out = sum of the partials * (a_pts * w_pts * ALPHA_SHIFT) + bias, cast once (masked tiles)."""
    member, first_n, end_n = _member(tl.program_id(1) * BLOCK_N, ends)
    total_n = ends[len(ends) - 1]
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N - first_n + tl.arange(0, BLOCK_N)
    N = end_n - first_n
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    alpha = tl.load(_pick(member, w_pts_ptrs)) * ALPHA_SHIFT
    if a_pts_ptr is not None:
        alpha = alpha * tl.load(a_pts_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for split in range(SPLIT):
        acc += tl.load(acc_ptr + (split * M + offs_m[:, None]) * total_n + first_n + offs_n[None, :], mask=mask,
                       other=0.0)
    out = acc * alpha
    if bias_ptrs is not None:
        out += tl.load(_pick(member, bias_ptrs) + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    out_ptr = _pick(member, out_ptrs)
    tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


def _ptx(device: torch.device) -> bool:
    """Inline PTX and native e4m3 conversion: on sm_89+ GPUs (not in the interpreter) unless turned off."""
    return USE_PTX and not knobs.runtime.interpret and torch.cuda.get_device_capability(device) >= (8, 9)


def _pdl(device: torch.device) -> bool:
    """Programmatic dependent launch (a kernel starts while the one before finishes): sm_90+, not in the
    interpreter."""
    return _ptx(device) and torch.cuda.get_device_capability(device) >= (9, 0)


def _timing_graph(fn, flush: torch.Tensor) -> torch.cuda.CUDAGraph:
    """A CUDA graph of ``fn`` as a model runs it (no launch gaps), after a write of ``flush`` (twice the L2 size) so
    that the weight comes from memory. The write's time is in every config's result alike, so the order of the
    configs is that of ``fn`` alone."""
    fn()  # compile, and allocate outside the graph what can be
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        flush.zero_()
        fn()
    return graph


def _replay_us(graph: torch.cuda.CUDAGraph, replays: int = 10) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / replays


def _choose(key: tuple, configs: list, launch, rounds: int = 3) -> tuple:
    """The fastest of ``configs`` for ``key``, timed once per key and cached: each config's graph
    (``_timing_graph``) replayed 10 times a round, the best of ``rounds`` rounds that take the configs in turn, so
    that a slow moment of the GPU does not land on one config only (one timing each left the choice for a shape
    changing between runs: tools/KERNEL_NOTES.md, version 28). The first config when not tuning or while a CUDA graph
    is being captured (timing needs its own graphs and synchronizations)."""
    if not AUTOTUNE or len(configs) == 1:
        return configs[0]
    if key not in _best:
        if torch.cuda.is_current_stream_capturing():
            return configs[0]
        device = torch.cuda.current_device()
        flush = torch.empty(2 * torch.cuda.get_device_properties(device).L2_cache_size // 4, dtype=torch.int32,
                            device=device)
        times = [float("inf")] * len(configs)
        for _ in range(rounds):  # one graph at a time: a split GEMM's graph holds its fp32 partials
            for i, config in enumerate(configs):
                try:
                    times[i] = min(times[i], _replay_us(_timing_graph(lambda: launch(config), flush)))
                except triton.runtime.errors.OutOfResources:
                    pass
        _best[key] = configs[min(range(len(configs)), key=times.__getitem__)]
    return _best[key]


def group_problem(weights, biases=None) -> str | None:
    """Why these weights (a list of (packed, scales, pts)) and their biases (None, or one per weight) cannot run
    as one group launch, or None."""
    packed0, scales0, _ = weights[0]
    if len(weights) == 1:
        return None
    if biases is not None and any(b is None for b in biases):
        return "group members must all have a bias or none"
    if len(weights) > MAX_GROUP:
        return f"a group launch takes at most {MAX_GROUP} weights, got {len(weights)}"
    for packed, scales, _ in weights:
        if packed.shape[1] != packed0.shape[1] or packed.stride() != (packed0.shape[1], 1):
            return "group members must be contiguous weights with one K"
        if scales.stride() != (scales0.shape[1], 1):
            return "group members must have contiguous block scales"
    if any(packed.shape[0] % GROUP_ALIGN for packed, _, _ in weights[:-1]):
        return f"every group member but the last needs a multiple of {GROUP_ALIGN} output columns"
    return None


def _ends(weights) -> tuple[int, ...]:
    ends, total = [], 0
    for packed, _, _ in weights:
        total += packed.shape[0]
        ends.append(total)
    return tuple(ends)


def _columns(weights):
    """The weights' parts as the kernels take them: a tuple per part, one entry per member."""
    return tuple(zip(*weights))


def launch_gemv(a, a_scales, a_pts, weights, biases, outs, config=None, quantize=False):
    """Up to ``GEMV_MAX_ROWS`` rows into ``outs`` (one contiguous [M, N_i] per weight); ``weights`` and ``biases``
    as for :func:`launch_mma`.

    A bf16/fp16 activation ``a`` [M, K] runs ``_gemv_kernel``. An NVFP4 one runs ``_int8_operand_kernel``, which
    turns the rows into the integers ``_gemv_w4a4_kernel`` multiplies, then that kernel, as a programmatic
    dependent launch on sm_90+ (it starts loading its weight while the first kernel runs). NVFP4 is either ``a``
    packed [M, K/2] with its scale bits ``a_scales`` and per-tensor scale ``a_pts``, or, with ``quantize``, ``a``
    in high precision, quantized with the static per-tensor scale ``a_pts`` or its own when that is None.
    ``config``: (BLOCK_N, BLOCK_K, num_warps) of the GEMV kernel.
    """
    m, k = a.shape[0], weights[0][0].shape[1] * 2
    if not 1 <= m <= kernels.GEMV_MAX_ROWS:
        raise ValueError(f"the GEMV takes 1 to {kernels.GEMV_MAX_ROWS} rows, got {m}")
    w_packed, w_scales, w_pts = _columns(weights)
    if any(p.stride(1) != 1 or p.data_ptr() % 4 or p.stride(0) % 4 for p in w_packed):
        raise ValueError("the GEMV reads packed weight rows as 32-bit words: they must be contiguous and aligned")
    if any(not out.is_contiguous() for out in outs):
        raise ValueError("the GEMV writes contiguous output rows")
    w4a4 = quantize or a_scales is not None
    if not a.is_contiguous() or a.data_ptr() % 16:  # the activation is read in 16-byte vectors, its rows K apart
        a = torch.empty(a.shape, dtype=a.dtype, device=a.device).copy_(a)
    ptx, pdl = _ptx(a.device), _pdl(a.device)
    biases = None if biases is None else tuple(biases)
    ends = _ends(weights)
    if w4a4:
        if a_scales is not None:
            a_scales = a_scales.contiguous()
        if a_pts is not None:
            a_pts = a_pts.float().reshape(())
        words = torch.empty((m * k // 16, 8), dtype=torch.int32, device=a.device)
        factors = torch.empty((m * k // 16,), dtype=torch.float32, device=a.device)
        own_pts = torch.empty((), dtype=torch.float32, device=a.device) if a_pts is None else None
        _int8_operand_kernel[(triton.cdiv(m * k, _OPERAND_BLOCK_K),)](
            a, a_scales, a_pts, words, factors, own_pts, m * k, FROM_PACKED=a_scales is not None, PTX=ptx, PDL=pdl,
            BLOCK_K=_OPERAND_BLOCK_K, ROW_BLOCK=min(triton.next_power_of_2(m * k), _OPERAND_ROW_BLOCK),
            num_warps=_OPERAND_WARPS, launch_pdl=pdl)
        a_pts = a_pts if own_pts is None else own_pts
        kernel, configs, activation = _gemv_w4a4_kernel, _GEMV_W4A4_CONFIGS, (words, factors, a_pts)
        launch_options = {"PDL": pdl, "launch_pdl": pdl}
    else:
        kernel, configs, activation, launch_options = _gemv_kernel, _GEMV_CONFIGS, (a,), {}

    def run(cfg):
        block_n, block_k, warps = cfg
        kernel[(triton.cdiv(ends[-1], block_n),)](
            *activation, w_packed, w_scales, w_pts, biases, tuple(outs), ends, k // 8,
            w_packed[0].stride(0), w_scales[0].stride(0),
            PTX=ptx, ROWS=m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, **launch_options)

    if config is None:
        if knobs.runtime.interpret:
            config = _INTERPRET_GEMV
        else:
            key = ("gemv", w4a4, m, a.dtype, outs[0].dtype, biases is not None, ends, k)
            config = _choose(key, configs, run)
    run(config)
    return outs


def launch_mma(a, a_scales, a_pts, weights, biases, outs, config=None):
    """Run ``_mma_kernel`` into ``outs`` (one [M, N_i] per weight; plus ``_epilogue_kernel`` when K is split).
    ``weights`` is a list of (packed, scales, pts), one group (``group_problem`` is None for it); ``biases``
    None or one per weight. ``a_scales`` None means ``a`` is bf16/fp16 [M, K]; else ``a`` is packed NVFP4
    [M, K/2], dequantized first (fp16, exact) and its global scale ``a_pts`` joins alpha. ``config`` is
    (BLOCK_N, BLOCK_M, BLOCK_K, SPLIT_K, num_warps, stages, A_DOT_ORDER)."""
    m, k = a.shape[0], weights[0][0].shape[1] * 2
    w_packed, w_scales, w_pts = _columns(weights)
    biases = None if biases is None else tuple(biases)
    outs = tuple(outs)
    ends = _ends(weights)
    if a_scales is not None:
        a = dequantize(a, a_scales, torch.float16)
    elif a.stride(1) != 1:
        a = a.contiguous()
    dot_dtype = tl.float16 if a.dtype == torch.float16 else tl.bfloat16
    if knobs.runtime.interpret:
        dot_dtype = tl.float32  # the interpreter's bf16 tl.dot is wrong (Triton 3.9); fp32 tiles are as exact
    alpha_shift = 2.0**7 if dot_dtype == tl.bfloat16 else 2.0**14

    def run(cfg):
        block_n, block_m, block_k, split, warps, stages, dot_order = cfg
        a_in = _dot_order(a) if dot_order else a
        split = min(split, triton.cdiv(k, block_k))
        partials = None if split == 1 else torch.empty((split, m, ends[-1]), device=a.device, dtype=torch.float32)
        grid = (triton.cdiv(ends[-1], block_n), triton.cdiv(m, block_m), split)
        _mma_kernel[grid](
            a_in, a_pts, w_packed, w_scales, w_pts, biases, outs, partials,
            m, ends, k,
            a_in.stride(0), w_packed[0].stride(0), w_scales[0].stride(0),
            DOT_DTYPE=dot_dtype, ALPHA_SHIFT=alpha_shift, PTX=_ptx(a.device), A_DOT_ORDER=dot_order,
            BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_K=block_k, SPLIT_K=split, num_warps=warps, num_stages=stages,
        )
        if split > 1:
            _launch_epilogue(partials, a_pts, w_pts, biases, outs, m, ends, split, alpha_shift)

    if config is None:
        if knobs.runtime.interpret:
            config = _INTERPRET_MMA
        else:
            key = ("mma", a.dtype, outs[0].dtype, biases is not None, ends, k, triton.next_power_of_2(m))
            config = _choose(key, _mma_configs(m), run)
    run(config)
    return outs


def _launch_epilogue(acc, a_pts, w_pts, biases, outs, m, ends, split, alpha_shift):
    block_m, block_n = _EPILOGUE_BLOCK
    _epilogue_kernel[(triton.cdiv(m, block_m), triton.cdiv(ends[-1], block_n))](
        acc, a_pts, w_pts, biases, outs, m, ends, split, ALPHA_SHIFT=alpha_shift, BLOCK_M=block_m, BLOCK_N=block_n)


def _mma_configs(m: int) -> list:
    """Configs for ``_mma_kernel``, as (BLOCK_N, BLOCK_M, BLOCK_K, SPLIT_K, num_warps, num_stages, A_DOT_ORDER);
    BLOCK_M covers M (16 at least). In the H100 sweeps (KERNEL_NOTES.md, version 6) BLOCK_N 64 with BLOCK_K 64
    won at nearly every M from 16 to 128 on every shape; the best K split went from 4-8 (few rows, long K) to
    1-2, and reordering the activation first won at M = 128 (by up to 1.3x) and on some shapes at 32-64."""
    block_m = max(16, triton.next_power_of_2(m))
    orders = (False,) if m <= 16 else (True, False)
    return [(64, block_m, 64, split, 4, 3, order) for order in orders for split in (4, 8, 1, 2)]


def _dot_order(a: torch.Tensor) -> torch.Tensor:
    """[M, K] -> [M, K rounded up to 64] in ``_mma_kernel``'s K order (zero padded): in each chunk of 64,
    element ``t*16 + J*4 + h*2 + n`` moves to position ``J*16 + h*8 + t*2 + n``."""
    m, k = a.shape
    padded = torch.nn.functional.pad(a, (0, -k % 64)) if k % 64 else a  # a pad always copies
    return padded.reshape(m, -1, 4, 4, 2, 2).permute(0, 1, 3, 4, 2, 5).reshape(m, -1)


def dequantize(packed, scales, dtype, out=None):
    """[R, K/2] packed + [R, K/16] scale bits -> [R, K] of ``e2m1 * S_b`` as ``dtype`` (exact for bf16/fp16), into
    ``out`` if given (rows contiguous along K)."""
    r, k = packed.shape[0], packed.shape[1] * 2
    out = torch.empty((r, k), device=packed.device, dtype=dtype) if out is None else out
    block_r, block_k = _DEQUANT_BLOCK
    grid = (triton.cdiv(r, block_r), triton.cdiv(k, block_k))
    _dequant_kernel[grid](packed, scales, out, r, k, packed.stride(0), scales.stride(0), out.stride(0),
                          PTX=_ptx(packed.device), BLOCK_R=block_r, BLOCK_K=block_k)
    return out


def launch_cublas(a, a_scales, a_pts, weights, biases, outs):
    """Large M: dequantize to bf16/fp16 scratch (exact), one cuBLAS GEMM with fp32 output, then the epilogue.

    The block-scaled products are exact and accumulate in fp32 as in the other kernels; only the global
    scales, applied by ``_epilogue_kernel`` from device memory, stay out of cuBLAS (its alpha is a host value).
    A group's weights are dequantized into one scratch, so the group is one GEMM.
    """
    dtype = torch.bfloat16 if a_scales is not None else a.dtype
    a_values = dequantize(a, a_scales, dtype) if a_scales is not None else a
    ends = _ends(weights)
    w_values = torch.empty((ends[-1], a.shape[1] if a_scales is None else a.shape[1] * 2), device=a.device,
                           dtype=dtype)
    for (packed, scales, _), first, end in zip(weights, (0, *ends), ends):
        dequantize(packed, scales, dtype, out=w_values[first:end])
    if a.is_cuda:
        acc = torch.mm(a_values, w_values.t(), out_dtype=torch.float32)
    else:  # the interpreter's tests: the same exact products, fp32 accumulation
        acc = torch.mm(a_values.float(), w_values.float().t())
    _launch_epilogue(acc, a_pts, _columns(weights)[2], None if biases is None else tuple(biases), tuple(outs),
                     acc.shape[0], ends, 1, 1.0)
    return outs


def _launch(a, a_scales, a_pts, weights, biases, out_dtype, outs, quantize=False):
    m = a.shape[0]
    if outs is None:
        outs = [torch.empty((m, packed.shape[0]), device=a.device, dtype=out_dtype) for packed, _, _ in weights]
    if biases is not None and all(b is None for b in biases):
        biases = None
    # The GEMV quantizes to its own operands; the other kernels take the exact values.
    if quantize and m > kernels.GEMV_MAX_ROWS:
        a_pts = nvfp4.global_scale_of(a) if a_pts is None else a_pts.float().reshape(())
        a, quantize = triton_quantize.quantize_values(a, a_pts, torch.float16), False  # fp16, as a dequantize gives
    if group_problem(weights, biases) is not None:  # one launch per weight
        for i, w in enumerate(weights):
            _launch(a, a_scales, a_pts, [w], None if biases is None else [biases[i]], out_dtype, [outs[i]], quantize)
        return list(outs)
    k = weights[0][0].shape[1] * 2
    if m <= (kernels.GEMV_MAX_ROWS if quantize or a_scales is not None else kernels.GEMV_A16_MAX_ROWS):
        return list(launch_gemv(a, a_scales, a_pts, weights, biases, outs, quantize=quantize))
    if fused_problem(a.device, m, k) is None:
        from . import gluon_gemm

        launch = gluon_gemm.launch
    else:
        launch = launch_mma if m <= DIRECT_MAX_ROWS else launch_cublas
    return list(launch(a, a_scales, a_pts, weights, biases, outs))


def gemm_a16_group(x, weights, biases, out_dtype=None, outs=None):
    """``x [M, K] (bf16/fp16) @ dequant(w).T + bias`` for each (packed, scales, pts) of ``weights`` and each bias
    of ``biases`` (None, or one per weight, each a tensor or None); one launch when they form a group (see
    ``group_problem``). Returns a list of ``[M, N_i]`` of ``out_dtype`` (default x.dtype; float32 gives the
    accumulator before the final cast). ``outs`` may hold preallocated buffers."""
    return _launch(x, None, None, weights, biases, out_dtype or x.dtype, outs)


def gemm_group(a_packed, a_scales, a_pts, weights, biases, out_dtype, outs=None):
    """``dequant(a) @ dequant(w).T + bias`` for packed NVFP4 ``a [M, K/2]`` and each of ``weights``."""
    return _launch(a_packed, a_scales, a_pts, weights, biases, out_dtype, outs)


def quantize_gemm_group(x, act_pts, weights, biases, outs=None):
    """``quantize(x) @ dequant(w).T + bias`` for high-precision ``x [M, K]`` and each of ``weights``: x quantized
    with the static per-tensor scale ``act_pts``, or its own when it is None; up to ``GEMV_MAX_ROWS`` rows into the
    integer GEMV's operands (``launch_gemv``), with more by ``triton_quantize.quantize_values`` first. Returns
    ``[M, N_i]`` of x's dtype."""
    return _launch(x, None, act_pts, weights, biases, x.dtype, outs, quantize=True)


def gemm_a16(x, w_packed, w_scales, w_pts, bias, out_dtype=None, out=None):
    """One weight: ``x [M, K] (bf16/fp16) @ dequant(w).T + bias`` -> ``[M, N]`` (see :func:`gemm_a16_group`)."""
    biases = None if bias is None else [bias]
    return gemm_a16_group(x, [(w_packed, w_scales, w_pts)], biases, out_dtype, out if out is None else [out])[0]


def gemm(a_packed, a_scales, a_pts, w_packed, w_scales, w_pts, bias, out_dtype, out=None):
    """One weight: ``dequant(a) @ dequant(w).T + bias`` for packed NVFP4 ``a [M, K/2]`` -> ``[M, N]``."""
    biases = None if bias is None else [bias]
    weights = [(w_packed, w_scales, w_pts)]
    return gemm_group(a_packed, a_scales, a_pts, weights, biases, out_dtype, out if out is None else [out])[0]
