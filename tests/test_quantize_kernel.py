"""The Triton activation quantize against the format's reference, bit for bit.

On a CUDA machine it runs on the GPU; elsewhere on CPU tensors under Triton's interpreter (conftest.py).
"""

import pytest
import torch

triton = pytest.importorskip("triton", reason="the Triton kernels need the triton package")

from fp4compile import format as nvfp4  # noqa: E402
from fp4compile.kernels import triton_quantize  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def check_bitwise(x: torch.Tensor, pts: torch.Tensor | None = None):
    """Both kernels against the reference: packed values and block scales, and the values ``e2m1 * S_b`` as bf16,
    fp16 and fp32 (NaN where the reference has NaN), which ``format.quantize_values`` must give too."""
    pts = nvfp4.global_scale_of(x) if pts is None else pts
    packed, scales = triton_quantize.quantize_blocks(x.to(DEVICE), pts.to(DEVICE))
    ref_packed, ref_scales = nvfp4.quantize_blocks(x, pts)
    assert torch.equal(scales.cpu(), ref_scales.view(torch.uint8)), "block scales differ"
    assert torch.equal(packed.cpu(), ref_packed), "packed values differ"
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        values = triton_quantize.quantize_values(x.to(DEVICE), pts.to(DEVICE), dtype).cpu()
        expect = nvfp4.dequantize_parts(ref_packed, ref_scales, None, dtype)
        assert values.shape == x.shape and values.dtype == dtype
        assert torch.equal(values.isnan(), expect.isnan()), f"{dtype} values: NaN where the reference has none"
        assert torch.equal(values.nan_to_num(), expect.nan_to_num()), f"{dtype} values differ"
        plain = nvfp4.quantize_values(x, pts, dtype)
        assert torch.equal(plain.isnan(), expect.isnan()) and torch.equal(plain.nan_to_num(), expect.nan_to_num())


@pytest.mark.parametrize("shape", [(1, 16), (3, 48), (17, 272), (5, 2, 64)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_random_inputs_bit_identical(shape, dtype):
    x = (torch.randn(shape) * torch.rand(*shape[:-1], 1) * 10).to(dtype)
    check_bitwise(x)


def test_awkward_values_bit_identical():
    x = torch.randn(8, 64)
    x[0] = 0.0  # an all-zero block row
    x[1] = 1e-30  # tiny: block scales hit the 2**-6 floor
    x[2, :16] = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5.0, -0.0])
    x[3] *= 1e30  # huge
    x[4, 3] = -0.0
    check_bitwise(x)
    check_bitwise(x, torch.tensor(1.0))  # a static scale far from amax: block scales clamp at both ends
    check_bitwise(x[:, :32], torch.tensor(1 / 448 / 6 * 6))


def test_ties_on_every_e2m1_boundary():
    # Single block with max 6 and pts = 1/448: block scale (6/6)/(1/448) = 448 -> y = x exactly.
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0])
    x = torch.cat([ties, -ties]).reshape(1, 16)
    check_bitwise(x, torch.tensor(1 / 448))


def test_non_contiguous_rows():
    x = torch.randn(64, 10).t()  # [10, 64], column stride 10
    check_bitwise(x)


def test_nan_gives_nan_scales_and_no_crash():
    x = torch.randn(2, 32)
    x[0, 5] = float("nan")
    packed, scales = triton_quantize.quantize_blocks(x.to(DEVICE), torch.tensor(0.01, device=DEVICE))
    assert scales[0, 0].item() == 0x7F and scales[1].ne(0x7F).all()


def test_zero_tensor_gets_nan_scales_as_the_reference():
    """An all-zero tensor's dynamic scale is 0, so each block scale is 0 / 0: NaN in the reference (torchao's
    arithmetic); the kernel gives the e4m3 NaN too (the reference's sign bit may differ: 0xFF on x86)."""
    x = torch.zeros(2, 32)
    _, scales = triton_quantize.quantize_blocks(x.to(DEVICE), nvfp4.global_scale_of(x).to(DEVICE))
    _, ref = nvfp4.quantize_blocks(x, nvfp4.global_scale_of(x))
    assert ref.float().isnan().all() and (scales.cpu() == 0x7F).all()


@pytest.mark.parametrize("pts", [None, 1 / 448, 1.0, 1e-12], ids=str)
def test_quantized_values_are_the_reference_values(pts):
    """``quantized_values`` (the quantize of the GEMV and of ``quantize_values``) gives ``e2m1 * S_b`` of the
    reference bit for bit: every e2m1 boundary and tie, values just beside them, zeros of both signs, tiny, huge,
    inf and NaN elements."""
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0])
    near = torch.cat([ties, ties.nextafter(torch.tensor(0.0)), ties.nextafter(torch.tensor(9.0))])
    x = torch.cat([near, -near, torch.randn(64) * 3, torch.tensor([0.0, -0.0, 1e-30, -1e30, 7.0, -6.5, 1e-45, 3.0]),
                   torch.randn(8) * 1e-3]).reshape(1, 128)
    x = torch.cat([x, x.clone()])
    x[1, 100], x[1, 120] = float("inf"), float("nan")
    check_bitwise(x, nvfp4.global_scale_of(x[0]) if pts is None else torch.tensor(pts))
