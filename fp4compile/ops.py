"""The ``torch.ops.fp4`` custom ops the graph passes emit, with fake (meta) implementations and CPU references.

    fp4::quantize_act(x [..., K], global_scale?) -> (packed u8 [..., K/2], scales u8 [..., K/16], pts f32 [])
    fp4::quantize_blocks(x [..., K], pts) -> (packed, scales)        (quantize_act's second half)
    fp4::gemm(x [..., K], act_pts?, w_packed[], w_scales[], w_pts[], bias?[], alphas?) -> [[..., N_i]]
                                        (NVFP4 x NVFP4: x quantized with the static scale act_pts, or dynamically)
    fp4::gemm_a16(x [..., K], w_packed[], w_scales[], w_pts[], bias?[], alphas?) -> [[..., N_i]]
                                                                          (high precision x NVFP4)
    fp4::gemm_kernel(a_packed, a_scales, a_pts, w_packed[], w_scales[], w_pts[], bias?[], out_dtype)
    fp4::quantize_gemm_kernel(x, act_pts?, w_packed[], ...), fp4::gemm_a16_kernel: products never decomposed
    fp4::linear(x, w_packed, w_scales, w_pts, bias?, act_pts?, scheme) -> [..., N]        (a calibrated layer)

A GEMM op takes a list of weights that all multiply its activation (one linear layer, or a group such as
q/k/v) and returns one output per weight, of the activation's dtype (``gemm_kernel``: ``out_dtype``); on CUDA a
group runs as one kernel launch. Weights are ``[N, K]`` (K contiguous). Packed values and block scales cross every
Inductor-visible edge as uint8 (the bit patterns of e2m1 pairs and e4m3 scales): Inductor's C++ backend cannot read
or write float4/float8 buffers, and a uint8 buffer can be viewed as float4 or float8 by a consumer without a kernel.

For Inductor, ``quantize_act`` decomposes into the amax and the block quantize: on CPU both plain torch, fused with
the op that produces the activation; on CUDA the amax and the ``quantize_blocks`` Triton kernel, generated once per
activation shape.
``gemm`` and ``gemm_a16`` decompose by ``_gemm_plan``. On CPU: the kernel op (the reference), ``gemm``'s activation
quantized first (``quantize_act``'s decomposition). On CUDA up to 128 rows: the kernel ops, ``gemm``'s being
``quantize_gemm_kernel``, which takes the high-precision activation (up to ``kernels.GEMV_MAX_ROWS`` rows: a Triton
kernel quantizes them to the integers the integer GEMV multiplies; more rows go through the Triton kernel
``quantize_values`` inside the op). On CUDA with more rows: an exact dequantize (for ``gemm`` the activation by
``format.quantize_values``, Inductor's code) and cuBLAS per weight: given ``alphas``, aten ``addmm`` that applies the
global scales and the bias itself; otherwise aten ``mm`` with an fp32 output and a fused epilogue. Inductor generates
each dequantize once per shape, not once per layer. On CUDA the ops' eager implementations dispatch to ``kernels``.
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


class _Region(torch.nn.Module):
    """A function of tensors, as the module ``invoke_subgraph`` traces (its result always a tuple)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *operands):
        out = self.fn(*operands)
        return out if isinstance(out, tuple) else (out,)


def _generated_once(fn, *operands: torch.Tensor):
    """``fn(*operands)`` as a call of torch's ``invoke_subgraph``: Inductor lowers ``fn`` and generates its code once
    for all the calls whose operands have the same dtypes, shapes and strides (the identifier says which), where it
    would otherwise do it again for every layer. Used on CUDA for the activation quantize and the large-M plan's
    dequantize + GEMM, whose per-layer code generation made the compile of 32 Llama-3-8B layers take 1.9-2.9x as
    long as bf16's (tools/KERNEL_NOTES.md, version 13). What follows such a call (a GEMM's epilogue) still fuses
    with the ops after it."""
    meta = "_".join(f"{t.dtype}_{tuple(t.shape)}_{t.stride()}" for t in operands)
    identifier = "fp4_" + fn.__name__.strip("_") + "_" + "".join(c if c.isalnum() else "_" for c in meta)
    out = torch.ops.higher_order.invoke_subgraph(_Region(fn), identifier, *operands)
    return out[0] if len(out) == 1 else tuple(out)


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


def _activation_scale(x: torch.Tensor, global_scale: torch.Tensor | None) -> torch.Tensor:
    """The per-tensor scale ``x`` is quantized with: its own (dynamic), or a copy of the static ``global_scale`` as an
    fp32 scalar (a copy, so that no output of a generated region aliases its input)."""
    return nvfp4.global_scale_of(x) if global_scale is None else global_scale.float().reshape(()).clone()


def _quantize_act(x: torch.Tensor, global_scale: torch.Tensor | None = None):
    pts = _activation_scale(x, global_scale)
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


@register_decomposition(torch.ops.fp4.quantize_act.default)
def _quantize_act_decomposition(x: torch.Tensor, global_scale: torch.Tensor | None = None):
    if _block_quantizer(x.device) is _plain_quantize_blocks:  # plain torch: fused with the activation's producer
        return _quantize_act(x, global_scale)
    # The block quantize is an extern call, so the activation is materialized anyway: amax, scale and the call are
    # generated once per activation shape.
    operands = (x,) if global_scale is None else (x, global_scale)
    return _generated_once(_quantize_act, *operands)


def _out_shape(lead: torch.Size, w_packed: torch.Tensor) -> tuple[int, ...]:
    return (*lead, w_packed.shape[0])


def _reference_gemm_nvfp4(a_packed, a_scales, a_pts, w_packed, w_scales, w_pts, bias, out_dtype):
    a = nvfp4.dequantize_parts(a_packed, a_scales, a_pts)
    return [nvfp4.reference_gemm(a, *w, out_dtype) for w in zip(w_packed, w_scales, w_pts, bias)]


def _reference_quantize_gemm(x, act_pts, w_packed, w_scales, w_pts, bias):
    return _reference_gemm_nvfp4(*_quantize_act(x, act_pts), w_packed, w_scales, w_pts, bias, x.dtype)


def _reference_gemm_a16(x, w_packed, w_scales, w_pts, bias):
    return [nvfp4.reference_gemm(x, *w, x.dtype) for w in zip(w_packed, w_scales, w_pts, bias)]


def _gemm_kernel_fake(a_packed, a_scales, a_pts, w_packed, w_scales, w_pts, bias, out_dtype):
    return [a_packed.new_empty(_out_shape(a_packed.shape[:-1], p), dtype=out_dtype) for p in w_packed]


def _gemm_fake(x, act_pts, w_packed, w_scales, w_pts, bias):
    return [x.new_empty(_out_shape(x.shape[:-1], p)) for p in w_packed]


def _gemm_a16_fake(x, w_packed, w_scales, w_pts, bias):
    return [x.new_empty(_out_shape(x.shape[:-1], p)) for p in w_packed]


# The GEMMs the passes emit (fp4::gemm, fp4::gemm_a16) Inductor decomposes (see _gemm_plan); the kernel ops
# (fp4::gemm_kernel on a packed activation, fp4::quantize_gemm_kernel and fp4::gemm_a16_kernel) it never does.
# The emitted ops also take ``alphas``: each weight's alpha (the product of the global scales) as a host float,
# where the pass knows it (always for gemm_a16; for gemm with a static activation scale). The large-M plan on CUDA
# then lets cuBLAS apply it (``_mm_alpha``); without it that plan scales in its own epilogue.
_WEIGHTS = "Tensor[] w_packed, Tensor[] w_scales, Tensor[] w_pts, Tensor?[] bias"
_GEMM_ARGS = f"(Tensor x, Tensor? act_pts, {_WEIGHTS}"
_GEMM_A16_ARGS = f"(Tensor x, {_WEIGHTS}"
_ALPHAS = ", float[]? alphas=None) -> Tensor[]"


def _ignoring_alphas(fn):
    """``fn`` for an op that also takes ``alphas`` last: only the large-M plan reads them."""
    arity = fn.__code__.co_argcount
    return lambda *args, **kwargs: fn(*args[:arity])


gemm = torch.library.custom_op("fp4::gemm", _ignoring_alphas(_reference_quantize_gemm), mutates_args=(),
                               schema=_GEMM_ARGS + _ALPHAS)
gemm_kernel = torch.library.custom_op(
    "fp4::gemm_kernel", _reference_gemm_nvfp4, mutates_args=(),
    schema=f"(Tensor a_packed, Tensor a_scales, Tensor a_pts, {_WEIGHTS}, ScalarType out_dtype) -> Tensor[]")
quantize_gemm_kernel = torch.library.custom_op("fp4::quantize_gemm_kernel", _reference_quantize_gemm,
                                               mutates_args=(), schema=_GEMM_ARGS + ") -> Tensor[]")
gemm_a16 = torch.library.custom_op("fp4::gemm_a16", _ignoring_alphas(_reference_gemm_a16), mutates_args=(),
                                   schema=_GEMM_A16_ARGS + _ALPHAS)
gemm_a16_kernel = torch.library.custom_op("fp4::gemm_a16_kernel", _reference_gemm_a16, mutates_args=(),
                                          schema=_GEMM_A16_ARGS + ") -> Tensor[]")
gemm.register_fake(_ignoring_alphas(_gemm_fake))
gemm_kernel.register_fake(_gemm_kernel_fake)
quantize_gemm_kernel.register_fake(_gemm_fake)
gemm_a16.register_fake(_ignoring_alphas(_gemm_a16_fake))
gemm_a16_kernel.register_fake(_gemm_a16_fake)


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a [M, K] @ b [N, K].T`` accumulated and returned in fp32. On CUDA aten ``mm`` with ``out_dtype``, which
    Inductor runs as its own cuBLAS call; a custom op here compiled 12-18 s slower at 32 Llama-3-8B layers
    (tools/KERNEL_NOTES.md, versions 11 and 12). On CPU, where ``mm`` has no ``out_dtype``, and for fp32 operands:
    an fp32 matmul."""
    if a.device.type == "cuda" and a.dtype != torch.float32:
        return torch.mm(a, b.t(), out_dtype=torch.float32)
    return a.float() @ b.float().t()


def _rows(x: torch.Tensor):
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def _epilogue(acc: torch.Tensor, alpha: torch.Tensor, bias, lead, out_dtype: torch.dtype) -> torch.Tensor:
    out = acc * alpha
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype).reshape(*lead, acc.shape[-1])


def _dequantize_bf16(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """NVFP4 values as exact bf16 ``e2m1 * S_b`` (the per-tensor scale is applied after the GEMM)."""
    return nvfp4.dequantize_blocks_by_bits(packed, scales, torch.bfloat16)


def _dequantize_fp16(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """NVFP4 values as exact fp16 ``e2m1 * S_b`` (the per-tensor scale is applied after the GEMM)."""
    return nvfp4.dequantize_blocks_by_bits(packed, scales, torch.float16)


_DEQUANTIZE_TO = {torch.bfloat16: _dequantize_bf16, torch.float16: _dequantize_fp16}


def _mm_alpha(a: torch.Tensor, w: torch.Tensor, alpha: float, bias: torch.Tensor | None) -> torch.Tensor:
    """``alpha * (a @ w.T) + bias`` accumulated in fp32 and rounded once to ``a``'s dtype. On CUDA one cuBLAS call,
    aten ``addmm`` with ``alpha`` as its host scalar, which Inductor runs as its own extern call: the fp32
    accumulator never leaves the GEMM, where the ``_mm_f32`` + epilogue form writes it out and reads it back
    (H200, M = 4096, nvfp4a16: 0.86x -> 0.98x of bf16 on 4096^2, tools/KERNEL_NOTES.md, version 20). cuBLAS
    reduces a K split in fp32 only while reduced-precision reductions are off, which ``backend.CompiledGraph``
    ensures. On CPU (the plan forced in tests): fp32 arithmetic in the epilogue's order."""
    if a.device.type == "cuda":
        if bias is None:  # with beta 0, addmm ignores its input, NaN included: an allocation, no kernel
            return torch.addmm(a.new_empty(w.shape[0]), a, w.t(), beta=0, alpha=alpha)
        return torch.addmm(bias, a, w.t(), alpha=alpha)
    out = (a.float() @ w.float().t()) * alpha
    return (out if bias is None else out + bias.float()).to(a.dtype)


def _dequantize_mm(a: torch.Tensor, w_packed: torch.Tensor, w_scales: torch.Tensor) -> torch.Tensor:
    """``a @ (e2m1 * S_b).T`` accumulated in fp32: the weight dequantized exactly to ``a``'s dtype, then
    :func:`_mm_f32`."""
    return _mm_f32(a, nvfp4.dequantize_blocks_by_bits(w_packed, w_scales, a.dtype))


def _gemm_plan(x: torch.Tensor, quantizes: bool = False) -> str:
    """How Inductor runs a GEMM whose activation is ``x``; ``quantizes``: an NVFP4 x NVFP4 GEMM (``fp4::gemm``),
    whose activation is quantized first:

    - "kernel": the kernel op, an extern call: on CPU the exact reference (``fp4::gemm`` quantizing by
      ``quantize_act``'s decomposition first, plain torch that fuses with the activation's producer); on CUDA, up
      to ``kernels.DIRECT_MAX_ROWS`` rows, the kernels that read the packed weight once (GEMVs for a few rows; for
      more, tensor cores with the weight dequantized in registers: on Hopper the fused Gluon kernel, elsewhere the
      Triton one);
    - "quantizing kernel": ``quantizes`` on CUDA, up to ``kernels.DIRECT_MAX_ROWS`` rows: the kernel op that takes
      the high-precision activation (``quantize_gemm_kernel``). Up to ``kernels.GEMV_MAX_ROWS`` rows: a Triton
      kernel quantizes them, their dynamic per-tensor scale included, straight to the integers of the integer GEMV,
      which starts loading its weight while that kernel runs (a programmatic dependent launch on Hopper). More rows:
      the dynamic scale is Inductor's (fused with the activation's producer) and the op runs the Triton
      ``quantize_values`` and the kernel, two launches where a packed activation took three (quantize, dequantize,
      GEMM);
    - "dequantize": CUDA, more rows; the operands dequantized to exact bf16/fp16 (the weight by an Inductor kernel,
      the activation of ``fp4::gemm`` by ``format.quantize_values``), ``_mm_f32`` (cuBLAS, fp32 accumulator), then
      global scales, bias and the cast in an Inductor kernel that fuses with what follows; a GEMM given ``alphas``
      (as the backend's pass emits ``gemm_a16``, and ``gemm`` with a static activation scale) runs ``_mm_alpha``
      instead, one cuBLAS call with alpha and the bias.
      Launched by Inductor's own code, so the CPU cost per layer stays small: the fused kernel is faster on the GPU at
      1024 rows, but each call of the kernel op costs 260-350 us of CPU, which made a 32-layer Llama-3-8B prefill
      CPU-bound (H200: 0.35x of bf16, where this plan gives 0.76-0.81x; tools/KERNEL_NOTES.md, version 15). The
      dequantize (with ``_mm_f32``: dequantize + GEMM) is generated once per operand shape (``_generated_once``), not
      once per layer.
      ``format.dequantize_blocks_by_bits`` both compiles and runs faster there than the reference's arithmetic
      decode (H200, 16 Llama-3-8B layers, nvfp4a16: first call 37.3 -> 30.9 s, 1024-token prefill 17.44 -> 16.08 ms,
      the same logits). A group of weights runs one GEMM per weight here: every way of stacking them for one cuBLAS
      call made Inductor's dequantize slower than the GEMM saved (H200, M = 1024, q/k/v of Llama-3-8B: 158 us
      stacked against 104 us one by one; tools/KERNEL_NOTES.md, version 10).
    """
    from . import kernels

    if x.device.type != "cuda":
        return "kernel"
    if _rows(x) > kernels.DIRECT_MAX_ROWS:
        return "dequantize"
    return "quantizing kernel" if quantizes else "kernel"


def _cublas_scales(alphas, out_dtype: torch.dtype, bias) -> bool:
    """Whether the large-M plan hands the alphas to cuBLAS (``_mm_alpha``): given, a bf16/fp16 output, and biases
    of that dtype or none."""
    return alphas is not None and out_dtype in _DEQUANTIZE_TO and all(b is None or b.dtype == out_dtype for b in bias)


def _mm_alpha_each(a: torch.Tensor, w_packed, w_scales, bias, alphas, lead) -> list[torch.Tensor]:
    """``_mm_alpha`` of the 2-D bf16/fp16 activation ``a`` with each weight, dequantized to ``a``'s dtype (once per
    shape); outputs shaped ``[*lead, N_i]``."""
    dequantize = _DEQUANTIZE_TO[a.dtype]
    return [_mm_alpha(a, _generated_once(dequantize, p, s), alpha, b).reshape(*lead, -1)
            for p, s, b, alpha in zip(w_packed, w_scales, bias, alphas)]


def _quantized_values(x: torch.Tensor, global_scale: torch.Tensor | None = None):
    """``x``'s NVFP4 values ``e2m1 * S_b`` as ``[rows, K]``, exact in x's dtype (bf16 for fp32 x), and its per-tensor
    scale: the activation operand of the large-M plan. Plain torch, which Inductor generates itself (the amax, then
    one kernel for the values): as an extern call of the Triton kernel of the same values, each call cost enough
    CPU to make a compiled nvfp4 prefill CPU-bound (tools/KERNEL_NOTES.md, version 24)."""
    pts = _activation_scale(x, global_scale)
    dtype = x.dtype if x.dtype in _DEQUANTIZE_TO else torch.bfloat16
    return nvfp4.quantize_values(x.flatten(0, -2), pts, dtype), pts


@register_decomposition(torch.ops.fp4.gemm.default)
def _gemm_decomposition(x, act_pts, w_packed, w_scales, w_pts, bias, alphas=None):
    from . import kernels

    plan = _gemm_plan(x, quantizes=True)
    if plan == "quantizing kernel":
        if act_pts is None and _rows(x) > kernels.GEMV_MAX_ROWS:
            act_pts = nvfp4.global_scale_of(x)
        return torch.ops.fp4.quantize_gemm_kernel(x, act_pts, w_packed, w_scales, w_pts, bias)
    if plan == "kernel":
        a_packed, a_scales, a_pts = _quantize_act_decomposition(x, act_pts)
        return torch.ops.fp4.gemm_kernel(a_packed, a_scales, a_pts, w_packed, w_scales, w_pts, bias, x.dtype)
    lead = x.shape[:-1]
    a, a_pts = _generated_once(_quantized_values, *((x,) if act_pts is None else (x, act_pts)))
    if _cublas_scales(alphas, x.dtype, bias):
        return _mm_alpha_each(a, w_packed, w_scales, bias, alphas, lead)
    return [_epilogue(_generated_once(_dequantize_mm, a, p, s), a_pts * pts, b, lead, x.dtype)
            for p, s, pts, b in zip(w_packed, w_scales, w_pts, bias)]


@register_decomposition(torch.ops.fp4.gemm_a16.default)
def _gemm_a16_decomposition(x, w_packed, w_scales, w_pts, bias, alphas=None):
    if _gemm_plan(x) == "kernel":
        return torch.ops.fp4.gemm_a16_kernel(x, w_packed, w_scales, w_pts, bias)
    x2, outs = x.flatten(0, -2), []
    if _cublas_scales(alphas, x.dtype, bias):
        return _mm_alpha_each(x2, w_packed, w_scales, bias, alphas, x.shape[:-1])
    for p, s, pts, b in zip(w_packed, w_scales, w_pts, bias):
        acc = _generated_once(_dequantize_mm, x2, p, s)
        outs.append(_epilogue(acc, pts, b, x.shape[:-1], x.dtype))
    return outs


def nvfp4_linear(x, w_packed, w_scales, w_pts, bias, act_pts, scheme: Scheme) -> torch.Tensor:
    """One quantized linear layer as the backend runs it: activation quantize (``nvfp4`` only), then the GEMM."""
    if scheme == "nvfp4a16":
        return torch.ops.fp4.gemm_a16(x, [w_packed], [w_scales], [w_pts], [bias])[0]
    return torch.ops.fp4.gemm(x, act_pts, [w_packed], [w_scales], [w_pts], [bias])[0]


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
    gemm.register_kernel("cuda")(_ignoring_alphas(kernels.quantize_gemm))
    gemm_kernel.register_kernel("cuda")(kernels.gemm)
    quantize_gemm_kernel.register_kernel("cuda")(kernels.quantize_gemm)
    gemm_a16.register_kernel("cuda")(_ignoring_alphas(kernels.gemm_a16))
    gemm_a16_kernel.register_kernel("cuda")(kernels.gemm_a16)


_register_cuda_kernels()
