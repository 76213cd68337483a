"""GEMM kernels per device family; ``ops`` registers these as the CUDA implementations of its GEMM ops.

Kernels know nothing of graphs. Each entry takes the same arguments as its op (see ``ops``) and returns the
output; shapes or devices a kernel cannot take fall back to the exact reference with a logged reason.
"""

import logging

import torch

from .. import format as nvfp4

log = logging.getLogger(__name__)


def gemm(a_packed, a_scales, a_pts, w_packed, w_scales, w_pts, bias, out_dtype):
    """NVFP4 x NVFP4 on CUDA."""
    a = nvfp4.dequantize_parts(a_packed, a_scales, a_pts)
    return nvfp4.reference_gemm(a, w_packed, w_scales, w_pts, bias, out_dtype)


def gemm_a16(x, w_packed, w_scales, w_pts, bias):
    """bf16/fp16 x NVFP4 on CUDA."""
    return nvfp4.reference_gemm(x, w_packed, w_scales, w_pts, bias, x.dtype)
