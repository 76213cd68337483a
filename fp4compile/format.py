"""NVFP4, the number format: constants and pure torch functions, the one source of truth.

Every other layer (ops, kernels, passes, GPTQ, checkpoints) imports from here. The arithmetic follows the
public reference (torchao's ``nvfp4_quantize``) operation for operation, so results are bit-identical:

    pts = amax(|x|) / (448 * 6)                                   # per-tensor, decode-direction scale
    S_b = e4m3(clamp((amax_block / 6) / pts, 2**-6, 448))         # one per 16 elements along K
    y   = clamp(x * ((1 / pts) / S_b), -6, 6)                     # reciprocal first, then multiply
    q   = round-to-nearest-even of y onto the e2m1 grid
    x  ~= e2m1(q) * S_b * pts

Everything is written in plain, trace-friendly torch (no data-dependent Python control flow), so Inductor can
compile and fuse the activation quantize with the op that produces its input.
"""

from dataclasses import dataclass

import torch

BLOCK_SIZE = 16  # elements along K sharing one e4m3 block scale
F4_E2M1_MAX = 6.0  # largest e2m1 magnitude
F8_E4M3_MAX = 448.0  # largest finite e4m3 magnitude
F8_E4M3_MIN_SCALE = 2.0**-6  # smallest block scale the reference allows (smallest normal e4m3)
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # magnitude of codes 0..7; bit 3 is the sign
# Round-to-nearest-even boundaries on |y| between consecutive e2m1 magnitudes. At a tie the even code wins:
# (strict) ">" keeps the lower, even code; ">=" moves up to the even code.
_E2M1_UP = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class NVFP4Tensor:
    """A quantized tensor of logical shape ``[..., K]``.

    packed:       uint8 ``[..., K/2]``, element ``2j`` in the low nibble and ``2j+1`` in the high nibble.
    scales:       float8_e4m3fn ``[..., K/16]``, one per block of 16 along K.
    global_scale: fp32 scalar tensor (decode direction, NVFP4.md's pts), or None for single-level scaling.
    """

    packed: torch.Tensor
    scales: torch.Tensor
    global_scale: torch.Tensor | None

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.packed.shape[:-1], self.packed.shape[-1] * 2))


def check_quantizable(x: torch.Tensor) -> None:
    """Raise a ValueError naming the problem if ``x`` cannot be quantized to NVFP4."""
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"NVFP4 quantize takes float32, bfloat16 or float16, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] % BLOCK_SIZE != 0:
        k = x.shape[-1] if x.dim() else "a scalar"
        raise ValueError(f"NVFP4 needs the last dimension (K) to be a multiple of {BLOCK_SIZE}, got K={k}")


def div_rn(a: torch.Tensor, b: torch.Tensor | float) -> torch.Tensor:
    """``a / b`` as the correctly rounded fp32 quotient, also in the Triton code Inductor generates, where an fp32
    ``/`` is an approximate division (``div.full.f32``): divided in fp64 and rounded to fp32, which gives that same
    quotient (fp64 has more than twice fp32's precision, so the double rounding is harmless). Without it the
    compiled dynamic activation scale was off by an ulp for 15-22% of random tensors on an H200.

    A quotient that feeds another ``div_rn`` must pass through a reshape first: torch 2.11 merges a cast to fp32
    followed by a cast to fp64 into no cast at all (Inductor's ``pointless_convert``), which would skip the rounding."""
    return (a.double() / (b.double() if isinstance(b, torch.Tensor) else b)).float()


def global_scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """pts = amax / (448 * 6), the correctly rounded fp32 quotient."""
    return div_rn(amax, F8_E4M3_MAX * F4_E2M1_MAX)


def global_scale_of(x: torch.Tensor) -> torch.Tensor:
    """The per-tensor (decode-direction) scale of ``x``: amax(|x|) / 2688, an fp32 scalar tensor."""
    return global_scale_from_amax(x.float().abs().amax())


def block_scales(x_blocks: torch.Tensor, pts: torch.Tensor | None) -> torch.Tensor:
    """e4m3 block scales for fp32 ``x_blocks`` of shape ``[..., K/16, 16]``; returns ``[..., K/16]``."""
    amax = x_blocks.abs().amax(dim=-1)
    s = amax / F4_E2M1_MAX
    if pts is not None:
        s = s / pts
    return s.clamp(min=F8_E4M3_MIN_SCALE, max=F8_E4M3_MAX).to(torch.float8_e4m3fn)


def e2m1_codes(y: torch.Tensor) -> torch.Tensor:
    """Round fp32 ``y`` (already within [-6, 6]) to the nearest e2m1 value, ties to even; uint8 codes 0..15."""
    a = y.abs()
    mag = torch.zeros_like(a, dtype=torch.uint8)
    for bound, inclusive in _E2M1_UP:
        mag = mag + (a >= bound if inclusive else a > bound).to(torch.uint8)
    sign = torch.signbit(y).to(torch.uint8) << 3
    return mag | sign


def e2m1_round(y: torch.Tensor) -> torch.Tensor:
    """fp32 ``y`` (already within [-6, 6], or NaN) rounded to the nearest e2m1 value, ties to even, as fp32: equal to
    ``e2m1_to_float(e2m1_codes(y))`` for every such ``y``, -0 and NaN (read as 0 with its sign) included, in about
    ten operations where the codes and their decode take about twenty-five. ``(|y| + c) - c`` rounds ``|y|`` to a
    multiple of the spacing of ``c``'s floats by fp32's own round-to-nearest-even, and ``c`` = 1.5 * 2**22, 2**23
    or 2**24 has spacing 0.5, 1 or 2: e2m1's spacing below 2, below 4 and up to 6."""
    a = y.abs()
    c = torch.where(a < 2.0, 1.5 * 2.0**22, torch.where(a < 4.0, 2.0**23, 2.0**24))
    return torch.copysign(torch.where(a <= F4_E2M1_MAX, (a + c) - c, 0.0), y)


def e2m1_to_float(codes: torch.Tensor) -> torch.Tensor:
    """Decode uint8 e2m1 codes (0..15) to fp32: magnitude ``m/2`` for exponent 0, else ``2**(e-1) * (1 + m/2)``.

    Arithmetic rather than a table lookup, so Inductor fuses it into one pointwise kernel with what follows."""
    exponent = ((codes >> 1) & 3).float()
    half_mantissa = (codes & 1).float() * 0.5
    magnitude = torch.where(exponent == 0, half_mantissa, torch.exp2(exponent - 1) * (1 + half_mantissa))
    return torch.where((codes & 8) != 0, -magnitude, magnitude)


def e2m1_to_float_by_bits(codes: torch.Tensor) -> torch.Tensor:
    """Decode uint8 e2m1 codes (0..15) to fp32 in five operations, for code that Inductor generates per layer.

    The three magnitude bits placed at fp32 bits 24..22 (and the sign at bit 31) form the e2m1 value times
    ``2**-126``: exponent field ``e`` and top mantissa bit ``m`` read as fp32 give ``2**(e-127) * (1 + m/2)``, and
    for ``e = 0`` the subnormal ``m * 2**-127``. One multiply by ``2**126`` is then exact, as long as subnormals are
    kept (CUDA code from Triton keeps them; ``torch.set_flush_denormal(True)`` on a CPU would not). Equal to
    :func:`e2m1_to_float` for every code (tested)."""
    c = codes.to(torch.int32)
    return (((c & 7) << 22) | ((c & 8) << 28)).view(torch.float32) * 2.0**126


def dequantize_blocks_by_bits(packed: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``e2m1 * S_b`` (no per-tensor scale) as ``dtype``, decoded by :func:`e2m1_to_float_by_bits`; bit-identical to
    ``dequantize_parts(packed, scales, None, dtype)`` where subnormals are kept. The nibbles are split from int32
    bytes by a mask and a shift (no per-element shift amounts), which Inductor turns into faster code."""
    b = packed.to(torch.int32)
    codes = torch.stack((b & 0xF, b >> 4), dim=-1).flatten(-2)
    values = e2m1_to_float_by_bits(codes).unflatten(-1, (-1, BLOCK_SIZE))
    return (values * scales.view(torch.float8_e4m3fn).float().unsqueeze(-1)).flatten(-2).to(dtype)


def pack(codes: torch.Tensor) -> torch.Tensor:
    """Pack uint8 codes ``[..., K]`` two per byte: even index in the low nibble. Returns ``[..., K/2]``."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack`: uint8 ``[..., K/2]`` to codes ``[..., K]``."""
    shift = torch.arange(0, 8, 4, dtype=torch.uint8, device=packed.device)  # [0, 4]: low nibble first
    return ((packed.unsqueeze(-1) >> shift) & 0xF).flatten(-2)


def encode_scales(scales: torch.Tensor, pts: torch.Tensor | None) -> torch.Tensor:
    """The fp32 factors that take each block to e2m1's range: ``(1 / pts) / S_b``, the reciprocal first (``1 / S_b``
    single level). The order of the two roundings is the reference's."""
    return scales.float().reciprocal() if pts is None else pts.reciprocal() / scales.float()


def quantize_blocks(x: torch.Tensor, pts: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` ``[..., K]`` with a given pts (None: single level). Returns (packed uint8, e4m3 scales)."""
    xb = x.float().unflatten(-1, (-1, BLOCK_SIZE))
    scales = block_scales(xb, pts)
    y = (xb * encode_scales(scales, pts).unsqueeze(-1)).clamp(-F4_E2M1_MAX, F4_E2M1_MAX)
    return pack(e2m1_codes(y).flatten(-2)), scales


def round_to_e4m3(s: torch.Tensor) -> torch.Tensor:
    """fp32 ``s`` within [2**-6, 448], or NaN, rounded to the nearest e4m3 value (ties to even) and kept as fp32:
    the mantissa rounded to 3 bits on the fp32 bits. Equal to ``s.to(torch.float8_e4m3fn).float()`` there (every
    such value rounds to an e4m3 normal) without an fp8 type, which Triton lacks before sm_89. A NaN is kept apart:
    on the GPU its bits may be 0x7FFFFFFF, whose rounding would carry into the sign."""
    bits = s.view(torch.int32)
    rounded = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000).view(torch.float32)
    return torch.where(s.isnan(), s, rounded)


def quantize_values(x: torch.Tensor, pts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x``'s NVFP4 values without the per-tensor scale, ``e2m1 * S_b``, as ``dtype`` (exact for bf16, fp16 and
    fp32: at most 6 significant bits, magnitudes 2**-10 to 2688): :func:`quantize_blocks`, then dequantized, bit
    for bit (tested). Written for Inductor to generate as one kernel on any device: the divisions by :func:`div_rn`
    (each quotient reshaped before the next division, see there), the block scales rounded by
    :func:`round_to_e4m3`, the values by :func:`e2m1_round`, no packing."""
    xb = x.float().unflatten(-1, (-1, BLOCK_SIZE))
    s = div_rn(div_rn(xb.abs().amax(dim=-1), F4_E2M1_MAX).unsqueeze(-1), pts)  # [..., K/16, 1]
    s = round_to_e4m3(s.clamp(min=F8_E4M3_MIN_SCALE, max=F8_E4M3_MAX))
    recip = div_rn(div_rn(torch.ones_like(pts), pts).reshape(1), s)  # encode_scales, as Inductor rounds it
    y = (xb * recip).clamp(-F4_E2M1_MAX, F4_E2M1_MAX)
    return (e2m1_round(y) * s).flatten(-2).to(dtype)


def quantize(x: torch.Tensor, global_scale: torch.Tensor | None = None, *, two_level: bool = True) -> NVFP4Tensor:
    """Quantize ``x`` (fp32, bf16 or fp16, shape ``[..., K]`` with K % 16 == 0) to NVFP4.

    With ``two_level`` and no ``global_scale``, the per-tensor scale is computed from amax(|x|).
    """
    check_quantizable(x)
    if not two_level:
        if global_scale is not None:
            raise ValueError("global_scale was given but two_level=False uses no global scale")
        pts = None
    else:
        pts = global_scale_of(x) if global_scale is None else torch.as_tensor(global_scale, device=x.device).float()
        pts = pts.reshape(())
    packed, scales = quantize_blocks(x, pts)
    return NVFP4Tensor(packed, scales, pts)



def dequantize_parts(
    packed: torch.Tensor, scales: torch.Tensor, pts: torch.Tensor | None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Dequantize raw parts: ``e2m1 * S_b * pts`` computed in fp32, then cast to ``dtype``.

    ``scales`` may be float8_e4m3fn or its uint8 bit pattern.
    """
    if scales.dtype == torch.uint8:
        scales = scales.view(torch.float8_e4m3fn)
    values = e2m1_to_float(unpack(packed)).unflatten(-1, (-1, BLOCK_SIZE))
    out = values * scales.float().unsqueeze(-1)
    if pts is not None:
        out = out * pts.float()
    return out.flatten(-2).to(dtype)


def dequantize(q: NVFP4Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The values ``q`` stands for, as ``dtype``."""
    return dequantize_parts(q.packed, q.scales, q.global_scale, dtype)


def fake_quantize(x: torch.Tensor, global_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize then dequantize ``x`` (two-level), returned in fp32: the NVFP4 value of every element."""
    return dequantize(quantize(x, global_scale))


def reference_gemm(a: torch.Tensor, w_packed, w_scales, w_pts, bias, out_dtype: torch.dtype) -> torch.Tensor:
    """fp32 ``a @ dequant(w).T + bias``, cast to ``out_dtype``: the exact CPU reference of both GEMMs."""
    w = dequantize_parts(w_packed, w_scales, w_pts)
    out = a.float() @ w.t()
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def swizzle_scales(scales: torch.Tensor) -> torch.Tensor:
    """Lay out ``[R, C]`` block scales in cuBLAS' blocked layout for ``torch._scaled_mm`` (sm_100+).

    Pads to ``R' = ceil(R/128)*128`` rows and ``C' = ceil(C/4)*4`` columns with zeros; scale (r, c) lands at
    byte ``((r//128) * (C'/4) + c//4) * 512 + (r%32) * 16 + ((r//32)%4) * 4 + c%4``. Returns a flat tensor.
    """
    rows, cols = scales.shape
    r_pad, c_pad = -(-rows // 128) * 128, -(-cols // 4) * 4
    padded = scales.new_zeros((r_pad, c_pad))
    padded[:rows, :cols] = scales
    # [row tile, 4 row groups of 32, 32 rows, col tile, 4 cols] -> [row tile, col tile, 32 rows, 4 groups, 4 cols]
    blocks = padded.view(r_pad // 128, 4, 32, c_pad // 4, 4).permute(0, 3, 2, 1, 4)
    return blocks.contiguous().flatten()
