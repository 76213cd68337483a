"""The ``fp4`` torch.compile backend: rewrite linear layers into NVFP4 ops, then compile with Inductor.

    torch.compile(model, backend="fp4")                                       # scheme "nvfp4" (W4A4)
    torch.compile(model, backend="fp4", options={"scheme": "nvfp4a16"})       # weight-only (W4A16)
    torch.compile(model, backend="fp4", options={"scheme": "nvfp4a16", "triton.cudagraphs": True})
    torch.compile(model, backend="fp4", mode="reduce-overhead")

Every compile decision lives here. ``options`` keys of fp4compile: ``scheme``, ``skip`` (glob patterns of layer
names left in high precision, default ``("lm_head",)``), ``group`` (default True: linears that read the same
activation, such as q/k/v, run as one GEMM launch) and ``report`` (a list that receives one ``RewriteReport`` per
compiled graph). Every other key is an Inductor config option and is passed on.
"""

import contextlib
import logging
import unittest.mock
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch._inductor.compile_fx import compile_fx
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from .ops import SCHEMES

try:
    from fp4compile.passes import WEIGHT_CACHE, EmbeddedSet, RewriteReport, refresh_host_alphas, rewrite_linears
except ImportError:  # a source checkout that was not pip-installed: passes/ sits beside fp4compile/
    from passes import WEIGHT_CACHE, EmbeddedSet, RewriteReport, refresh_host_alphas, rewrite_linears

log = logging.getLogger("fp4compile")

FP4_OPTIONS = ("scheme", "skip", "group", "report")


class _DecompositionVersion(CustomGraphPass):
    """A pass that changes nothing and adds the code of fp4compile's op decompositions to Inductor's FX graph cache
    key. The key covers the graph and Inductor's config, not how our ops decompose (``ops._gemm_plan``, the
    dequantize in ``format``, ``kernels.DIRECT_MAX_ROWS``): without this, a newer fp4compile was served graphs
    compiled by the older one (seen in tests that change the plan)."""

    _FILES = tuple(str(Path(__file__).parent / name) for name in ("ops.py", "format.py", "kernels/__init__.py"))

    def __call__(self, graph: torch.fx.Graph) -> None:
        return None

    def uuid(self) -> bytes:
        return get_hash_for_files(self._FILES)


# Inductor keeps fused bf16/fp16 intermediates in fp32 unless told otherwise; the activation quantize must see the
# values eager mode would (a rounding skipped before an NVFP4 quantize moves elements across e2m1 boundaries).
# A user's own post_grad_custom_post_pass replaces the cache-key pass.
INDUCTOR_DEFAULTS = {"emulate_precision_casts": True, "post_grad_custom_post_pass": _DecompositionVersion()}
# Before torch 2.13 (pytorch#185337) Inductor's C++ backend ignores emulate_precision_casts; see _cpp_precision_casts.
_CPP_DROPS_PRECISION_CASTS = torch.torch_version.TorchVersion(torch.__version__) < (2, 13)


@dataclass
class BackendOptions:
    scheme: str = "nvfp4"
    skip: tuple[str, ...] = ("lm_head",)
    group: bool = True
    report: list | None = None
    inductor: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, options: dict | None, mode: str | None) -> "BackendOptions":
        options = dict(options or {})
        inductor = {**INDUCTOR_DEFAULTS, **{k: v for k, v in options.items() if k not in FP4_OPTIONS}}
        if mode is not None:
            inductor = {**torch._inductor.list_mode_options(mode), **inductor}
        scheme = options.get("scheme", cls.scheme)
        if scheme not in SCHEMES:
            raise ValueError(f"fp4 backend: unknown scheme {scheme!r}; expected one of {SCHEMES}")
        skip = options.get("skip", cls.skip)
        skip = (skip,) if isinstance(skip, str) else tuple(skip)
        group = options.get("group", cls.group)
        if not isinstance(group, bool):
            raise ValueError(f"fp4 backend: option 'group' must be True or False, got {group!r}")
        return cls(scheme, skip, group, options.get("report"), inductor)


def _check_inference(gm: torch.fx.GraphModule, example_inputs) -> None:
    if not torch.is_grad_enabled():
        return
    needs_grad = [
        n.meta["grapharg"].source.name if "grapharg" in n.meta else n.name
        for n, t in zip((n for n in gm.graph.nodes if n.op == "placeholder"), example_inputs)
        if isinstance(t, torch.Tensor) and t.requires_grad
    ]
    if needs_grad:
        raise RuntimeError(
            "fp4 backend: NVFP4 ops are inference-only, but this graph needs gradients (grad mode is on and "
            f"{needs_grad[0]} requires grad). Run the compiled model under torch.no_grad() or "
            "torch.inference_mode(), or call model.requires_grad_(False)."
        )


@contextlib.contextmanager
def _cpp_precision_casts():
    """Make Inductor's C++ (CPU) backend keep the bf16/fp16 roundings that ``emulate_precision_casts`` asks for.

    torch 2.11 and 2.12: the C++ backend's ``to_dtype`` puts the inverse of every fp32 -> bf16/fp16 cast into its CSE
    cache, so the cast back to fp32 that the emulation emits returns the unrounded fp32 value. Every rounding eager
    mode does between fused ops (a GEMM epilogue's ``.to(bf16)`` before a ReLU, each op of an RMSNorm) then
    vanishes, and the activation quantize sees other values than eager mode: elements cross e2m1 boundaries.
    torch 2.13 skips that cache under ``emulate_precision_casts``; this does the same on older versions, for the
    duration of one fp4 compile (the flag is read at code generation time, so an explicit
    ``emulate_precision_casts=False`` keeps Inductor's behaviour).
    """
    from torch._inductor.codegen import cpp

    original = getattr(getattr(cpp, "CppKernel", None), "cache_dtype_convert", None)
    if not _CPP_DROPS_PRECISION_CASTS or original is None:
        yield
        return

    def cache_dtype_convert(self, *args, **kwargs):
        if not torch._inductor.config.emulate_precision_casts:
            return original(self, *args, **kwargs)

    with unittest.mock.patch.object(cpp.CppKernel, "cache_dtype_convert", cache_dtype_convert):
        yield


@contextlib.contextmanager
def fp32_gemm_reductions():
    """cuBLAS GEMMs with bf16/fp16 outputs reduce K splits in fp32 (torch allows the output type by default), as the
    large-M plan's ``ops._mm_alpha`` needs for NVFP4's fp32 accumulation."""
    matmul = torch.backends.cuda.matmul
    before = matmul.allow_bf16_reduced_precision_reduction, matmul.allow_fp16_reduced_precision_reduction
    matmul.allow_bf16_reduced_precision_reduction = matmul.allow_fp16_reduced_precision_reduction = False
    try:
        yield
    finally:
        matmul.allow_bf16_reduced_precision_reduction, matmul.allow_fp16_reduced_precision_reduction = before


class CompiledGraph:
    """Inductor's compiled graph, plus a check that the weights it embeds are still the model's weights.

    A parameter replaced (``layer.weight = nn.Parameter(...)``) or changed in place (``weight.mul_(2)``) is
    noticed at the next call and its packed constants are refreshed, so results are never stale; when that changes
    a per-tensor scale that the graph holds as a host float (a GEMM op's ``alphas``), the graph is compiled again.
    Calls run with cuBLAS's reduced-precision reductions off (``fp32_gemm_reductions``).
    """

    def __init__(self, gm: torch.fx.GraphModule, example_inputs, options: BackendOptions):
        self.fake_mode = torch._guards.detect_fake_mode(example_inputs)
        self.report, embedded = rewrite_linears(
            gm, scheme=options.scheme, skip=options.skip, fake_mode=self.fake_mode, group=options.group
        )
        self.embedded = EmbeddedSet(embedded)
        log.info("%s", self.report)
        if options.report is not None:
            options.report.append(self.report)
        self.gm, self.example_inputs, self.inductor = gm, example_inputs, options.inductor
        self.compiled = self._compile()

    def _compile(self):
        allow_real = (
            unittest.mock.patch.object(self.fake_mode, "allow_non_fake_inputs", True)
            if self.fake_mode is not None
            else contextlib.nullcontext()
        )
        with allow_real, _cpp_precision_casts():
            return compile_fx(self.gm, self.example_inputs, config_patches=self.inductor)

    def __call__(self, *args):
        if self.embedded.refresh(args, WEIGHT_CACHE) and refresh_host_alphas(self.gm):
            log.info("fp4: a weight's per-tensor scale changed; compiling the graph again")
            self.compiled = self._compile()
        with fp32_gemm_reductions():
            return self.compiled(*args)


def fp4_backend(gm: torch.fx.GraphModule, example_inputs, *, options: dict | None = None,
                mode: str | None = None, **unused) -> CompiledGraph:
    """The function behind ``backend="fp4"`` (entry point group ``torch_dynamo_backends``)."""
    parsed = BackendOptions.parse(options, mode)
    _check_inference(gm, example_inputs)
    return CompiledGraph(gm, example_inputs, parsed)


def explain(model, *example_inputs, **options) -> RewriteReport:
    """Which layers ``backend="fp4"`` rewrites for these inputs, and why the others are left alone.

    Runs Dynamo and the passes only (no Inductor compile); ``options`` as for the backend (``scheme``, ``skip``).
    """
    parsed = BackendOptions.parse(options, None)
    reports: list[RewriteReport] = []

    def capture(gm, example_inputs_):
        fake_mode = torch._guards.detect_fake_mode(example_inputs_)
        report, _ = rewrite_linears(gm, scheme=parsed.scheme, skip=parsed.skip, fake_mode=fake_mode,
                                    group=parsed.group)
        reports.append(report)
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=capture)(*example_inputs)
    return RewriteReport([d for r in reports for d in r.layers])


if "fp4" not in torch._dynamo.backends.registry._BACKENDS:
    torch._dynamo.register_backend(fp4_backend, name="fp4")
