"""Channel smoothing (fp4compile.smooth): folds into normalizations that keep the model's function (bit for bit with
powers of two), outliers moved into the weights, undone when a normalization feeds more than its linears, and its
place in calibrate()."""

import pytest
import torch
from torch import nn

from fp4compile.calibrate import calibrate, eligible_linears
from fp4compile.smooth import FP32_TOLERANCE, factors, smooth
from test_calibrate import tiny_lm, token_batches


def outlier_lm(seed: int = 0):
    """tiny_lm with a few embedding channels 30x larger: activation outliers for the linears after the norms."""
    model = tiny_lm(seed)
    with torch.no_grad():
        for layer in model.layers:
            layer.norm1.weight[[3, 17, 40]] *= 30.0
            layer.norm2.weight[[5, 33]] *= 30.0
    return model


def runs_of(model, data):
    return [lambda ids=ids: model(ids) for ids in data]


def test_factors_are_clamped_and_rounded_to_powers_of_two_on_request():
    x = torch.tensor([4.0, 1e-3, 0.0, 1e12, 2.0])
    w = torch.tensor([1.0, 1.0, 1.0, 1e-12, 0.0])
    assert torch.allclose(factors(x, w, 0.5, power_of_two=False)[:2], torch.tensor([2.0, 1e-3**0.5]))
    s = factors(x, w, 0.5, power_of_two=True)
    assert torch.equal(torch.exp2(torch.log2(s).round()), s)
    assert s[0] == 2.0 and s[1] == 2.0**-5  # sqrt(4) / sqrt(1); sqrt(1e-3) is about 2**-4.98
    assert s[2] == 1.0 and s[4] == 1.0  # dead channel on either side
    assert s[3] == 2.0**20  # clamped
    assert torch.equal(factors(x, w, 0.0, power_of_two=True)[:2], torch.tensor([1.0, 1.0]))


@torch.no_grad()
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=("fp32", "bf16"))
def test_smoothing_keeps_the_model_and_moves_outliers(dtype):
    """fp32: factors as computed, the output equal up to rounding; lower precision: powers of two, bit for bit."""
    model, data = outlier_lm().to(dtype), token_batches(4)
    ref = [model(ids) for ids in data]
    linears, _ = eligible_linears(model)
    spread_before = _input_spread(model, data)
    report = smooth(model, linears, runs_of(model, data), 0.5)
    assert report.folded == {f"layers.{i}.{norm}": names for i in range(3) for norm, names in
                             (("norm1", [f"layers.{i}.q", f"layers.{i}.k", f"layers.{i}.v"]),
                              ("norm2", [f"layers.{i}.up"]))}
    assert not any(name.startswith("layers.") for name in report.skipped)
    assert report.power_of_two == (dtype != torch.float32)
    for ids, out in zip(data, ref):
        if dtype == torch.float32:
            assert (model(ids) - out).abs().max() <= FP32_TOLERANCE * out.abs().max()
            assert not torch.equal(model(ids), out)  # the unrounded factors do move the rounding
        else:
            assert torch.equal(model(ids), out)
    assert _input_spread(model, data) < spread_before / 4


def _input_spread(model, data) -> float:
    """Largest over the q inputs of (max channel amax / median channel amax)."""
    amax = []
    hooks = [layer.q.register_forward_pre_hook(lambda m, args: amax.append(args[0].abs().flatten(0, 1).amax(0)))
             for layer in model.layers]
    for ids in data:
        model(ids)
    for h in hooks:
        h.remove()
    return max(float(a.float().max() / a.float().median()) for a in amax)


class NormLinear(nn.Module):
    """An RMSNorm into a linear, plus ``extra(normed)``: something else that reads the norm's output, or noise."""

    def __init__(self, extra):
        super().__init__()
        self.norm = nn.RMSNorm(32)
        self.lin = nn.Linear(32, 32)
        self.extra = extra

    def forward(self, x):
        y = self.norm(x)
        return self.lin(y) + self.extra(y)


@torch.no_grad()
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=("fp32", "bf16"))
def test_smoothing_is_undone_when_a_norm_feeds_more_than_linears(dtype):
    """Undone exactly with powers of two (bf16); up to a few ulps with fp32's unrounded factors."""
    torch.manual_seed(0)
    model = NormLinear(lambda y: y.sum(-1, keepdim=True))  # folding into the norm would change this sum
    nn.init.uniform_(model.norm.weight, 0.5, 4.0)
    model = model.to(dtype)
    data = [(torch.randn(3, 32) * torch.linspace(0.1, 10, 32)).to(dtype) for _ in range(2)]
    ref = [model(x) for x in data]
    weights = (model.norm.weight.clone(), model.lin.weight.clone())
    report = smooth(model, {"lin": model.lin}, [lambda x=x: model(x) for x in data], 0.5)
    assert report.folded == {} and "undone" in report.skipped["norm"]
    rtol = 1e-6 if dtype == torch.float32 else 0.0
    assert torch.allclose(model.norm.weight, weights[0], rtol=rtol, atol=0)
    assert torch.allclose(model.lin.weight, weights[1], rtol=rtol, atol=0)
    for x, out in zip(data, ref):
        assert torch.allclose(model(x), out, rtol=10 * rtol, atol=10 * rtol)


def test_calibrate_smooths_nvfp4_by_default():
    data = token_batches(3)
    model = outlier_lm()
    report = calibrate(model, data, scheme="nvfp4", progress=False)
    assert len(report.smoothing.folded) == 6 and "6 normalizations smoothed" in report.summary()
    assert calibrate(outlier_lm(), data, scheme="nvfp4a16", progress=False).smoothing is None
    assert calibrate(outlier_lm(), data, scheme="nvfp4", smooth=0.0, progress=False).smoothing is None
    with pytest.raises(ValueError, match="smooth must be in"):
        calibrate(outlier_lm(), data, scheme="nvfp4", smooth=1.5, progress=False)


@torch.no_grad()
def test_smoothing_needs_a_reproducible_output():
    model = NormLinear(lambda y: torch.rand(()))
    weight = model.lin.weight.clone()
    x = torch.randn(3, 32) * torch.linspace(0.1, 10, 32)
    report = smooth(model, {"lin": model.lin}, [lambda: model(x)], 0.5)
    assert report.folded == {} and "differs between two runs" in report.skipped["norm"]
    assert torch.equal(model.lin.weight, weight)
