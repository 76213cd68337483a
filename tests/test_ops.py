"""The torch.ops.fp4 custom ops: opcheck, fake shapes, and agreement with the format's reference."""

import pytest
import torch

import fp4compile
from fp4compile import format as nvfp4


def _weight(n=32, k=64, seed=0):
    q = fp4compile.quantize(torch.randn(n, k, generator=torch.Generator().manual_seed(seed)))
    return q.packed, q.scales.view(torch.uint8), q.global_scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_opcheck_every_op(dtype):
    x = torch.randn(3, 5, 64).to(dtype)
    wp, ws, wpts = _weight()
    bias = torch.randn(32).to(dtype)
    a = torch.ops.fp4.quantize_act(x)
    torch.library.opcheck(torch.ops.fp4.quantize_act.default, (x, None))
    torch.library.opcheck(torch.ops.fp4.quantize_act.default, (x, torch.tensor(0.01)))
    torch.library.opcheck(torch.ops.fp4.quantize_blocks.default, (x, torch.tensor(0.01)))
    for act_pts in (None, torch.tensor(0.01)):
        torch.library.opcheck(torch.ops.fp4.gemm.default, (x, act_pts, [wp], [ws], [wpts], [bias]))
        torch.library.opcheck(torch.ops.fp4.quantize_gemm_kernel.default, (x, act_pts, [wp], [ws], [wpts], [bias]))
    torch.library.opcheck(torch.ops.fp4.gemm_kernel.default, (*a, [wp], [ws], [wpts], [bias], dtype))
    torch.library.opcheck(torch.ops.fp4.gemm_a16.default, (x, [wp], [ws], [wpts], [None]))
    wp2, ws2, wpts2 = _weight(n=16, seed=1)
    group = ([wp, wp2], [ws, ws2], [wpts, wpts2], [bias, bias[:16]])
    torch.library.opcheck(torch.ops.fp4.gemm.default, (x, None, *group))
    torch.library.opcheck(torch.ops.fp4.gemm_kernel.default, (*a, *group, dtype))
    torch.library.opcheck(torch.ops.fp4.gemm_a16.default, (x, *group))
    alphas = [float(wpts), float(wpts2)]  # host floats, as the pass adds them (only the large-M plan reads them)
    torch.library.opcheck(torch.ops.fp4.gemm.default, (x, torch.tensor(0.01), *group, alphas))
    torch.library.opcheck(torch.ops.fp4.gemm_a16.default, (x, *group, alphas))
    for scheme in ("nvfp4", "nvfp4a16"):
        torch.library.opcheck(torch.ops.fp4.linear.default, (x, wp, ws, wpts, bias, None, scheme))


def test_quantize_act_matches_format_and_crosses_as_uint8():
    x = torch.randn(7, 48)
    packed, scales, pts = torch.ops.fp4.quantize_act(x)
    q = fp4compile.quantize(x)
    assert packed.dtype == scales.dtype == torch.uint8
    assert torch.equal(packed, q.packed) and torch.equal(scales, q.scales.view(torch.uint8))
    assert torch.equal(pts, q.global_scale)


def test_gemm_is_the_dequantized_fp32_product():
    x, w, b = torch.randn(4, 64), torch.randn(32, 64), torch.randn(32)
    wp, ws, wpts = _weight()
    w = nvfp4.dequantize_parts(wp, ws, wpts)
    out, = torch.ops.fp4.gemm(x, None, [wp], [ws], [wpts], [b])
    assert torch.equal(out, nvfp4.fake_quantize(x) @ w.t() + b)
    static = torch.tensor(0.004)
    out, = torch.ops.fp4.gemm(x, static, [wp], [ws], [wpts], [b])
    assert torch.equal(out, nvfp4.fake_quantize(x, static) @ w.t() + b)
    packed, = torch.ops.fp4.gemm_kernel(*torch.ops.fp4.quantize_act(x), [wp], [ws], [wpts], [b], torch.float32)
    assert torch.equal(packed, nvfp4.fake_quantize(x) @ w.t() + b)
    out16, = torch.ops.fp4.gemm_a16(x.bfloat16(), [wp], [ws], [wpts], [None])
    assert out16.dtype == torch.bfloat16
    assert torch.equal(out16, (x.bfloat16().float() @ w.t()).bfloat16())


def test_linear_rejects_unknown_scheme():
    wp, ws, wpts = _weight()
    with pytest.raises(ValueError, match="unknown scheme 'int4'"):
        torch.ops.fp4.linear(torch.randn(2, 64), wp, ws, wpts, None, None, "int4")


def test_block_quantize_is_plain_torch_on_cpu_and_the_kernel_op_on_cuda():
    from fp4compile.ops import _block_quantizer

    x, pts = torch.randn(4, 32), torch.tensor(0.01)
    packed, scales = _block_quantizer(x.device)(x, pts)
    assert torch.equal(packed, fp4compile.quantize(x, pts).packed)
    assert _block_quantizer(torch.device("cuda")) is torch.ops.fp4.quantize_blocks


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compiled_operand_dequantize_is_exact(dtype):
    """The dequantize Inductor generates for the multi-row CUDA plan decodes by bit placement, which is exact only
    where the compiled code keeps subnormals: every byte against every finite e4m3 scale, compiled, bit for bit."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    scale_bits = torch.tensor([b for b in range(256) if b & 0x7F != 0x7F], dtype=torch.uint8)
    packed = torch.arange(256, dtype=torch.uint8).repeat(scale_bits.numel(), 1).to(device)  # [scales, 256]: 32 blocks
    scales = scale_bits[:, None].expand(-1, 32).contiguous().to(device)
    with torch._inductor.config.patch(fx_graph_cache=False):
        dequantize = torch.compile(nvfp4.dequantize_blocks_by_bits, backend="inductor", fullgraph=True)
        compiled = dequantize(packed, scales, dtype)
    expect = nvfp4.dequantize_parts(packed.cpu(), scales.cpu(), None, dtype)
    assert torch.equal(compiled.cpu().view(torch.int16), expect.view(torch.int16))
