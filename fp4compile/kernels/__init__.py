"""GEMM kernels per device family; ``ops`` registers these as the CUDA implementations of its GEMM ops.

Kernels know nothing of graphs. Each entry takes the same arguments as its op (see ``ops``: lists of weights, one
GEMM per weight over one activation, run as one launch where they form a group), flattens leading dims to 2-D and
picks a kernel by device:

- compute capability 8.x / 9.x: Triton kernels (``triton_gemm``): up to ``DIRECT_MAX_ROWS`` activation rows they
  read the packed weight once, in registers (GEMVs up to ``GEMV_A16_MAX_ROWS`` rows of a bf16/fp16 activation and
  ``GEMV_MAX_ROWS`` of an NVFP4 one, the latter in integer arithmetic); above, an exact dequantize feeds cuBLAS.
  On 9.x (Hopper) with Triton 3.6, the rows past the GEMVs' up to ``FUSED_MAX_ROWS`` run the fused Gluon kernel
  (``gluon_gemm``) instead, where K allows (``fused_problem``);
- 10.x and up: ``torch._scaled_mm`` for NVFP4 x NVFP4 (``blackwell``, untested on hardware), Triton otherwise;
- anything else, or inputs a kernel cannot take: the exact reference (``format.reference_gemm``), with the
  reason logged once per reason.

The activation quantize to packed NVFP4 (``quantize_blocks``) runs the Triton kernel of ``triton_quantize`` on any
CUDA device; so does, inside :func:`quantize_gemm`, the one to the exact values ``e2m1 * S_b`` that a GEMM of more
rows than the integer GEMV takes reads.
Triton is imported lazily, so this module imports on machines without it.
"""

import functools
import logging

import torch

from .. import format as nvfp4

log = logging.getLogger(__name__)

GEMV_MAX_ROWS = 4  # the GEMVs' rows (a weight word unpacked once for all), and NVFP4 activations' GEMV limit
GEMV_A16_MAX_ROWS = 2  # bf16/fp16 activations: from 3 rows the fused kernel is faster (H200; KERNEL_NOTES.md v29)
DIRECT_MAX_ROWS = 128  # compiled GEMMs with at most this many rows call the kernels (ops._gemm_plan)
FUSED_MAX_ROWS = 2048  # Hopper: the fused kernel's rows (its version 14 form tied dequantize + cuBLAS at 2048)
FUSED_K_MULTIPLE = 256  # the fused kernel's K: scale rows 16-byte aligned, whole 64-element steps
MAX_GROUP = 3  # weights per group launch (q/k/v)
GROUP_ALIGN = 64  # output columns of every group member but the last: a multiple of every kernel's BLOCK_N
_HALF_DTYPES = (torch.bfloat16, torch.float16)
_SCALE_DTYPES = (torch.uint8, torch.float8_e4m3fn)


@functools.cache
def _fallback_notice(reason: str) -> None:
    log.warning("fp4 kernel fallback: %s", reason)


@functools.cache
def _family(device_index: int) -> tuple[str, str]:
    """("triton" | "blackwell" | "reference", why the reference) for a CUDA device."""
    major, minor = torch.cuda.get_device_capability(device_index)
    if major < 8:
        return "reference", f"compute capability {major}.{minor} has no NVFP4 kernel (needs 8.0 or newer)"
    try:
        from . import triton_gemm  # noqa: F401
    except ImportError as e:
        return "reference", f"Triton is not importable ({e})"
    return ("blackwell" if major >= 10 else "triton"), ""


FUSED_TRITON = (3, 6)  # Gluon is experimental and its API changes between Triton releases (3.9 renamed cp.async)


def fused_platform_problem(capability: tuple[int, int], triton_version: str) -> str | None:
    """Why the fused Gluon kernel cannot run on a GPU of ``capability`` with Triton ``triton_version``, or None."""
    major, minor = capability
    if major != 9:
        return f"the fused kernel is written for compute capability 9.x (Hopper), this is {major}.{minor}"
    if tuple(int(part) for part in triton_version.split(".")[:2]) != FUSED_TRITON:
        return (f"the fused kernel is written for the Gluon of Triton {FUSED_TRITON[0]}.{FUSED_TRITON[1]}, "
                f"this is Triton {triton_version}")
    try:
        from . import gluon_gemm  # noqa: F401
    except ImportError as e:
        return f"Gluon is not importable ({e})"
    return None


@functools.cache
def _fused_family_problem(device_index: int) -> str | None:
    import triton

    capability = torch.cuda.get_device_capability(device_index)
    reason = fused_platform_problem(capability, triton.__version__)
    if reason is not None and capability[0] == 9:  # a Hopper without its fastest kernel: say why, once
        _fallback_notice(f"{reason}; the Triton kernels run instead")
    return reason


def fused_problem(device: torch.device, m: int, k: int) -> str | None:
    """Why a GEMM of ``m`` rows and depth ``k`` on ``device`` does not run the fused Gluon kernel, or None."""
    if device.type != "cuda":
        return "the fused kernel runs on CUDA"
    if not 2 <= m <= FUSED_MAX_ROWS:
        return f"the fused kernel takes 2 to {FUSED_MAX_ROWS} rows, got {m}"
    if k % FUSED_K_MULTIPLE:
        return f"the fused kernel takes K a multiple of {FUSED_K_MULTIPLE}, got {k}"
    return _fused_family_problem(_device_index(device))


def _layout_problem(packed, scales, pts, name: str) -> str | None:
    if packed.dtype != torch.uint8 or scales.dtype not in _SCALE_DTYPES:
        return f"{name}: packed must be uint8 and scales uint8/float8_e4m3fn, got {packed.dtype}, {scales.dtype}"
    if packed.stride(-1) != 1 or scales.stride(-1) != 1:
        return f"{name}: packed values and scales must be contiguous along K"
    if scales.shape[-1] * 8 != packed.shape[-1]:
        return f"{name}: scales {tuple(scales.shape)} do not match packed {tuple(packed.shape)}"
    if pts.numel() != 1:
        return f"{name}: the global scale must have one element, got shape {tuple(pts.shape)}"
    return None


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _problem(device, tensors, w_packed, w_scales, w_pts, bias) -> str | None:
    """Why the fast kernels cannot take these inputs (one weight of a group), or None."""
    if device.type != "cuda":
        return f"tensors are on {device.type}, the kernels run on CUDA"
    if any(t.device != device for t in tensors if t is not None):
        return "inputs are on different devices"
    reason = _layout_problem(w_packed, w_scales, w_pts, "weight")
    if reason is not None:
        return reason
    if w_packed.dim() != 2:
        return f"weight must be 2-D [N, K/2], got {w_packed.dim()}-D"
    if bias is not None and (bias.dim() != 1 or bias.stride(0) != 1):
        return "bias must be a contiguous 1-D tensor"
    return _family(_device_index(device))[1] or None


def _weights_problem(device, tensors, w_packed, w_scales, w_pts, bias) -> str | None:
    """The first problem (:func:`_problem`) of any weight of the lists, or None."""
    for member in zip(w_packed, w_scales, w_pts, bias):
        reason = _problem(device, (*tensors, *member), *member)
        if reason is not None:
            return reason
    return None


def gemm(a_packed, a_scales, a_pts, w_packed, w_scales, w_pts, bias, out_dtype):
    """NVFP4 x NVFP4 on CUDA: ``[..., K/2]`` packed activation times each weight of the lists ``w_packed``,
    ``w_scales``, ``w_pts``, ``bias`` (one entry per weight, a bias may be None) -> a list of ``[..., N_i]`` of
    ``out_dtype``."""
    lead = a_packed.shape[:-1]
    reason = _weights_problem(a_packed.device, (a_packed, a_scales, a_pts), w_packed, w_scales, w_pts, bias)
    reason = reason or _layout_problem(a_packed, a_scales, a_pts, "activation")
    if reason is None and out_dtype not in (*_HALF_DTYPES, torch.float32):
        reason = f"output dtype {out_dtype} is not bf16, fp16 or fp32"
    if reason is not None:
        _fallback_notice(f"{reason}; running the slow exact reference")
        a = nvfp4.dequantize_parts(a_packed, a_scales, a_pts)
        return [nvfp4.reference_gemm(a, *w, out_dtype) for w in zip(w_packed, w_scales, w_pts, bias)]
    a2 = a_packed.reshape(-1, a_packed.shape[-1])
    s2 = a_scales.reshape(-1, a_scales.shape[-1]).view(torch.uint8)
    if a2.shape[0] == 0:
        return [a_packed.new_empty((*lead, p.shape[0]), dtype=out_dtype) for p in w_packed]
    kind, _ = _family(_device_index(a_packed.device))
    if kind == "blackwell":
        from . import blackwell

        problem = next(filter(None, (blackwell.unsupported(a2, p) for p in w_packed)), None)
        if problem is None:
            return [blackwell.gemm(a2, s2, a_pts, *w, out_dtype).reshape(*lead, -1)
                    for w in zip(w_packed, w_scales, w_pts, bias)]
        _fallback_notice(f"{problem}; running the Triton kernel instead")
    from . import triton_gemm

    weights = [(p, s.view(torch.uint8), t) for p, s, t in zip(w_packed, w_scales, w_pts)]
    outs = triton_gemm.gemm_group(a2, s2, a_pts, weights, bias, out_dtype)
    return [out.reshape(*lead, -1) for out in outs]


def quantize_gemm(x, act_pts, w_packed, w_scales, w_pts, bias):
    """NVFP4 x NVFP4 on CUDA from the high-precision activation ``x [..., K]``: x quantized with the static
    per-tensor scale ``act_pts`` (or its own, dynamic, when None), times each weight of the lists (as for
    :func:`gemm`) -> a list of ``[..., N_i]`` of ``x.dtype``. With the Triton kernels, up to ``GEMV_MAX_ROWS`` rows
    run a kernel that quantizes them to the integer GEMV's operands, then that GEMV; more rows the quantize kernel
    writing exact values (``triton_quantize.quantize_values``) and the kernel that takes them, two. Blackwell
    (``torch._scaled_mm``) and inputs the kernels cannot take quantize to packed NVFP4 first and then run
    :func:`gemm`."""
    nvfp4.check_quantizable(x)
    lead = x.shape[:-1]
    reason = _weights_problem(x.device, (x, act_pts), w_packed, w_scales, w_pts, bias)
    mismatch = next((p for p in w_packed if x.shape[-1] != p.shape[-1] * 2), None)
    if reason is None and mismatch is not None:
        reason = f"activation K={x.shape[-1]} does not match the weight's K={mismatch.shape[-1] * 2}"
    if reason is None and act_pts is not None and act_pts.numel() != 1:
        reason = f"the activation's global scale must have one element, got shape {tuple(act_pts.shape)}"
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] == 0:
        return [x.new_empty((*lead, p.shape[0])) for p in w_packed]
    if reason is not None or _family(_device_index(x.device))[0] == "blackwell":
        pts = nvfp4.global_scale_of(x) if act_pts is None else act_pts.float().reshape(())
        a_packed, a_scales = quantize_blocks(x, pts)
        return gemm(a_packed, a_scales, pts, w_packed, w_scales, w_pts, bias, x.dtype)
    from . import triton_gemm

    weights = [(p, s.view(torch.uint8), t) for p, s, t in zip(w_packed, w_scales, w_pts)]
    return [out.reshape(*lead, -1) for out in triton_gemm.quantize_gemm_group(x2, act_pts, weights, bias)]


def gemm_a16(x, w_packed, w_scales, w_pts, bias):
    """bf16/fp16 ``[..., K]`` times each weight of the lists (as for :func:`gemm`) -> a list of ``[..., N_i]`` of
    ``x.dtype``."""
    lead = x.shape[:-1]
    reason = _weights_problem(x.device, (x,), w_packed, w_scales, w_pts, bias)
    if reason is None and x.dtype not in _HALF_DTYPES:
        reason = f"activation dtype {x.dtype} is not bf16 or fp16"
    mismatch = next((p for p in w_packed if x.shape[-1] != p.shape[-1] * 2), None)
    if reason is None and mismatch is not None:
        reason = f"activation K={x.shape[-1]} does not match the weight's K={mismatch.shape[-1] * 2}"
    if reason is not None:
        _fallback_notice(f"{reason}; running the slow exact reference")
        return [nvfp4.reference_gemm(x, *w, x.dtype) for w in zip(w_packed, w_scales, w_pts, bias)]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] == 0:
        return [x.new_empty((*lead, p.shape[0])) for p in w_packed]
    from . import triton_gemm

    weights = [(p, s.view(torch.uint8), t) for p, s, t in zip(w_packed, w_scales, w_pts)]
    return [out.reshape(*lead, -1) for out in triton_gemm.gemm_a16_group(x2, weights, bias)]


@functools.cache
def _triton_quantize_problem() -> str | None:
    try:
        from . import triton_quantize  # noqa: F401
    except ImportError as e:
        return f"Triton is not importable ({e})"
    return None


def quantize_blocks(x, pts):
    """NVFP4 block quantize of a CUDA activation for a given per-tensor scale -> (packed, scales) as uint8."""
    reason = _triton_quantize_problem() or (None if pts.device == x.device else "pts is on another device")
    if reason is not None:
        _fallback_notice(f"{reason}; quantizing with the slow exact reference")
        packed, scales = nvfp4.quantize_blocks(x, pts)
        return packed, scales.view(torch.uint8)
    from . import triton_quantize

    return triton_quantize.quantize_blocks(x, pts)

