"""The ``torch.ops.fp4`` custom ops the graph passes emit, with fake (meta) implementations and CPU references.

    fp4::quantize_act(x [..., K], global_scale?) -> (packed u8 [..., K/2], scales u8 [..., K/16], pts f32 [])
    fp4::quantize_blocks(x [..., K], pts) -> (packed, scales)        (quantize_act's second half)
    fp4::gemm(a_packed, a_scales, a_pts, w_packed, w_scales, w_pts, bias?) -> [..., N]   (NVFP4 x NVFP4)
    fp4::gemm_a16(x [..., K], w_packed, w_scales, w_pts, bias?) -> [..., N]               (high precision x NVFP4)
    fp4::linear(x, w_packed, w_scales, w_pts, bias?, act_pts?, scheme) -> [..., N]        (a calibrated layer)

Weights are ``[N, K]`` (K contiguous). Packed values and block scales cross every Inductor-visible edge as uint8
(the bit patterns of e2m1 pairs and e4m3 scales): Inductor's C++ backend cannot read or write float4/float8
buffers, and a uint8 buffer can be viewed as float4 or float8 by a consumer without a kernel.

``quantize_act`` decomposes for Inductor into the amax (plain torch, fused with the op that produces the
activation) and the block quantize: plain torch on CPU (fused too), the ``quantize_blocks`` Triton kernel on CUDA. The GEMMs
are opaque extern calls; on CUDA they dispatch to ``kernels``.
The output dtype of a GEMM is the activation's dtype (``gemm`` gets it from ``out_dtype``).
"""

import torch
from torch._inductor.decomposition import register_decomposition

from . import format as nvfp4

Scheme = str  # "nvfp4" (NVFP4 weights and activations) or "nvfp4a16" (NVFP4 weights only)
SCHEMES = ("nvfp4", "nvfp4a16")


def _plain_quantize_blocks(x: torch.Tensor, pts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    packed, scales = nvfp4.quantize_blocks(x, pts)
    return packed, scales.view(torch.uint8)


def _quantized_shapes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    k = x.shape[-1]
    packed = x.new_empty((*x.shape[:-1], k // 2), dtype=torch.uint8)
    return packed, x.new_empty((*x.shape[:-1], k // nvfp4.BLOCK_SIZE), dtype=torch.uint8)


@torch.library.custom_op("fp4::quantize_blocks", mutates_args=())
def quantize_blocks(x: torch.Tensor, pts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed values and block scales of ``x`` for a given per-tensor scale ``pts``; on CUDA a Triton kernel."""
    return _plain_quantize_blocks(x, pts)


quantize_blocks.register_fake(lambda x, pts: _quantized_shapes(x))


def _block_quantizer(device: torch.device):
    """How ``quantize_act`` quantizes its blocks on ``device``. On CPU: plain torch, which Inductor fuses with the op
    producing the activation. On CUDA: the ``quantize_blocks`` op (a Triton kernel, an extern call for Inductor),
    which reads the activation once and beats Inductor's code for this pattern several times over."""
    return torch.ops.fp4.quantize_blocks if device.type == "cuda" else _plain_quantize_blocks


def _quantize_act(x: torch.Tensor, global_scale: torch.Tensor | None = None):
    pts = nvfp4.global_scale_of(x) if global_scale is None else global_scale.float().reshape(()).clone()
    packed, scales = _block_quantizer(x.device)(x, pts)
    return packed, scales, pts


@torch.library.custom_op("fp4::quantize_act", mutates_args=())
def quantize_act(
    x: torch.Tensor, global_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize an activation to NVFP4; the per-tensor scale is dynamic (amax) unless ``global_scale`` is given."""
    return _quantize_act(x, global_scale)


@quantize_act.register_fake
def _(x, global_scale=None):
    return (*_quantized_shapes(x), x.new_empty((), dtype=torch.float32))


register_decomposition(torch.ops.fp4.quantize_act.default)(_quantize_act)


def _out_shape(lead: torch.Size, w_packed: torch.Tensor) -> tuple[int, ...]:
    return (*lead, w_packed.shape[0])


@torch.library.custom_op("fp4::gemm", mutates_args=())
def gemm(
    a_packed: torch.Tensor,
    a_scales: torch.Tensor,
    a_pts: torch.Tensor,
    w_packed: torch.Tensor,
    w_scales: torch.Tensor,
    w_pts: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """NVFP4 activation x NVFP4 weight: ``dequant(a) @ dequant(w).T + bias`` in fp32, returned as ``out_dtype``."""
    a = nvfp4.dequantize_parts(a_packed, a_scales, a_pts)
    return nvfp4.reference_gemm(a, w_packed, w_scales, w_pts, bias, out_dtype)


@gemm.register_fake
def _(a_packed, a_scales, a_pts, w_packed, w_scales, w_pts, bias, out_dtype):
    return a_packed.new_empty(_out_shape(a_packed.shape[:-1], w_packed), dtype=out_dtype)


@torch.library.custom_op("fp4::gemm_a16", mutates_args=())
def gemm_a16(
    x: torch.Tensor, w_packed: torch.Tensor, w_scales: torch.Tensor, w_pts: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """High-precision activation x NVFP4 weight: ``x @ dequant(w).T + bias`` in fp32, returned as ``x.dtype``."""
    return nvfp4.reference_gemm(x, w_packed, w_scales, w_pts, bias, x.dtype)


@gemm_a16.register_fake
def _(x, w_packed, w_scales, w_pts, bias):
    return x.new_empty(_out_shape(x.shape[:-1], w_packed))


def nvfp4_linear(x, w_packed, w_scales, w_pts, bias, act_pts, scheme: Scheme) -> torch.Tensor:
    """One quantized linear layer as the backend runs it: activation quantize (``nvfp4`` only), then the GEMM."""
    if scheme == "nvfp4a16":
        return torch.ops.fp4.gemm_a16(x, w_packed, w_scales, w_pts, bias)
    a_packed, a_scales, a_pts = torch.ops.fp4.quantize_act(x, act_pts)
    return torch.ops.fp4.gemm(a_packed, a_scales, a_pts, w_packed, w_scales, w_pts, bias, x.dtype)


@torch.library.custom_op("fp4::linear", mutates_args=())
def linear(
    x: torch.Tensor,
    w_packed: torch.Tensor,
    w_scales: torch.Tensor,
    w_pts: torch.Tensor,
    bias: torch.Tensor | None,
    act_pts: torch.Tensor | None,
    scheme: str,
) -> torch.Tensor:
    """A linear layer whose weight is already NVFP4 (a calibrated model); the fp4 backend rewrites it in place."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; expected one of {SCHEMES}")
    return nvfp4_linear(x, w_packed, w_scales, w_pts, bias, act_pts, scheme)


@linear.register_fake
def _(x, w_packed, w_scales, w_pts, bias, act_pts, scheme):
    return x.new_empty(_out_shape(x.shape[:-1], w_packed))


def _register_cuda_kernels() -> None:
    from . import kernels

    quantize_blocks.register_kernel("cuda")(kernels.quantize_blocks)
    gemm.register_kernel("cuda")(kernels.gemm)
    gemm_a16.register_kernel("cuda")(kernels.gemm_a16)


_register_cuda_kernels()
