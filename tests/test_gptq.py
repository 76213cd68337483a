"""GPTQ on single layers: exactness of the returned tensor, the error it reaches, and its failure paths."""

import warnings

import pytest
import torch

from fp4compile import format as nvfp4
from fp4compile import gptq as G

SEARCHES = ("none", "four_over_six", "mse")


def correlated_inputs(rows: int, k: int, rank: int = 32, seed: int = 0) -> torch.Tensor:
    """Inputs whose columns are strongly correlated (low rank plus a little noise), as real activations are."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(rows, rank, generator=g)
    return latent @ torch.randn(rank, k, generator=g) + 0.05 * torch.randn(rows, k, generator=g)


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    h = G.Hessian(x.shape[-1])
    h.add(x)
    return h.h


@pytest.fixture(scope="module")
def layer():
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    x = correlated_inputs(1024, 256)
    return w, x, hessian_of(x)


def test_hessian_is_running_mean_of_2xxT():
    x = torch.randn(300, 32, dtype=torch.float64).float()
    h = G.Hessian(32)
    for part in x.split((100, 57, 143)):
        h.add(part)
    torch.testing.assert_close(h.h, 2 * x.T @ x / 300, rtol=1e-5, atol=1e-5)
    assert h.n == 300


def test_rtn_without_search_is_format_quantize():
    w = torch.randn(48, 96) * 3
    r = G.rtn(w, G.nvfp4_format())
    q = nvfp4.quantize(w)
    assert torch.equal(r.quantized.packed, q.packed)
    assert torch.equal(r.quantized.scales.view(torch.uint8), q.scales.view(torch.uint8))
    assert torch.equal(r.quantized.global_scale, q.global_scale)
    assert torch.equal(r.dequantized, nvfp4.dequantize(q))


@pytest.mark.parametrize("search", SEARCHES)
@pytest.mark.parametrize("act_order,timing", [(False, "sweep"), (False, "upfront"), (True, "upfront")])
def test_result_dequantizes_to_exactly_the_values_gptq_used(layer, search, act_order, timing):
    w, _, h = layer
    res = G.gptq(w, h, G.nvfp4_format(search), act_order=act_order, scale_timing=timing)
    q = res.quantized
    assert q.packed.dtype == torch.uint8 and q.packed.shape == (64, 128)
    assert q.scales.dtype == torch.float8_e4m3fn and q.scales.shape == (64, 16)
    assert torch.equal(nvfp4.dequantize(q), res.dequantized)
    assert torch.equal(q.global_scale, nvfp4.global_scale_of(w))


@pytest.mark.parametrize("search", SEARCHES)
def test_gptq_output_error_at_most_035_of_rtn(layer, search):
    w, x, h = layer
    fmt = G.nvfp4_format(search)
    rtn_q = G.rtn(w, G.nvfp4_format()).dequantized
    gptq_q = G.gptq(w, h, fmt).dequantized
    rtn_mse, gptq_mse = ((x @ (w - rtn_q).T) ** 2).mean(), ((x @ (w - gptq_q).T) ** 2).mean()
    assert gptq_mse <= 0.35 * rtn_mse, f"search={search}: output MSE GPTQ {gptq_mse:.3g} vs RTN {rtn_mse:.3g}"
    # output_error is the same ratio, computed from H = 2 X^T X / n
    ratio = G.output_error(w, gptq_q, h) / G.output_error(w, rtn_q, h)
    assert ratio == pytest.approx(float(gptq_mse / rtn_mse), rel=1e-3)


def test_scale_search_never_worse_per_block():
    w = torch.randn(32, 128) * torch.rand(32, 128) ** 3  # heavy-ish tails make 4 win in some blocks
    pts = nvfp4.global_scale_of(w)
    blocks = w.unflatten(-1, (-1, 16))

    def block_err(scales):
        sq = scales.float().unsqueeze(-1)
        y = (blocks * (pts.reciprocal() / sq)).clamp(-6, 6)
        return (blocks - nvfp4.e2m1_to_float(nvfp4.e2m1_codes(y)) * sq * pts).square().sum(-1)

    ref = G.search_block_scales(blocks, pts, G.SCALE_TARGETS["none"])
    assert torch.equal(ref.view(torch.uint8), nvfp4.block_scales(blocks, pts).view(torch.uint8))
    for search in ("four_over_six", "mse"):
        err = block_err(G.search_block_scales(blocks, pts, G.SCALE_TARGETS[search]))
        assert (err <= block_err(ref)).all()
        assert (err < block_err(ref)).any(), f"{search} improved no block"


def test_act_order_keeps_groups_along_original_k(layer):
    w, _, h = layer
    res = G.gptq(w, h, G.nvfp4_format(), act_order=True, scale_timing="upfront")
    # upfront scales come from the original weight, group by group along the original K
    assert torch.equal(res.quantized.scales.view(torch.uint8), nvfp4.quantize(w).scales.view(torch.uint8))
    assert G.output_error(w, res.dequantized, h) < G.output_error(w, nvfp4.fake_quantize(w), h)
    with pytest.raises(ValueError, match="act_order"):
        G.gptq(w, h, G.nvfp4_format(), act_order=True, scale_timing="sweep")


def test_dead_columns_are_zeroed():
    torch.manual_seed(1)
    w = torch.randn(32, 64)
    x = correlated_inputs(256, 64)
    dead = torch.tensor([3, 17, 40])
    x[:, dead] = 0
    res = G.gptq(w, hessian_of(x), G.nvfp4_format())
    assert res.fallback is None
    assert (res.dequantized[:, dead] == 0).all()
    assert torch.isfinite(res.dequantized).all()


def test_cholesky_failure_raises_dampening_then_succeeds():
    torch.manual_seed(2)
    q, _ = torch.linalg.qr(torch.randn(64, 64))
    eig = torch.ones(64)
    eig[0] = -0.05  # indefinite: percdamp 0.01 is not enough, 0.1 is
    h = q @ torch.diag(eig) @ q.T
    res = G.gptq(torch.randn(16, 64), h, G.nvfp4_format(), percdamp=0.01)
    assert res.fallback is None
    assert res.percdamp == pytest.approx(0.1)


def test_cholesky_failure_falls_back_to_rtn_with_warning():
    w = torch.randn(16, 64)
    h = -torch.eye(64)  # negative definite: no dampening helps
    with pytest.warns(RuntimeWarning, match="round-to-nearest"):
        res = G.gptq(w, h, G.nvfp4_format())
    assert res.fallback is not None and "Cholesky" in res.fallback
    assert torch.equal(res.dequantized, nvfp4.fake_quantize(w))
    with pytest.warns(RuntimeWarning, match="own weight"):
        target = G.asymmetric_target(w, h, torch.randn(64, 64), alpha=0.25)
    assert torch.equal(target, w)


def test_asymmetric_target_retries_with_more_dampening():
    """A Hessian that only a larger dampening makes positive definite: the target is still W plus a correction."""
    torch.manual_seed(4)
    w, cross = torch.randn(16, 64), torch.randn(64, 64) * 0.01
    h = torch.eye(64) - 0.02 * torch.ones(64, 64)  # smallest eigenvalue 1 - 0.02 * 64 = -0.28, mean diagonal 0.98
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        target = G.asymmetric_target(w, h, cross, alpha=1.0, percdamp=0.01)  # 0.01 fails, 0.1 fails, 1.0 works
    damped = h + 1.0 * h.diagonal().mean() * torch.eye(64)
    torch.testing.assert_close(target, w + torch.linalg.solve(damped, (w @ cross).t()).t(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("search", SEARCHES)
def test_shrink_goes_from_gptq_to_rounding_with_the_same_scales(layer, search):
    """shrink scales H's off-diagonal terms: 0 is plain GPTQ, 1 leaves no error feedback, which is RTN with the
    scale search weighted by diag(H); in between, the output error on the calibration inputs lies between."""
    w, _, h = layer
    fmt = G.nvfp4_format(search)
    assert torch.equal(G.gptq(w, h, fmt, shrink=0.0).dequantized, G.gptq(w, h, fmt).dequantized)
    rounded = G.gptq(w, h, fmt, shrink=1.0).dequantized
    assert torch.equal(rounded, G.rtn(w, fmt, importance=h.diagonal()).dequantized)
    errors = [G.output_error(w, G.gptq(w, h, fmt, shrink=s).dequantized, h) for s in (0.0, 0.5, 1.0)]
    assert errors[0] < errors[1] < errors[2], errors
    with pytest.raises(ValueError, match="shrink"):
        G.gptq(w, h, fmt, shrink=1.5)


def test_blocksize_must_be_a_multiple_of_16(layer):
    w, _, h = layer
    with pytest.raises(ValueError, match="multiple"):
        G.gptq(w, h, G.nvfp4_format(), blocksize=24)


def test_hessian_cross_term_and_asymmetric_target():
    torch.manual_seed(3)
    ref = correlated_inputs(512, 64, rank=16)
    x = ref + 0.3 * torch.randn_like(ref)  # the same rows after a noisy (quantized) path
    h = G.Hessian(64, asymmetric=True)
    for xs, rs in zip(x.split(200), ref.split(200)):
        h.add(xs, rs)
    torch.testing.assert_close(h.h, 2 * x.T @ x / 512, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h.cross, 2 * (ref - x).T @ x / 512, rtol=1e-4, atol=1e-4)
    w = torch.randn(32, 64)
    target = G.asymmetric_target(w, h.h, h.cross, alpha=1.0, percdamp=1e-6)
    lstsq = torch.linalg.lstsq(x, ref @ w.T).solution.T  # the weight whose output on x best matches w on ref
    torch.testing.assert_close(target, lstsq, rtol=1e-2, atol=1e-2)
    assert torch.equal(G.asymmetric_target(w, h.h, h.cross, alpha=0.0), w)
    # GPTQ aimed at the target matches the reference outputs better than GPTQ aimed at w
    fmt = G.nvfp4_format("mse")
    err = {name: ((x @ G.gptq(t, h.h, fmt, act_order=True).dequantized.T - ref @ w.T) ** 2).mean()
           for name, t in (("plain", w), ("asymmetric", target))}
    assert err["asymmetric"] < 0.7 * err["plain"], err


def _hessian_error(w, q, h):
    d = w - q
    return ((d @ h) * d).sum(1)  # per row


def test_refit_block_scales_never_raises_a_rows_error_and_stays_in_range():
    """The refit keeps the codes and changes only block scales, each to an e4m3 value in the reference's range,
    and no row's ``(w - q) H (w - q)^T`` grows; awkward blocks (all zero, one huge element, tiny) included."""
    torch.manual_seed(5)
    x = correlated_inputs(512, 128, seed=5)
    h = hessian_of(x)
    w = torch.randn(40, 128)
    w[0, :16] = 0  # a zero block
    w[1, 16] = 1e3  # a block dominated by one element
    w[2, 32:48] *= 1e-6  # a tiny block
    q = G.gptq(w, h, G.nvfp4_format("mse"), act_order=True).quantized
    codes = nvfp4.unpack(q.packed)
    refit = G.refit_block_scales(w, codes, q.scales, q.global_scale, h)
    after = nvfp4.dequantize(nvfp4.NVFP4Tensor(q.packed, refit, q.global_scale))
    before_err, after_err = _hessian_error(w, nvfp4.dequantize(q), h), _hessian_error(w, after, h)
    assert (after_err <= before_err * (1 + 1e-5) + 1e-12).all()
    assert after_err.sum() < 0.98 * before_err.sum()
    values = refit.float()
    assert ((values >= nvfp4.F8_E4M3_MIN_SCALE) & (values <= nvfp4.F8_E4M3_MAX)).all()
    assert (refit.view(torch.uint8) != q.scales.view(torch.uint8)).any()


@pytest.mark.parametrize("rounds", [1, 2])
def test_refit_rounds_lower_the_error_gptq_aims_at_and_stay_exact(layer, rounds):
    w, _, h = layer
    fmt = G.nvfp4_format("mse")
    plain = G.gptq(w, h, fmt, act_order=True, shrink=0.5)
    refit = G.gptq(w, h, fmt, act_order=True, shrink=0.5, refit_rounds=rounds)
    assert torch.equal(nvfp4.dequantize(refit.quantized), refit.dequantized)
    shrunk = 0.5 * h + 0.5 * torch.diag(h.diagonal())  # the Hessian GPTQ and the refit both use
    assert G.output_error(w, refit.dequantized, shrunk) < G.output_error(w, plain.dequantized, shrunk)
    with pytest.raises(ValueError, match="refit_rounds"):
        G.gptq(w, h, fmt, refit_rounds=-1)
