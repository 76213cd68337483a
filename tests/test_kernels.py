"""The NVFP4 GEMM kernels against the exact reference.

On a CUDA machine the Triton kernels run on the GPU; elsewhere they run on CPU tensors under Triton's
interpreter (TRITON_INTERPRET=1, set by conftest.py before anything imports triton) at small sizes.
Every check draws fresh random inputs, fills the output with NaN first (so every element must be written) and
compares the fp32 result (before the final cast) with an fp64 product of the dequantized operands.
"""

import logging

import pytest
import torch

CUDA = torch.cuda.is_available()
triton = pytest.importorskip("triton", reason="the Triton kernels need the triton package")

from fp4compile import format as nvfp4  # noqa: E402
from fp4compile import kernels  # noqa: E402
from fp4compile.kernels import blackwell  # noqa: E402
from fp4compile.kernels import triton_gemm  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"

gpu_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (the CPU runs the interpreter at small sizes)")
REL_TOL = 1e-5  # fp32 accumulation of exact products, relative to ||ref||


def _fused_skip() -> str | None:
    if not CUDA:
        return "needs a CUDA GPU"
    return kernels.fused_problem(torch.device("cuda"), 2, kernels.FUSED_K_MULTIPLE)


fused_only = pytest.mark.skipif(_fused_skip() is not None, reason=f"the fused Gluon kernel: {_fused_skip()}")


@pytest.fixture(autouse=True)
def _default_configs(monkeypatch):
    """Each bucket's default config (no timing runs); test_every_config covers the other configs."""
    monkeypatch.setattr(triton_gemm, "AUTOTUNE", False)


def random_nvfp4(rows, k, *, raw=False):
    """(packed, scales as uint8, pts) of a random [rows, k] NVFP4 tensor, on DEVICE.

    raw=False quantizes Gaussian data with the reference; raw=True draws every bit pattern: all 16 e2m1 codes
    (-0 too) and every finite e4m3 scale, subnormals included.
    """
    if raw:
        packed = torch.randint(0, 256, (rows, k // 2), dtype=torch.uint8)
        scales = torch.randint(0, 255, (rows, k // 16), dtype=torch.uint8)
        scales[(scales & 0x7F) == 0x7F] = 0x3F  # NaN patterns -> 1.875
        pts = torch.tensor(2.0 ** torch.randint(-4, 4, ()).item() * 1.37)
        return packed.to(DEVICE), scales.to(DEVICE), pts.to(DEVICE)
    q = nvfp4.quantize(torch.randn(rows, k) * torch.rand(rows, 1) * 10)
    return q.packed.to(DEVICE), q.scales.view(torch.uint8).to(DEVICE), q.global_scale.to(DEVICE)


def dequant64(packed, scales, pts):
    return nvfp4.dequantize_parts(packed.cpu(), scales.cpu(), None).double() * pts.cpu().double()


def check(out32, ref, out, dtype):
    """fp32 result within REL_TOL of the fp64 reference; the cast result within one rounding of it."""
    assert not out32.isnan().any() and not out.isnan().any(), "an output element was not written"
    ref = ref.double()
    err = ((out32.cpu().double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()
    assert err <= REL_TOL, f"fp32 result off by {err:.2e} relative"
    eps = torch.finfo(dtype).eps
    bound = eps * ref.abs() + REL_TOL * ref.abs().max()
    assert ((out.cpu().double() - ref).abs() <= bound).all(), "the cast result is off by more than one rounding"


def run_case(op, m, n, k, dtype, with_bias, *, raw=False, x=None, cast=True):
    """One random problem through the kernels; ``cast=False`` checks only the fp32 output (fewer compiles)."""
    w = random_nvfp4(n, k, raw=raw)
    bias = (torch.randn(n) * 3).to(dtype).to(DEVICE) if with_bias else None
    bias64 = bias.cpu().double() if with_bias else 0.0
    out_dtypes = (torch.float32, dtype) if cast else (torch.float32,)
    poisoned = [torch.full((m, n), float("nan"), device=DEVICE, dtype=t) for t in out_dtypes]
    if op == "a16":
        x = (torch.randn(m, k) * 4).to(dtype).to(DEVICE) if x is None else x
        ref = x.cpu().double() @ dequant64(*w).t() + bias64
        outs = [triton_gemm.gemm_a16(x, *w, bias, out_dtype=p.dtype, out=p) for p in poisoned]
    else:
        a = random_nvfp4(m, k, raw=raw)
        ref = dequant64(*a) @ dequant64(*w).t() + bias64
        outs = [triton_gemm.gemm(*a, *w, bias, p.dtype, out=p) for p in poisoned]
    check(outs[0], ref, outs[-1], dtype if cast else torch.float32)


SIZES_M = (1, 3, 16, 17, 128) + ((1000,) if CUDA else ())
# Each distinct dtype / bias / divisibility combination is a separate GPU compile: there, fewer combinations.
DTYPE_BIAS = ((torch.bfloat16, True), (torch.float16, False))
if not CUDA:
    DTYPE_BIAS += ((torch.bfloat16, False), (torch.float16, True))


@pytest.mark.parametrize(("dtype", "with_bias"), DTYPE_BIAS, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("n", (16, 100))
@pytest.mark.parametrize("k", (16, 48))
@pytest.mark.parametrize("m", SIZES_M)
@pytest.mark.parametrize("op", ("a16", "nvfp4"))
def test_small_k(op, m, k, n, dtype, with_bias):
    run_case(op, m, n, k, dtype, with_bias, cast=not CUDA)


@pytest.mark.parametrize("m", SIZES_M if CUDA else (1, 17))
@pytest.mark.parametrize("op", ("a16", "nvfp4"))
def test_k4096(op, m):
    run_case(op, m, 100 if CUDA else 16, 4096, torch.bfloat16, True)


@pytest.mark.parametrize("m", (1, 5, 40, 300))
@pytest.mark.parametrize("op", ("a16", "nvfp4"))
def test_every_bit_pattern(op, m):
    """All e2m1 codes and all finite e4m3 scales (subnormal ones too, which quantize never makes)."""
    run_case(op, m, 48, 96, torch.bfloat16, False, raw=True)


GROUP_SHAPES = {"aligned": (64, 128, 100), "pair": (64, 37), "unaligned": (48, 64)}


@pytest.mark.parametrize("shapes", GROUP_SHAPES.values(), ids=GROUP_SHAPES.keys())
@pytest.mark.parametrize("with_bias", (True, False), ids=("bias", "no-bias"))
@pytest.mark.parametrize("m", (1, 3, 17, 130))
@pytest.mark.parametrize("op", ("a16", "nvfp4"))
def test_group_launch(op, m, with_bias, shapes):
    """Several weights over one activation (q/k/v): one launch when each weight but the last has a multiple of
    GROUP_ALIGN outputs, one launch per weight otherwise; every output against its own reference."""
    k = 48
    weights = [random_nvfp4(n, k) for n in shapes]
    biases = [(torch.randn(n) * 3).bfloat16().to(DEVICE) for n in shapes] if with_bias else None
    outs = [torch.full((m, n), float("nan"), device=DEVICE) for n in shapes]
    if op == "a16":
        x = (torch.randn(m, k) * 4).bfloat16().to(DEVICE)
        a64 = x.cpu().double()
        triton_gemm.gemm_a16_group(x, weights, biases, torch.float32, outs)
    else:
        a = random_nvfp4(m, k)
        a64 = dequant64(*a)
        triton_gemm.gemm_group(*a, weights, biases, torch.float32, outs)
    for i, (w, out) in enumerate(zip(weights, outs)):
        ref = a64 @ dequant64(*w).t() + (biases[i].cpu().double() if with_bias else 0.0)
        check(out, ref, out, torch.float32)


def test_group_with_and_without_bias_runs_weight_by_weight():
    """A group where only some weights have a bias (the pass never builds one, the ops accept it) gives each
    weight's own result."""
    weights = [random_nvfp4(64, 32), random_nvfp4(16, 32)]
    bias = torch.randn(64).bfloat16().to(DEVICE)
    x = torch.randn(3, 32).bfloat16().to(DEVICE)
    assert "a bias or none" in triton_gemm.group_problem(weights, [bias, None])
    outs = triton_gemm.gemm_a16_group(x, weights, [bias, None], torch.float32)
    for w, b, out in zip(weights, (bias, None), outs):
        ref = x.cpu().double() @ dequant64(*w).t() + (0.0 if b is None else b.cpu().double())
        check(out, ref, out, torch.float32)


@pytest.mark.parametrize("m", (1, 20))
def test_awkward_activations(m):
    """Zeros, tiny and huge activations, exact ties of the bf16 grid, and blocks near 2**63 and 2**-66."""
    x = torch.randn(m, 96) * 4
    x[0, :16] = 0.0
    x[:, 16:32] = 1e-30
    x[:, 32:40] = 1e20
    x[:, 40:48] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0])
    x[:, 64:80] *= 2.0**63
    x[:, 80:96] *= 2.0**-66
    run_case("a16", m, 32, 96, torch.bfloat16, True, x=x.bfloat16().to(DEVICE))


@pytest.mark.parametrize("dtype", (pytest.param(torch.bfloat16, marks=gpu_only), torch.float16),
                         ids=("bfloat16", "float16"))
def test_gemv_subnormal_activations(dtype):
    """A row of subnormal activations (and the smallest normals): the GEMV's products are fp32 subnormals, exact
    only if nothing flushes them to zero; the whole output is that small, so the check would see a flush. bf16 runs
    on the GPU only: Triton's CPU interpreter itself widens bf16 subnormals to zero."""
    tiny = torch.finfo(dtype).tiny
    x = torch.randn(1, 64) * tiny * torch.tensor([0.01, 0.1, 1.0, 3.0]).repeat_interleave(16)
    run_case("a16", 1, 32, 64, dtype, False, x=x.to(dtype).to(DEVICE), cast=False)


def quantizing_gemm(x, weights, biases, act_pts=None):
    """``x [M, K]`` through ``quantize_gemm_group`` (up to ``GEMV_MAX_ROWS`` rows: the integer GEMV after its
    operand kernel quantizes them; more: the values kernel, then the tensor-core kernel), checked for NaN against
    the reference and, where the reference is finite, bit for bit against the packed path (the Triton activation
    quantize, then the GEMM of the packed activation) and against fp64 products of the reference's dequantized
    operands. Returns the outputs."""
    pts = nvfp4.global_scale_of(x.cpu()) if act_pts is None else act_pts
    outs = triton_gemm.quantize_gemm_group(x, None if act_pts is None else act_pts.to(DEVICE), weights, biases)
    packed, scales = kernels.triton_quantize.quantize_blocks(x, pts.to(DEVICE))
    for i, (w, out) in enumerate(zip(weights, outs)):
        bias = None if biases is None else biases[i]
        a64 = nvfp4.fake_quantize(x.cpu(), pts).double()
        ref = a64 @ dequant64(*w).t() + (0.0 if bias is None else bias.cpu().double())
        assert out.dtype == x.dtype and out.shape == ref.shape
        assert torch.equal(out.cpu().isnan(), ref.isnan()), "NaN where the reference has none, or none where it has"
        if not ref.isnan().any():
            unfused = triton_gemm.gemm(packed, scales, pts.to(DEVICE), *w, bias, x.dtype)
            assert torch.equal(out, unfused), "differs from quantize + GEMM"
            out32 = triton_gemm.quantize_gemm_group(x, None if act_pts is None else act_pts.to(DEVICE), [w],
                                                    None if bias is None else [bias],
                                                    [torch.full(out.shape, float("nan"), device=DEVICE)])[0]
            check(out32, ref, out, x.dtype)
    return outs


@pytest.mark.parametrize("m", (1, 17))
@pytest.mark.parametrize("static", (False, True), ids=("dynamic", "static"))
@pytest.mark.parametrize(("k", "n", "dtype", "with_bias"), [
    (16, 16, torch.bfloat16, True), (48, 100, torch.float16, False), (4096 if CUDA else 272, 100, torch.float32, True)],
    ids=str)
def test_gemm_quantizes_its_activation(k, n, dtype, with_bias, static, m):
    """NVFP4 x NVFP4 from the high-precision activation: the GEMV's own quantize at few rows, the values kernel's
    at more (dynamic: the activation's amax; static: a given scale), equals the activation quantize kernel's, so
    the output equals quantize + GEMM."""
    x = (torch.randn(m, k) * torch.rand(m, k) * 10).to(dtype).to(DEVICE)
    bias = [(torch.randn(n) * 3).to(dtype).to(DEVICE)] if with_bias else None
    quantizing_gemm(x, [random_nvfp4(n, k)], bias, torch.tensor(0.0042) if static else None)


@pytest.mark.parametrize("m", (1, 17))
def test_gemm_quantize_awkward_activations(m):
    """Zeros, tiny, huge, -0 and exact e2m1 ties (with a static scale that maps a block max 6 to 6), a NaN
    (every output of its row NaN, as the reference) and an all-zero activation (per-tensor scale 0, block scales
    0/0: NaN, as the reference gives)."""
    w = [random_nvfp4(32, 96)]
    x = torch.randn(m, 96) * 4
    x[:, :16] = 0.0
    x[:, 16:32] = 1e-30
    x[:, 32:40] = 1e30
    x[:, 40] = -0.0
    quantizing_gemm(x.to(DEVICE), w, None)
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0])
    x = torch.cat([ties, -ties] * 6).repeat(m, 1)
    quantizing_gemm(x.to(DEVICE), w, None, torch.tensor(1 / 448))
    x[0, 50] = float("nan")
    assert quantizing_gemm(x.to(DEVICE), w, None, torch.tensor(1 / 448))[0][0].isnan().all()
    assert quantizing_gemm(x.to(DEVICE), w, None)[0].isnan().all()  # the dynamic scale is NaN: every row
    assert quantizing_gemm(torch.zeros(m, 96, device=DEVICE), w, None)[0].isnan().all()


@pytest.mark.parametrize("static", (False, True), ids=("dynamic", "static"))
def test_gemv_quantize_in_several_programs_and_amax_steps(monkeypatch, static):
    """The integer GEMV's operand kernel with the activation longer than one program's share and than one step of
    its amax pass (as K = 28,672 is on a GPU, with 1,024 elements a program and 16,384 an amax step), shrunk so that
    the interpreter runs it: 3 rows of K = 400 over programs of 64 elements (one straddles two rows), the amax over
    steps of 128, the last ones partial."""
    monkeypatch.setattr(triton_gemm, "_OPERAND_BLOCK_K", 64)
    monkeypatch.setattr(triton_gemm, "_OPERAND_ROW_BLOCK", 128)
    x = (torch.randn(3, 400) * torch.rand(3, 400) * 10).bfloat16()
    x[-1, 390] = 40.0  # the activation's amax in its last, partial step
    quantizing_gemm(x.to(DEVICE), [random_nvfp4(48, 400)], None, torch.tensor(0.003) if static else None)


@pytest.mark.parametrize("m", (1, 5))
@pytest.mark.parametrize("static", (False, True), ids=("dynamic", "static"))
def test_gemm_quantizes_for_a_group(static, m):
    """q/k/v as one launch of the quantizing GEMM (and weight by weight when they cannot form a group)."""
    x = (torch.randn(m, 48) * 4).bfloat16().to(DEVICE)
    for shapes in GROUP_SHAPES.values():
        weights = [random_nvfp4(n, 48) for n in shapes]
        biases = [(torch.randn(n) * 3).bfloat16().to(DEVICE) for n in shapes]
        quantizing_gemm(x, weights, biases, torch.tensor(0.01) if static else None)


def _run_ptx(ptx, regs):
    """Inline PTX executed instruction by instruction with PTX's semantics of its four opcodes (``prmt``: per byte,
    selector nibble j picks byte j & 7 of {b, a}, or with bit 3 set that byte's sign replicated); ``regs`` maps
    the operands ``$i`` to their values and receives the results."""
    def value(name):
        return regs[name] if name in regs else int(name, 0)

    def signed_bytes(v):
        return [((v >> (8 * i)) & 255) - (256 if (v >> (8 * i)) & 128 else 0) for i in range(4)]

    for line in ptx.value.strip("{}").split(";"):
        parts = line.replace(",", " ").split()
        if not parts or parts[0] == ".reg":
            continue
        op, dst, *src = parts
        a = [value(v) for v in src]
        if op == "shr.b32":
            regs[dst] = a[0] >> a[1]
        elif op == "xor.b32":
            regs[dst] = a[0] ^ a[1]
        elif op == "prmt.b32":
            pool = [(a[0] >> (8 * i)) & 255 for i in range(4)] + [(a[1] >> (8 * i)) & 255 for i in range(4)]
            out = 0
            for i in range(4):
                sel = (a[2] >> (4 * i)) & 15
                byte = pool[sel & 7]
                out |= ((255 if byte & 128 else 0) if sel & 8 else byte) << (8 * i)
            regs[dst] = out
        elif op == "dp4a.s32.s32":
            regs[dst] = a[2] + sum(x * y for x, y in zip(signed_bytes(a[0]), signed_bytes(a[1])))
        else:
            raise AssertionError(f"unexpected instruction {op}")
    return regs


def test_word_dot_ptx_is_the_integer_dot_product():
    """The integer GEMV's inline PTX (which only a GPU runs), a word's lookup then its dot product with one row,
    computes acc + sum(2 * w_j * 2 * a_j) over the word's 8 nibbles: every nibble value, with random activation
    integers of -12..12."""
    doubled = (2 * nvfp4.e2m1_to_float(torch.arange(16, dtype=torch.uint8))).int().tolist()  # codes 0..15
    gen = torch.Generator().manual_seed(0)
    words = torch.randint(0, 2**32, (400,), generator=gen, dtype=torch.int64).tolist()
    words += [sum(c << (4 * j) for j in range(8)) for c in range(16)]
    for word in words:
        a = torch.randint(-12, 13, (8,), generator=gen).tolist()
        acc = int(torch.randint(-5000, 5000, (), generator=gen))
        pack = [sum((v & 255) << (8 * i) for i, v in enumerate(vals)) for vals in (a[:4], a[4:])]
        negated = [sum((-v & 255) << (8 * i) for i, v in enumerate(vals)) for vals in (a[:4], a[4:])]
        expected = acc + sum(doubled[(word >> (4 * j)) & 15] * a[j] for j in range(8))
        lookups = _run_ptx(triton_gemm._WORD_LOOKUP_PTX, {"$4": word, "$5": 0x03020100})
        regs = {f"${i + 1}": lookups[f"${i}"] for i in range(4)}
        regs.update({f"${i + 5}": v for i, v in enumerate(pack + negated)})
        regs["$9"] = acc
        assert _run_ptx(triton_gemm._WORD_DOT_PTX, regs)["$0"] == expected, hex(word)


@gpu_only
@pytest.mark.parametrize("op", ("a16", "nvfp4"))
@pytest.mark.parametrize("kernel", ("gemv", "mma"))
def test_every_config(kernel, op):
    """Each tuned configuration computes the same function (also warms the compile cache for the bench)."""
    n, k = 256, 1056
    for m in ((1, kernels.GEMV_MAX_ROWS) if kernel == "gemv" else (16, 40)):
        gemv_configs = triton_gemm._GEMV_CONFIGS if op == "a16" else triton_gemm._GEMV_W4A4_CONFIGS
        configs, launch = ((gemv_configs, triton_gemm.launch_gemv) if kernel == "gemv"
                           else (triton_gemm._mma_configs(m), triton_gemm.launch_mma))
        w = random_nvfp4(n, k)
        if op == "a16":
            x = torch.randn(m, k, device=DEVICE).bfloat16()
            a, ref = (x, None, None), x.cpu().double() @ dequant64(*w).t()
        else:
            a = random_nvfp4(m, k)
            ref = dequant64(*a) @ dequant64(*w).t()
        for config in configs:
            out = torch.full((m, n), float("nan"), device=DEVICE, dtype=torch.bfloat16)
            launch(*a, [w], None, [out], config=config)
            err = ((out.cpu().double() - ref).norm() / ref.norm()).item()
            assert not out.isnan().any() and err < 2**-7, f"config {config}, M={m}: relative error {err:.2e}"


@gpu_only
@pytest.mark.parametrize("static", (False, True), ids=("dynamic", "static"))
def test_every_quantizing_gemv_config(static):
    """Each configuration of the integer GEMV, from a high-precision activation it quantizes first, computes the
    same function."""
    n, k = 256, 1056
    w, x = random_nvfp4(n, k), torch.randn(1, k, device=DEVICE).bfloat16()
    pts = torch.tensor(0.003) if static else nvfp4.global_scale_of(x.cpu())
    ref = nvfp4.fake_quantize(x.cpu(), pts).double() @ dequant64(*w).t()
    for config in triton_gemm._GEMV_W4A4_CONFIGS:
        out = torch.full((1, n), float("nan"), device=DEVICE)
        triton_gemm.launch_gemv(x, None, pts.to(DEVICE) if static else None, [w], None, [out], config=config,
                                quantize=True)
        check(out, ref, out, torch.float32)


@gpu_only
def test_autotune_times_configs_in_graphs(monkeypatch):
    """With tuning on, the first call of a shape times every config (in CUDA graphs) and keeps one; a first call
    made while a CUDA graph is being captured takes the default config and stays capturable."""
    monkeypatch.setattr(triton_gemm, "AUTOTUNE", True)
    monkeypatch.setattr(triton_gemm, "_best", {})
    w = random_nvfp4(192, 512)
    x = torch.randn(16, 512, device=DEVICE).bfloat16()
    ref = x.cpu().double() @ dequant64(*w).t()
    out = triton_gemm.gemm_a16(x, *w, None, out_dtype=torch.float32)
    if _fused_skip() is None:  # Hopper: 16 rows of depth 512 run the fused kernel
        from fp4compile.kernels import gluon_gemm

        kind, configs = "fused", gluon_gemm.configs_for(16)
    else:
        kind, configs = "mma", triton_gemm._mma_configs(16)
    assert [key[0] for key in triton_gemm._best] == [kind]
    assert next(iter(triton_gemm._best.values())) in configs
    check(out, ref, out, torch.float32)
    x2 = torch.randn(40, 512, device=DEVICE).bfloat16()
    out2 = torch.empty(40, 192, device=DEVICE)
    triton_gemm.gemm_a16(x2, *w, None, out=out2)  # compiles the default config outside the capture
    monkeypatch.setattr(triton_gemm, "_best", {})
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        triton_gemm.gemm_a16(x2, *w, None, out=out2)
    out2.fill_(float("nan"))
    graph.replay()
    check(out2, x2.cpu().double() @ dequant64(*w).t(), out2, torch.float32)
    assert triton_gemm._best == {}


@pytest.mark.parametrize("config", [(16, 16, 64, 1, 4, 1, False), (32, 16, 128, 3, 4, 1, False),
                                    (16, 32, 64, 5, 4, 1, False), (32, 16, 128, 3, 4, 1, True)],
                         ids=("one-slice", "uneven-split", "more-slices-than-steps", "uneven-split-dot-order"))
@pytest.mark.parametrize("op", ("a16", "nvfp4"))
def test_mma_split_k(op, config):
    """The tensor-core kernel with K unsplit, split unevenly (two chunks of 64 per step), and split more ways than
    it has K steps, with the activation read in place or reordered first; K is never a whole number of steps.
    Each problem is a group of two weights (64 and N outputs), so the split partials cover both."""
    for m, n, k in ((1, 16, 16), (7, 48, 96), (16, 100, 160)):
        weights = [random_nvfp4(64, k), random_nvfp4(n, k)]
        biases = [torch.randn(w[0].shape[0]).bfloat16().to(DEVICE) for w in weights]
        outs = [torch.full((m, w[0].shape[0]), float("nan"), device=DEVICE, dtype=torch.float32) for w in weights]
        if op == "a16":
            x = (torch.randn(m, k) * 4).bfloat16().to(DEVICE)
            triton_gemm.launch_mma(x, None, None, weights, biases, outs, config=config)
            a64 = x.cpu().double()
        else:
            a = random_nvfp4(m, k)
            triton_gemm.launch_mma(*a, weights, biases, outs, config=config)
            a64 = dequant64(*a)
        for w, bias, out in zip(weights, biases, outs):
            check(out, a64 @ dequant64(*w).t() + bias.cpu().double(), out, torch.float32)


def test_fused_kernel_platforms():
    """The fused kernel runs only where it was written for: Hopper, with the Gluon of Triton 3.6; elsewhere the
    reason names what is missing (the Triton kernels take over)."""
    assert kernels.fused_platform_problem((9, 0), "3.6.0") is None
    assert "9.x (Hopper), this is 8.0" in kernels.fused_platform_problem((8, 0), "3.6.0")
    assert "9.x (Hopper), this is 10.0" in kernels.fused_platform_problem((10, 0), "3.6.0")
    assert "Triton 3.6, this is Triton 3.9.0" in kernels.fused_platform_problem((9, 0), "3.9.0")


@pytest.mark.parametrize("k", (64, 96, 256))
def test_activation_dot_order_is_the_weight_order(k):
    """The activation reorder (``_dot_order``) puts at each dot position the element that the fused kernel's
    weight dequantize puts there (``gluon_gemm._dot_element``); past K, zeros. A mismatch would pair activations
    with the wrong weights."""
    gluon_gemm = pytest.importorskip("fp4compile.kernels.gluon_gemm")
    a = torch.arange(1.0, 2 * k + 1).reshape(2, k)
    ordered = triton_gemm._dot_order(a)
    assert ordered.is_contiguous() and ordered.shape == (2, -(-k // 64) * 64)
    for position in range(ordered.shape[1]):
        element = position - position % 64 + gluon_gemm._dot_element(position % 64)
        expect = a[:, element] if element < k else torch.zeros(2)
        assert torch.equal(ordered[:, position], expect), f"position {position}"


@fused_only
@pytest.mark.parametrize("op", ("a16", "nvfp4"))
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=("bf16", "fp16"))
def test_fused_kernel(monkeypatch, op, dtype):
    """The fused Hopper kernel, each of its configs, then through the dispatch (which must pick it): rows from 2
    to ``FUSED_MAX_ROWS``, N not a multiple of a tile, K from one step of 256 to 4096, bias or none, every e2m1
    code and e4m3 scale (with bf16 outputs: such sums overflow fp16), activations that are views with wider rows
    (gathered in place when the row stride allows 16-byte alignment, copied when not)."""
    from fp4compile.kernels import gluon_gemm

    launches = []
    launch = gluon_gemm.launch
    monkeypatch.setattr(gluon_gemm, "launch", lambda *args, **kwargs: launches.append(1) or launch(*args, **kwargs))
    for m, n, k, with_bias, raw, wider in ((2, 100, 256, True, True, 0), (3, 4096, 4096, False, False, 64),
                                           (17, 200, 512, True, False, 8), (40, 192, 256, False, False, 64),
                                           (128, 64, 1024, False, True, 0),
                                           (300, 100, 256, True, False, 8), (1000, 4096, 4096, False, False, 0),
                                           (kernels.FUSED_MAX_ROWS, 160, 768, True, False, 0)):
        assert kernels.fused_problem(torch.device("cuda"), m, k) is None
        raw = raw and dtype == torch.bfloat16
        w = random_nvfp4(n, k, raw=raw)
        bias = (torch.randn(n) * 3).to(dtype).to(DEVICE) if with_bias else None
        bias64 = bias.cpu().double() if with_bias else 0.0
        if op == "a16":
            x = (torch.randn(m, k + wider) * 4).to(dtype).to(DEVICE)[:, :k]
            a, ref = (x, None, None), x.cpu().double() @ dequant64(*w).t() + bias64
        else:
            a = random_nvfp4(m, k, raw=raw)
            ref = dequant64(*a) @ dequant64(*w).t() + bias64
        for config in gluon_gemm.configs_for(m):
            outs = [torch.full((m, n), float("nan"), device=DEVICE, dtype=t) for t in (torch.float32, dtype)]
            for out in outs:
                gluon_gemm.launch(*a, [w], None if bias is None else [bias], [out], config=config)
            check(outs[0], ref, outs[1], dtype)
        out = torch.full((m, n), float("nan"), device=DEVICE, dtype=torch.float32)
        launches.clear()
        if op == "a16":
            triton_gemm.gemm_a16(x, *w, bias, out_dtype=torch.float32, out=out)
        else:
            triton_gemm.gemm(*a, *w, bias, torch.float32, out=out)
        assert launches, f"the dispatch did not run the fused kernel for M={m}, K={k}"
        check(out, ref, out, torch.float32)


@fused_only
@pytest.mark.parametrize("shapes", [(128, 256, 100), (64, 64, 37)], ids=("aligned-128", "aligned-64"))
@pytest.mark.parametrize("m", (5, 130))
def test_fused_kernel_group(m, shapes):
    """A group through the fused kernel: every config that fits its members (a tile of 128 weight rows takes
    only members of a multiple of 128 rows), K split or not; every output against its own reference."""
    from fp4compile.kernels import gluon_gemm

    k = 512
    weights = [random_nvfp4(n, k) for n in shapes]
    biases = [(torch.randn(n) * 3).bfloat16().to(DEVICE) for n in shapes]
    x = (torch.randn(m, k) * 4).bfloat16().to(DEVICE)
    ends = triton_gemm._ends(weights)
    configs = [c for c in gluon_gemm.configs_for(m) if all(e % c[1] == 0 for e in ends[:-1])]
    assert configs and (shapes[0] == 64 or configs == gluon_gemm.configs_for(m))
    for config in configs:
        outs = [torch.full((m, n), float("nan"), device=DEVICE) for n in shapes]
        gluon_gemm.launch(x, None, None, weights, biases, outs, config=config)
        for w, bias, out in zip(weights, biases, outs):
            check(out, x.cpu().double() @ dequant64(*w).t() + bias.cpu().double(), out, torch.float32)


@fused_only
def test_fused_split_k_tickets():
    """A K split sums its slices in the last program of each tile, which then sets the tile's ticket counter back
    to zero: launch after launch, and replay after replay of a CUDA graph, every output is whole and right."""
    from fp4compile.kernels import gluon_gemm

    w = random_nvfp4(192, 1024)
    x = (torch.randn(16, 1024) * 4).bfloat16().to(DEVICE)
    ref = x.cpu().double() @ dequant64(*w).t()
    out = torch.empty(16, 192, device=DEVICE)
    config = next(c for c in gluon_gemm.configs_for(16) if c[4] > 1)
    run = lambda: gluon_gemm.launch(x, None, None, [w], None, [out], config=config)  # noqa: E731
    for _ in range(3):
        out.fill_(float("nan"))
        run()
        check(out, ref, out, torch.float32)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    for _ in range(3):
        out.fill_(float("nan"))
        graph.replay()
        check(out, ref, out, torch.float32)
    assert not gluon_gemm._TICKETS[x.device].any()


@gpu_only
def test_ops_dispatch_leading_dims():
    """The custom ops on CUDA reach the kernels, with leading dims flattened and restored."""
    w = random_nvfp4(64, 128)
    x = torch.randn(2, 3, 128, device=DEVICE).bfloat16()
    out, = torch.ops.fp4.gemm_a16(x, *([t] for t in w), [None])
    ref = nvfp4.reference_gemm(x.cpu(), *(t.cpu() for t in w), None, torch.float32).to(DEVICE)
    assert out.shape == (2, 3, 64) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=2**-7, atol=1e-3)
    a = torch.ops.fp4.quantize_act(x, None)
    ref = nvfp4.reference_gemm(nvfp4.dequantize_parts(*(t.cpu() for t in a)), *(t.cpu() for t in w), None,
                               torch.float32).to(DEVICE)
    out, = torch.ops.fp4.gemm_kernel(*a, *([t] for t in w), [None], torch.float16)
    assert out.shape == (2, 3, 64) and out.dtype == torch.float16
    torch.testing.assert_close(out.float(), ref, rtol=2**-9, atol=1e-3)
    out, = torch.ops.fp4.gemm(x, None, *([t] for t in w), [None])
    assert out.shape == (2, 3, 64) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=2**-7, atol=1e-3)


@pytest.mark.parametrize("rows", (1, kernels.GEMV_A16_MAX_ROWS))
def test_gemv_copies_unaligned_rows(rows):
    """The GEMV reads 16-byte vectors, its rows K apart: rows that start off that boundary, stride along K or lie
    further apart are copied first; a packed weight it cannot read as 32-bit words is refused with a message naming
    the problem."""
    w = random_nvfp4(48, 64)
    base = torch.randn(rows, 160, device=DEVICE).bfloat16()
    for x in (base[:, 1:65], base[:, ::2][:, :64], base[:, :64]):
        out = triton_gemm.gemm_a16(x, *w, None, out_dtype=torch.float32)
        check(out, x.cpu().double() @ dequant64(*w).t(), out, torch.float32)
    packed, scales, pts = w
    shifted = torch.empty(48, 33, dtype=torch.uint8, device=DEVICE)[:, 1:].copy_(packed)
    with pytest.raises(ValueError, match="32-bit words"):
        triton_gemm.gemm_a16(base[:, :64], shifted, scales, pts, None)


@pytest.mark.parametrize("m", range(1, kernels.GEMV_MAX_ROWS + 1))
@pytest.mark.parametrize("op", ("a16", "nvfp4"))
def test_gemv_rows(op, m):
    """Every row count the GEMVs take, each row its own accumulator and output row: rows of different scales (a
    row mixed up with another shows), N not a multiple of the tile, K over several steps, a bias at even counts.
    NVFP4 through the quantizing path, which also checks the packed one bit for bit."""
    k, n, with_bias = 96 if not CUDA else 4160, 40 if not CUDA else 100, m % 2 == 0
    x = (torch.randn(m, k) * torch.logspace(0, 3, m)[:, None]).bfloat16().to(DEVICE)
    w = random_nvfp4(n, k)
    bias = (torch.randn(n) * 3).bfloat16().to(DEVICE) if with_bias else None
    bias64 = bias.cpu().double() if with_bias else 0.0
    if op == "a16":
        outs = [torch.full((m, n), float("nan"), device=DEVICE, dtype=t) for t in (torch.float32, torch.bfloat16)]
        for out in outs:
            triton_gemm.launch_gemv(x, None, None, [w], None if bias is None else [bias], [out])
        check(outs[0], x.cpu().double() @ dequant64(*w).t() + bias64, outs[1], torch.bfloat16)
    else:
        quantizing_gemm(x, [w], None if bias is None else [bias])


def test_gemv_row_limits(monkeypatch):
    """The GEMVs take up to GEMV_A16_MAX_ROWS rows of a bf16 activation and GEMV_MAX_ROWS of an NVFP4 one; the
    tensor-core kernels the rows past those."""
    rows = []
    launch_gemv = triton_gemm.launch_gemv
    monkeypatch.setattr(triton_gemm, "launch_gemv", lambda a, *args, **kw: rows.append(a.shape[0])
                        or launch_gemv(a, *args, **kw))
    w = random_nvfp4(16, 32)
    for m in (kernels.GEMV_A16_MAX_ROWS, kernels.GEMV_A16_MAX_ROWS + 1):
        triton_gemm.gemm_a16(torch.randn(m, 32, device=DEVICE).bfloat16(), *w, None)
    for m in (kernels.GEMV_MAX_ROWS, kernels.GEMV_MAX_ROWS + 1):
        triton_gemm.quantize_gemm_group(torch.randn(m, 32, device=DEVICE).bfloat16(), None, [w], None)
    assert rows == [kernels.GEMV_A16_MAX_ROWS, kernels.GEMV_MAX_ROWS]


def test_gemv_refuses_more_rows_than_it_takes():
    """More rows than the GEMV kernels hold are refused with a message naming the limit."""
    w = random_nvfp4(16, 32)
    x = torch.randn(kernels.GEMV_MAX_ROWS + 1, 32, device=DEVICE).bfloat16()
    out = torch.empty(x.shape[0], 16, device=DEVICE, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=f"1 to {kernels.GEMV_MAX_ROWS} rows"):
        triton_gemm.launch_gemv(x, None, None, [w], None, [out])


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=("bf16", "fp16"))
def test_dequantize_kernel_is_exact(dtype):
    """The cuBLAS path's scratch operand equals the reference's e2m1 * S_b bit for bit (odd sizes, all patterns)."""
    packed, scales, _ = random_nvfp4(37, 80, raw=True)
    expected = nvfp4.dequantize_parts(packed.cpu(), scales.cpu(), None).to(dtype)
    assert torch.equal(triton_gemm.dequantize(packed, scales, dtype).cpu(), expected)


def test_fallback_logs_reason_once(caplog):
    """Inputs the kernels cannot take run the reference, and the reason is logged once."""
    kernels._fallback_notice.cache_clear()  # earlier tests may have logged the same reason
    w = random_nvfp4(32, 64)
    x = torch.randn(4, 64)  # fp32 activation (and, without a GPU, a CPU tensor)
    with caplog.at_level(logging.WARNING, logger="fp4compile.kernels"):
        out, = kernels.gemm_a16(x.to(DEVICE), *([t] for t in w), [None])
        kernels.gemm_a16(x.to(DEVICE), *([t] for t in w), [None])
    # the same reference on the same device (an fp32 matmul on a GPU may sum in another order than on the CPU)
    torch.testing.assert_close(out, nvfp4.reference_gemm(x.to(DEVICE), *w, None, torch.float32), rtol=0, atol=0)
    reasons = [r.getMessage() for r in caplog.records]
    assert len(reasons) == 1 and "reference" in reasons[0], reasons


def test_swizzle_matches_formula():
    """format.swizzle_scales against NVFP4.md's byte-offset formula, padding zeros included."""
    for rows, cols in ((3, 5), (128, 4), (130, 8), (257, 3)):
        scales = torch.randint(1, 256, (rows, cols), dtype=torch.uint8)
        r_pad, c_pad = -(-rows // 128) * 128, -(-cols // 4) * 4
        expected = torch.zeros(r_pad * c_pad, dtype=torch.uint8)
        for r in range(rows):
            for c in range(cols):
                offset = ((r // 128) * (c_pad // 4) + c // 4) * 512 + (r % 32) * 16 + ((r // 32) % 4) * 4 + c % 4
                expected[offset] = scales[r, c]
        assert torch.equal(nvfp4.swizzle_scales(scales), expected), (rows, cols)


def test_blackwell_scaled_mm_call_on_meta():
    """The sm_100 call passes torch._scaled_mm's argument checks (meta tensors; untested on hardware)."""
    m, n, k = 5, 48, 64
    meta = {"device": "meta", "dtype": torch.uint8}
    args = blackwell.scaled_mm_args(torch.empty(m, k // 2, **meta), torch.empty(m, k // 16, **meta),
                                    torch.empty(n, k // 2, **meta), torch.empty(n, k // 16, **meta))
    assert args[0].dtype == torch.float4_e2m1fn_x2 and args[2].dtype == torch.float8_e4m3fn
    out = torch._scaled_mm(*args, out_dtype=torch.float32)
    assert out.shape == (m, n) and out.dtype == torch.float32
    assert blackwell.unsupported(args[0].view(torch.uint8), torch.empty(n, k // 2, **meta)) is None
    assert "N % 16" in blackwell.unsupported(None, torch.empty(40, k // 2, **meta))
