"""Block output tuning (``fp4compile.tune``): positions and codes, the tuned layer's numbers, what tuning may change,
and that it lowers a calibrated model's error."""

import copy
import importlib

import pytest
import torch

from fp4compile import format as nvfp4
from fp4compile import tune
from fp4compile.calibrate import calibrate
from fp4compile.modules import NVFP4Linear
from test_calibrate import rel_err, tiny_lm, token_batches

C = importlib.import_module("fp4compile.calibrate")  # the module: the package's ``calibrate`` is the function


def test_positions_and_codes_stand_for_the_same_values():
    codes = torch.arange(16, dtype=torch.uint8)
    positions = tune.signed_codes(codes)
    assert positions.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 0, -1, -2, -3, -4, -5, -6, -7]
    assert torch.equal(nvfp4.e2m1_to_float(tune.codes_of(positions)), nvfp4.e2m1_to_float(codes))
    assert torch.equal(tune.codes_of(torch.tensor([-7.4, -0.3, 0.4, 6.6, 9.0])),
                       torch.tensor([15, 0, 0, 7, 7], dtype=torch.uint8))


def _layer(scheme: str = "nvfp4a16", seed: int = 0) -> tuple[NVFP4Linear, torch.Tensor]:
    torch.manual_seed(seed)
    linear = torch.nn.Linear(64, 24)
    w = linear.weight.detach() * torch.logspace(-3, 0, 64)  # columns over three decades: small and tied values
    w[0, :16] = 0.0
    linear.weight.data.copy_(w)
    return NVFP4Linear.from_linear(linear, nvfp4.quantize(w), scheme=scheme), w


@pytest.mark.parametrize("scheme", ["nvfp4a16", "nvfp4"])
def test_tuned_layer_starts_as_the_quantized_one(scheme):
    """Before any step the tuned layer's weight is the dequantized NVFP4 weight bit for bit, its output the layer's,
    and each start position lies less than half a step from the stored code."""
    layer, w = _layer(scheme)
    tuned = tune._TunedLinear(layer, w)
    assert torch.equal(tuned.weight(), nvfp4.dequantize(layer.quantized_weight))
    x = torch.randn(5, 64)
    assert torch.equal(tuned(x), layer(x))
    start = tune.signed_codes(nvfp4.unpack(layer.weight_packed))
    assert (tuned.z - start).abs().max() < 0.5
    assert (tuned.z - start).abs().max() > 0.3  # the offsets are the original weight's, not all zero


def test_tuned_layer_gradient_follows_the_grid():
    """The gradient of the weight in a position is the grid's slope there times the scales (straight through)."""
    layer, w = _layer()
    tuned = tune._TunedLinear(layer, w)
    with torch.no_grad():
        tuned.z.copy_(torch.full_like(tuned.z, 4.6))  # between codes 4 and 5 (values 2 and 3): slope 1
        tuned.z[:, :16] = -1.2  # between -1 and -2 (values -0.5 and -1): slope 0.5
    tuned.weight().sum().backward()
    scale = layer.quantized_weight.scales.float().repeat_interleave(16, dim=-1) * layer.weight_global_scale
    torch.testing.assert_close(tuned.z.grad[:, 16:], scale[:, 16:])
    torch.testing.assert_close(tuned.z.grad[:, :16], 0.5 * scale[:, :16])


def _calibrated(scheme: str, steps: int):
    model, data = tiny_lm(), token_batches(8)
    report = calibrate(model, data, scheme=scheme, tune_steps=steps, progress=False)
    return model, report


@pytest.mark.parametrize("scheme", ["nvfp4a16", "nvfp4"])
def test_tuning_moves_codes_one_step_at_most_and_keeps_the_scales(monkeypatch, scheme):
    """Each block's codes after tuning against those GPTQ gave it: at most one step apart, some moved; the block
    scales and global scales are GPTQ's."""
    seen = []

    def recording(name, block, originals, *args, **kwargs):
        layers = {n: block.get_submodule(n) for n in originals}
        before = {n: (m.weight_packed.clone(), m.weight_scales.clone(), m.weight_global_scale.clone())
                  for n, m in layers.items()}
        result = tune.tune_block(name, block, originals, *args, **kwargs)
        seen.append((result, layers, before))
        return result

    monkeypatch.setattr(C, "tune_block", recording)
    _, report = _calibrated(scheme, 32)
    assert [r for r, _, _ in seen] == report.tuning and len(seen) == 3
    assert all(r.kept and r.error_after < r.error_before for r in report.tuning)
    assert "3 of 3 blocks tuned" in report.summary()
    moved = 0
    for _, layers, before in seen:
        for n, layer in layers.items():
            packed, scales, global_scale = before[n]
            assert torch.equal(layer.weight_scales, scales)
            assert torch.equal(layer.weight_global_scale, global_scale)
            step = tune.signed_codes(nvfp4.unpack(layer.weight_packed)) - tune.signed_codes(nvfp4.unpack(packed))
            assert step.abs().max() <= 1
            moved += int((step != 0).sum())
    assert moved > 0


@pytest.mark.parametrize("scheme", ["nvfp4a16", "nvfp4"])
def test_tuning_lowers_the_error_on_new_inputs(scheme):
    """On inputs the calibration did not see, the tuned tiny model is closer to the unquantized one."""
    reference = tiny_lm()
    errors = {}
    for steps in (0, 64):
        model, _ = _calibrated(scheme, steps)
        with torch.no_grad():
            errors[steps] = sum(rel_err(model(x), reference(x)) for x in token_batches(4, seed=7))
    assert errors[64] < 0.9 * errors[0]


def test_tuning_that_does_not_help_is_not_kept():
    """A block whose targets are its own quantized outputs has nothing to gain (error 0 before, up to the fp32 sum
    order of the two matmul paths, which differs between CPUs): the tuned codes are dropped and the layers keep
    GPTQ's."""
    model, _ = _calibrated("nvfp4a16", 0)
    block = model.layers[1]
    inputs = [((torch.randn(1, 12, 64),), {}) for _ in range(4)]
    with torch.no_grad():
        targets = [block(*args)[0] for args, _ in inputs]
    names = [n for n, m in block.named_modules() if isinstance(m, NVFP4Linear)]
    packed = {n: block.get_submodule(n).weight_packed.clone() for n in names}
    originals = {n: torch.randn(block.get_submodule(n).out_features, block.get_submodule(n).in_features)
                 for n in names}
    result = tune.tune_block("layers.1", block, originals, inputs, targets, steps=8)
    assert result.error_before < 1e-12 and result.error_after > result.error_before and not result.kept
    assert all(torch.equal(block.get_submodule(n).weight_packed, packed[n]) for n in names)
    assert all(isinstance(block.get_submodule(n), NVFP4Linear) for n in names)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_tuning_aims_between_the_unquantized_block_and_model(monkeypatch, alpha):
    """With ``tune_alpha`` 0 the first block's targets are the unquantized block's outputs on the inputs it gets
    (after the quantized ``proj``); with 1 they are the unquantized model's hidden states after that block."""
    seen = {}

    def recording(name, block, originals, inputs, targets, *args, **kwargs):
        seen.setdefault(name, (inputs, targets))
        return tune.tune_block(name, block, originals, inputs, targets, *args, **kwargs)

    monkeypatch.setattr(C, "tune_block", recording)
    reference, data = tiny_lm(), token_batches(3)
    calibrate(tiny_lm(), data, scheme="nvfp4a16", tune_steps=2, tune_alpha=alpha, progress=False)
    inputs, targets = seen["layers.0"]
    with torch.no_grad():
        if alpha == 0.0:
            expect = [reference.layers[0](*args, **kwargs)[0] for args, kwargs in inputs]
        else:
            expect = []
            for ids in data:
                x = reference.embed(ids)
                expect.append(reference.layers[0](x + reference.odd_proj(reference.proj(x)))[0])
    for t, e in zip(targets, expect):
        torch.testing.assert_close(t, e, rtol=0, atol=0)


def test_tune_settings_are_checked():
    with pytest.raises(ValueError, match="tune_steps"):
        calibrate(copy.deepcopy(tiny_lm()), token_batches(2), tune_steps=-1, progress=False)
    with pytest.raises(ValueError, match="tune_alpha"):
        calibrate(copy.deepcopy(tiny_lm()), token_batches(2), tune_steps=1, tune_alpha=1.5, progress=False)
    with pytest.warns(UserWarning, match="tune_steps is ignored"):
        report = calibrate(copy.deepcopy(tiny_lm()), token_batches(2), tune_steps=1, sequential=False, progress=False)
    assert report.tuning == []
