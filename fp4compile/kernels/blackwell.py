"""NVFP4 x NVFP4 on sm_100+ through ``torch._scaled_mm`` (cuBLASLt block-scaled FP4). UNTESTED ON HARDWARE.

No sm_100 GPU was available to the project: the call's construction is checked on meta tensors and the scale
layout against NVFP4.md's formula on CPU (tests/test_kernels.py), nothing more.

The operands are the packed bytes viewed as ``float4_e2m1fn_x2``; block scales go in cuBLAS' blocked
("swizzled") layout. cuBLAS computes ``sum e2m1 * S_a * e2m1 * S_w`` in fp32; the global scales
(``alpha = a_pts * w_pts``) and the bias are applied to that fp32 result, then one cast to ``out_dtype``.
"""

import torch

from .. import format as nvfp4


def unsupported(a_packed, w_packed) -> str | None:
    """Why ``_scaled_mm`` cannot take these operands, or None (N % 16 and 16-byte-aligned packed rows)."""
    n, half_k = w_packed.shape
    if n % 16 or half_k % 16:
        return f"torch._scaled_mm NVFP4 needs N % 16 == 0 and K % 32 == 0 (N={n}, K={2 * half_k})"
    return None


def scaled_mm_args(a_packed, a_scales, w_packed, w_scales):
    """The positional operands of ``torch._scaled_mm`` for 2-D packed NVFP4 ``a [M, K/2]`` and ``w [N, K/2]``."""
    a = a_packed.view(torch.float4_e2m1fn_x2)
    w = w_packed.view(torch.float4_e2m1fn_x2)
    scale_a = nvfp4.swizzle_scales(a_scales.view(torch.uint8)).view(torch.float8_e4m3fn)
    scale_w = nvfp4.swizzle_scales(w_scales.view(torch.uint8)).view(torch.float8_e4m3fn)
    return a, w.t(), scale_a, scale_w


def gemm(a_packed, a_scales, a_pts, w_packed, w_scales, w_pts, bias, out_dtype):
    """2-D NVFP4 x NVFP4: ``dequant(a) @ dequant(w).T + bias`` as ``out_dtype``."""
    acc = torch._scaled_mm(*scaled_mm_args(a_packed, a_scales, w_packed, w_scales), out_dtype=torch.float32)
    acc = acc * (a_pts.float() * w_pts.float())
    if bias is not None:
        acc = acc + bias.float()
    return acc.to(out_dtype)
