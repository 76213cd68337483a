"""The NVFP4 format against the torchao reference, bit for bit, plus the value tables and the error cases."""

import pathlib

import pytest
import torch
from safetensors.torch import load_file

import fp4compile
from fp4compile import format as nvfp4

VECTORS = load_file(pathlib.Path(__file__).parent / "data" / "nvfp4_reference.safetensors")
CASES = sorted({k.rsplit(".", 1)[0] for k in VECTORS})


@pytest.mark.parametrize("case", CASES)
def test_reference_vectors_bit_identical(case):
    x, pts = VECTORS[f"{case}.x"], VECTORS.get(f"{case}.pts")
    q = fp4compile.quantize(x, two_level=pts is not None)
    ref_packed, ref_scales = VECTORS[f"{case}.packed"], VECTORS[f"{case}.scales"]
    assert q.packed.dtype == torch.uint8 and q.scales.dtype == torch.float8_e4m3fn
    assert q.packed.shape == (*x.shape[:-1], x.shape[-1] // 2)
    assert q.scales.shape == (*x.shape[:-1], x.shape[-1] // 16)
    assert torch.equal(q.packed.reshape(ref_packed.shape), ref_packed)
    assert torch.equal(q.scales.view(torch.uint8).reshape(ref_scales.shape), ref_scales)
    if pts is None:
        assert q.global_scale is None
    else:
        assert torch.equal(q.global_scale.reshape(1), pts)


def test_reference_vectors_cover_every_case():
    assert len(CASES) == 10


def test_every_e2m1_value_and_tie_rounds_to_even():
    # Single-level scaling with a block max of 6 gives a block scale of exactly 1, so y == x.
    grid = torch.tensor(nvfp4.E2M1_VALUES)
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    expect_ties = torch.tensor([0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0])
    for values, expect in ((grid, grid), (ties, expect_ties), (-grid, -grid), (-ties, -expect_ties)):
        x = torch.zeros(16)
        x[: len(values)] = values
        x[15] = 6.0
        q = fp4compile.quantize(x, two_level=False)
        out = fp4compile.dequantize(q)
        assert torch.equal(out[: len(values)], expect), (values, out)


def test_negative_zero_keeps_its_sign_code():
    x = torch.zeros(16)
    x[0], x[1], x[15] = -0.0, -0.1, 6.0
    codes = nvfp4.unpack(fp4compile.quantize(x, two_level=False).packed)
    assert codes[0].item() == 8 and codes[1].item() == 8 and codes[2].item() == 0


def test_pack_puts_even_element_in_low_nibble():
    codes = torch.tensor([1, 2, 3, 15], dtype=torch.uint8)
    assert nvfp4.pack(codes).tolist() == [0x21, 0xF3]
    assert torch.equal(nvfp4.unpack(nvfp4.pack(codes)), codes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_error_is_nvfp4_sized_for_every_dtype(dtype):
    x = torch.randn(4, 3, 64, generator=torch.Generator().manual_seed(1)).to(dtype)
    q = fp4compile.quantize(x)
    out = fp4compile.dequantize(q, dtype)
    assert out.dtype == dtype and out.shape == x.shape
    rel = (out.float() - x.float()).norm() / x.float().norm()
    assert 0.03 < rel < 0.15, f"relative error {rel:.3f} for {dtype}"


def test_given_global_scale_is_used():
    x = torch.randn(2, 32)
    pts = torch.tensor(0.01)
    assert torch.equal(fp4compile.quantize(x, pts).global_scale, pts)


def test_k_not_multiple_of_16_raises():
    with pytest.raises(ValueError, match="multiple of 16.*K=30"):
        fp4compile.quantize(torch.randn(2, 30))


def test_unsupported_dtype_raises():
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        fp4compile.quantize(torch.ones(2, 16, dtype=torch.float64))


def test_global_scale_with_single_level_raises():
    with pytest.raises(ValueError, match="two_level=False"):
        fp4compile.quantize(torch.ones(2, 16), torch.tensor(1.0), two_level=False)


def test_zeros_tiny_and_huge_stay_finite_and_exact_where_representable():
    x = torch.zeros(3, 16)
    x[1] = 1e-30
    x[2, 0] = 3e38
    out = fp4compile.dequantize(fp4compile.quantize(x))
    assert torch.isfinite(out).all()
    assert torch.equal(out[0], torch.zeros(16))


def test_swizzle_matches_the_blocked_layout_formula():
    rows, cols = 200, 9
    scales = torch.randint(1, 255, (rows, cols), dtype=torch.uint8)
    flat = nvfp4.swizzle_scales(scales)
    r_pad, c_pad = 256, 12
    assert flat.numel() == r_pad * c_pad
    expect = torch.zeros(r_pad * c_pad, dtype=torch.uint8)
    for r in range(rows):
        for c in range(cols):
            offset = ((r // 128) * (c_pad // 4) + c // 4) * 512 + (r % 32) * 16 + ((r // 32) % 4) * 4 + c % 4
            expect[offset] = scales[r, c]
    assert torch.equal(flat, expect)


def test_dequantize_is_code_value_times_block_scale_times_global_scale():
    packed = torch.randint(0, 256, (3, 8), dtype=torch.uint8)
    scales = torch.randint(0, 127, (3, 1), dtype=torch.uint8).view(torch.float8_e4m3fn)
    pts = torch.tensor(0.37)
    codes = nvfp4.unpack(packed)
    expect = nvfp4.e2m1_to_float(codes) * scales.float() * pts
    assert torch.equal(nvfp4.dequantize_parts(packed, scales, pts), expect)
    table = dict(zip(range(16), nvfp4.E2M1_VALUES + tuple(-v for v in nvfp4.E2M1_VALUES)))
    assert nvfp4.e2m1_to_float(codes).flatten().tolist() == [table[c] for c in codes.flatten().tolist()]


def test_decode_by_bits_equals_the_arithmetic_decode():
    codes = torch.arange(16, dtype=torch.uint8)
    by_bits = nvfp4.e2m1_to_float_by_bits(codes)
    assert torch.equal(by_bits.view(torch.int32), nvfp4.e2m1_to_float(codes).view(torch.int32))  # -0.0 included
    packed = torch.arange(256, dtype=torch.uint8).repeat(254, 1)  # every byte against every finite e4m3 scale
    scales = torch.tensor([b for b in range(256) if b & 0x7F != 0x7F], dtype=torch.uint8)[:, None].expand(-1, 32)
    for dtype in (torch.float32, torch.bfloat16):
        got = nvfp4.dequantize_blocks_by_bits(packed, scales, dtype)
        expect = nvfp4.dequantize_parts(packed, scales, None, dtype)
        assert torch.equal(got.view(torch.uint8), expect.view(torch.uint8))  # bit patterns, so -0.0 counts


def test_e2m1_round_equals_the_codes_decoded():
    """``e2m1_round`` (fewer operations, for the values Inductor generates) equals rounding to codes and decoding
    them: every 97th fp32 of [0, 6], each tie and its two neighbours on either side, both signs, -0 and NaN."""
    swept = torch.arange(0, 0x40C00001, 97, dtype=torch.int32)
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0]).view(torch.int32)
    near = (ties[:, None] + torch.arange(-2, 3, dtype=torch.int32)).flatten()
    y = torch.cat([swept, near, torch.tensor([0x40C00000], dtype=torch.int32)]).view(torch.float32).clamp(max=6.0)
    y = torch.cat([y, -y, torch.tensor([float("nan"), -float("nan")])])
    got = nvfp4.e2m1_round(y)
    expect = nvfp4.e2m1_to_float(nvfp4.e2m1_codes(y))
    assert torch.equal(got.view(torch.int32), expect.view(torch.int32))  # bit patterns, so -0.0 and NaN's 0 count


def _finite_floats(n: int, seed: int) -> torch.Tensor:
    """Random fp32 bit patterns over the whole positive finite range, subnormals included, with 0, the smallest
    subnormal and the largest finite value."""
    bits = torch.randint(0, 0x7F800000, (n,), dtype=torch.int32, generator=torch.Generator().manual_seed(seed))
    return torch.cat([bits.view(torch.float32), torch.tensor([0.0, 2.0**-149, torch.finfo(torch.float32).max])])


def test_global_scale_is_the_correctly_rounded_fp32_quotient():
    """The fp64 division rounded to fp32 (``div_rn``, exact under Inductor's CUDA code) equals fp32's own correctly
    rounded division for every kind of fp32 amax, and for every kind of fp32 quotient."""
    amax = _finite_floats(1_000_000, 0)
    assert torch.equal(nvfp4.global_scale_from_amax(amax), amax / 2688.0)
    a, b = _finite_floats(1_000_000, 1), _finite_floats(1_000_000, 2) + 2.0**-149
    assert torch.equal(nvfp4.div_rn(a, b).view(torch.int32), (a / b).view(torch.int32))


def test_round_to_e4m3_is_the_fp8_cast_on_the_clamped_range():
    """On [2**-6, 448], where quantize clamps its block scales, rounding on the fp32 bits gives the fp8 cast's value:
    random fp32 in the range, every e4m3 value and every midpoint between neighbours (ties to even), and NaN."""
    s = torch.empty(1_000_000).uniform_(-6.0, 8.81).exp2().clamp(2.0**-6, 448.0)  # 2**8.81 > 448
    e4m3 = torch.arange(0x08, 0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # 2**-6 ... 448
    s = torch.cat([s, e4m3, (e4m3[1:] + e4m3[:-1]) / 2])
    assert torch.equal(nvfp4.round_to_e4m3(s).view(torch.int32), s.to(torch.float8_e4m3fn).float().view(torch.int32))
    assert nvfp4.round_to_e4m3(torch.tensor([float("nan")])).isnan().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_quantize_values_are_the_dequantized_blocks(dtype):
    """``quantize_values`` (written for Inductor) equals ``quantize_blocks`` then the dequantize, bit for bit (NaN
    where the reference has NaN): random magnitudes over 12 decades, blocks of zeros, tiny, huge, a NaN, an inf,
    the e2m1 ties, and static scales that clamp the block scales at both ends."""
    torch.manual_seed(0)
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0])
    for i in range(40):
        x = torch.randn(6, 64) * torch.rand(6, 1) * 10 ** torch.empty(()).uniform_(-6, 6)
        x[0, :16], x[1, 16:32], x[2, 32:48] = 0.0, 1e-30, x[2, 32:48] * 1e30
        x[3, :16] = torch.cat([ties, -ties]) * 2 ** torch.randint(-4, 5, ())
        x[4, i % 64] = (float("nan"), float("inf"), -0.0)[i % 3]
        x = x.to(dtype)
        for pts in (nvfp4.global_scale_of(x), torch.tensor(1 / 448), torch.tensor(1.0), torch.tensor(1e-12)):
            packed, scales = nvfp4.quantize_blocks(x, pts)
            for out_dtype in (torch.bfloat16, torch.float16, torch.float32):
                values = nvfp4.quantize_values(x, pts, out_dtype)
                expect = nvfp4.dequantize_parts(packed, scales, None, out_dtype)
                assert values.dtype == out_dtype and torch.equal(values.isnan(), expect.isnan())
                assert torch.equal(values.nan_to_num().view(torch.uint8), expect.nan_to_num().view(torch.uint8))
