"""Checkpoint interop: compressed-tensors export and import, ModelOpt import, and their errors.

The hand-built checkpoints follow the published conventions with a quantizer written here (not fp4compile's):
compressed-tensors stores ``global_scale = 2688 / amax`` and dequantizes as ``e2m1 * S / global_scale``;
ModelOpt stores ``weight_scale_2 = amax / 2688`` and dequantizes as ``e2m1 * S * weight_scale_2``.
"""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from fp4compile import format as nvfp4
from fp4compile import interop
from fp4compile.interop import CheckpointError
from fp4compile.modules import NVFP4Linear

E2M1 = torch.tensor(nvfp4.E2M1_VALUES)


class Tiny(nn.Module):
    """Embedding, q/k/v-like linears, an MLP with biases and a norm, and an lm_head."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(32, 64)
        self.q, self.k, self.v = (nn.Linear(64, 64, bias=False) for _ in range(3))
        self.up = nn.Linear(64, 128)
        self.norm = nn.LayerNorm(128)
        self.down = nn.Linear(128, 64)
        self.lm_head = nn.Linear(64, 32, bias=False)

    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.q(h) + self.k(h) + self.v(h)
        return self.lm_head(h + self.down(self.norm(self.up(h))))


def quantize_layers(model, names, scheme="nvfp4a16", static=False):
    for name in names:
        lin = model.get_submodule(name)
        act = torch.tensor(0.01) if static else None
        setattr(model, name, NVFP4Linear.from_linear(lin, nvfp4.quantize(lin.weight.detach()), scheme=scheme,
                                                     input_global_scale=act))
    return model


def tensors_of(path):
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def one_ulp_apart(a, b):
    return torch.equal(a, b) or torch.equal(torch.nextafter(a, b), b)


# ---------------------------------------------------------------------------------------- our own writer


@pytest.mark.parametrize("scheme,static", [("nvfp4a16", False), ("nvfp4", True), ("nvfp4", False)])
def test_round_trip(tmp_path, scheme, static):
    model = quantize_layers(Tiny(), ["q", "up", "down"], scheme, static)
    interop.save_compressed_tensors(model, tmp_path)

    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["format"]) == ("compressed-tensors", "nvfp4-pack-quantized")
    (group,) = qc["config_groups"].values()
    assert group["targets"] == ["Linear"] and sorted(qc["ignore"]) == ["k", "lm_head", "v"]
    w = group["weights"]
    assert (w["num_bits"], w["type"], w["strategy"], w["group_size"], w["symmetric"], w["dynamic"]) == \
        (4, "float", "tensor_group", 16, True, False)
    act = group["input_activations"]
    assert act is None if scheme == "nvfp4a16" else act["dynamic"] == ("local" if static else True)

    saved = tensors_of(tmp_path)
    assert saved["q.weight_packed"].dtype == torch.uint8 and saved["q.weight_packed"].shape == (64, 32)
    assert saved["q.weight_scale"].dtype == torch.float8_e4m3fn and saved["q.weight_scale"].shape == (64, 4)
    assert saved["q.weight_global_scale"].shape == (1,)
    assert torch.equal(saved["q.weight_global_scale"], model.q.weight_global_scale.reciprocal().reshape(1))
    assert ("q.input_global_scale" in saved) == static
    assert "q.weight" not in saved and torch.equal(saved["k.weight"], model.k.weight)

    fresh = Tiny(seed=1)
    report = interop.load_external(fresh, tmp_path)
    assert report.format == "compressed-tensors" and report.layers == dict.fromkeys(["down", "q", "up"], scheme)
    for name in ("q", "up", "down"):
        a, b = model.get_submodule(name), fresh.get_submodule(name)
        assert isinstance(b, NVFP4Linear) and b.scheme == scheme
        assert torch.equal(a.weight_packed, b.weight_packed) and torch.equal(a.weight_scales, b.weight_scales)
        assert one_ulp_apart(a.weight_global_scale, b.weight_global_scale)
        assert (b.input_global_scale is None) == (not static)
    for key, value in model.state_dict().items():
        if "global_scale" not in key:
            assert torch.equal(value, fresh.state_dict()[key]), key
    ids = torch.randint(0, 32, (2, 5))
    torch.testing.assert_close(fresh(ids), model(ids), rtol=1e-5, atol=1e-5)


def test_mixed_schemes_get_one_group_each(tmp_path):
    model = quantize_layers(quantize_layers(Tiny(), ["q", "k"], "nvfp4", static=True), ["up"], "nvfp4a16")
    interop.save_compressed_tensors(model, tmp_path)
    groups = json.loads((tmp_path / "config.json").read_text())["quantization_config"]["config_groups"]
    assert sorted(sorted(g["targets"]) for g in groups.values()) == [["k", "q"], ["up"]]
    fresh = Tiny()
    assert interop.load_external(fresh, tmp_path).layers == {"k": "nvfp4", "q": "nvfp4", "up": "nvfp4a16"}


def test_hf_config_is_merged(tmp_path):
    class Config:
        def to_dict(self):
            return {"model_type": "tiny", "hidden_size": 64}

    model = quantize_layers(Tiny(), ["q"])
    model.config = Config()
    interop.save_compressed_tensors(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "tiny" and config["hidden_size"] == 64 and "quantization_config" in config


def test_tied_tensors_are_written_once(tmp_path):
    model = quantize_layers(Tiny(), ["q"])
    model.lm_head = nn.Linear(64, 32, bias=False)
    model.lm_head.weight = nn.Parameter(torch.randn(32, 64))
    model.embed.weight = model.lm_head.weight
    interop.save_compressed_tensors(model, tmp_path)
    assert "lm_head.weight" not in tensors_of(tmp_path)
    fresh = Tiny()
    fresh.embed.weight = fresh.lm_head.weight
    interop.load_external(fresh, tmp_path)
    assert torch.equal(fresh.lm_head.weight, model.lm_head.weight)


def test_nothing_to_export():
    with pytest.raises(ValueError, match="no NVFP4Linear"):
        interop.quantization_config(Tiny())


# ------------------------------------------------------------------- checkpoints built by the published rules


def convention_quantize(w: torch.Tensor, amax: torch.Tensor, style: str):
    """Quantize ``w`` [N, K] against the global ``amax`` as compressed-tensors (``"ct"``: global scale
    2688 / amax, divided out) or ModelOpt (``"modelopt"``: global scale amax / 2688, multiplied in) do.
    Returns packed uint8, e4m3 block scales and the global scale as that tool stores it."""
    g = (2688 / amax if style == "ct" else amax / 2688).float().reshape(())
    step = (lambda s: s / g) if style == "ct" else (lambda s: s * g)
    blocks = w.float().unflatten(-1, (-1, 16))
    scales = (blocks.abs().amax(-1) / 6 * (g if style == "ct" else 1 / g)).clamp(2**-9, 448)
    scales = scales.to(torch.float8_e4m3fn)
    y = (blocks / step(scales.float()).unsqueeze(-1)).clamp(-6, 6)
    codes = (y.abs().unsqueeze(-1) - E2M1).abs().argmin(-1) | (torch.signbit(y).long() << 3)
    codes = codes.flatten(-2).to(torch.uint8)
    return codes[:, 0::2] | (codes[:, 1::2] << 4), scales, g


def e2m1_times_scale(packed, scales):
    """``e2m1 * S`` per element, fp32 (exact): the part both tools share before the global scale."""
    codes = torch.stack((packed & 15, packed >> 4), -1).flatten(-2).long()
    values = (E2M1[codes & 7] * torch.where(codes >= 8, -1.0, 1.0)).unflatten(-1, (-1, 16))
    return (values * scales.float().unsqueeze(-1)).flatten(-2)


def unquantized_tensors(model, names):
    return {k: v for k, v in model.state_dict().items() if k not in {f"{n}.weight" for n in names}}


def write_checkpoint(path, tensors, config=None, hf_quant=None):
    path.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    if hf_quant is not None:
        (path / "hf_quant_config.json").write_text(json.dumps(hf_quant))


NVFP4_ARGS = {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16, "symmetric": True}


def ct_config(weight_only=False, dynamic="local"):
    group = {"targets": ["Linear"], "format": "nvfp4-pack-quantized", "weights": dict(NVFP4_ARGS, dynamic=False),
             "input_activations": None if weight_only else dict(NVFP4_ARGS, dynamic=dynamic)}
    return {"model_type": "tiny", "quantization_config": {
        "quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": group}, "ignore": ["lm_head"]}}


def ct_tensors(model, names, shared=(), act_amax=4.0):
    """compressed-tensors tensors for the layers ``names`` (those in ``shared`` share one global scale, as
    llm-compressor fuses q/k/v) plus every other tensor of ``model``."""
    tensors = unquantized_tensors(model, names)
    shared_amax = max(model.get_submodule(n).weight.detach().abs().amax() for n in shared) if shared else None
    for name in names:
        w = model.get_submodule(name).weight.detach()
        packed, scales, gs = convention_quantize(w, shared_amax if name in shared else w.abs().amax(), "ct")
        tensors |= {f"{name}.weight_packed": packed, f"{name}.weight_scale": scales,
                    f"{name}.weight_global_scale": gs.reshape(1),
                    f"{name}.input_global_scale": (2688 / torch.tensor([act_amax])).float()}
    return tensors


def modelopt_tensors(model, names, act_amax=4.0):
    tensors = unquantized_tensors(model, names)
    for name in names:
        w = model.get_submodule(name).weight.detach()
        packed, scales, pts = convention_quantize(w, w.abs().amax(), "modelopt")
        tensors |= {f"{name}.weight": packed, f"{name}.weight_scale": scales, f"{name}.weight_scale_2": pts,
                    f"{name}.input_scale": torch.tensor(act_amax / 2688)}
    return tensors


LAYERS = ["q", "k", "v", "up", "down"]


def test_compressed_tensors_checkpoint_loads_and_runs(tmp_path):
    source = Tiny()
    tensors = ct_tensors(source, LAYERS)
    write_checkpoint(tmp_path, tensors, ct_config())
    assert interop.detect_format(tmp_path) == "compressed-tensors"

    model = Tiny(seed=1)
    assert interop.load_external(model, tmp_path).layers == dict.fromkeys(LAYERS, "nvfp4")
    x = torch.randn(3, 64)
    for name in LAYERS:
        layer = model.get_submodule(name)
        packed, scales, gs = (tensors[f"{name}.{s}"] for s in ("weight_packed", "weight_scale", "weight_global_scale"))
        assert torch.equal(layer.weight_packed, packed) and torch.equal(layer.weight_scales, scales.view(torch.uint8))
        assert torch.equal(layer.weight_global_scale, gs.reciprocal().reshape(()))
        assert torch.equal(layer.input_global_scale, tensors[f"{name}.input_global_scale"].reciprocal().reshape(()))
        # pts = 1/gs rounds once: the weight equals compressed-tensors' own e2m1 * S / gs to within one ulp.
        w_ct = e2m1_times_scale(packed, scales) / gs
        w_ours = nvfp4.dequantize(layer.quantized_weight)
        torch.testing.assert_close(w_ours, w_ct, rtol=2**-23, atol=0)
        if name != "down":
            x_q = nvfp4.fake_quantize(x, layer.input_global_scale)
            torch.testing.assert_close(layer(x), x_q @ w_ours.t() + (0 if layer.bias is None else layer.bias),
                                       rtol=0, atol=0)
    assert torch.equal(model.embed.weight, source.embed.weight) and torch.equal(model.up.bias, source.up.bias)
    assert type(model.lm_head) is nn.Linear and torch.equal(model.lm_head.weight, source.lm_head.weight)
    ids = torch.randint(0, 32, (2, 5))
    assert torch.isfinite(model(ids)).all()


def test_compressed_tensors_weight_only(tmp_path):
    source = Tiny()
    write_checkpoint(tmp_path, ct_tensors(source, ["up"]), ct_config(weight_only=True))
    model = Tiny(seed=1)
    assert interop.load_external(model, tmp_path).layers == {"up": "nvfp4a16"}
    x = torch.randn(3, 64)
    w = nvfp4.dequantize(model.up.quantized_weight)
    assert model.up.input_global_scale is None
    torch.testing.assert_close(model.up(x), x @ w.t() + model.up.bias, rtol=0, atol=0)


def test_shared_global_scale_loads_as_given(tmp_path):
    tensors = ct_tensors(Tiny(), ["q", "k", "v"], shared=("q", "k", "v"))
    write_checkpoint(tmp_path, tensors, ct_config())
    model = Tiny()
    interop.load_external(model, tmp_path)
    gs = tensors["q.weight_global_scale"]
    assert torch.equal(tensors["k.weight_global_scale"], gs) and torch.equal(tensors["v.weight_global_scale"], gs)
    for name in ("q", "k", "v"):
        assert torch.equal(model.get_submodule(name).weight_global_scale, gs.reciprocal().reshape(()))


@pytest.mark.parametrize("where", ["hf_quant_config", "config"])
def test_modelopt_checkpoint_loads_and_runs(tmp_path, where):
    source = Tiny()
    tensors = modelopt_tensors(source, LAYERS)
    section = {"quant_algo": "NVFP4", "group_size": 16, "kv_cache_quant_algo": None, "exclude_modules": ["lm_head"]}
    if where == "hf_quant_config":
        write_checkpoint(tmp_path, tensors, {"model_type": "tiny"},
                         {"producer": {"name": "modelopt"}, "quantization": section})
    else:
        write_checkpoint(tmp_path, tensors, {"quantization_config": {"quant_method": "modelopt", **section}})
    assert interop.detect_format(tmp_path) == "modelopt"

    model = Tiny(seed=1)
    assert interop.load_external(model, tmp_path).layers == dict.fromkeys(LAYERS, "nvfp4")
    x = torch.randn(3, 64)
    for name in LAYERS:
        layer = model.get_submodule(name)
        assert torch.equal(layer.weight_packed, tensors[f"{name}.weight"])
        assert torch.equal(layer.weight_scales, tensors[f"{name}.weight_scale"].view(torch.uint8))
        assert torch.equal(layer.weight_global_scale, tensors[f"{name}.weight_scale_2"])  # same direction: exact
        assert torch.equal(layer.input_global_scale, tensors[f"{name}.input_scale"])
        w = e2m1_times_scale(tensors[f"{name}.weight"], tensors[f"{name}.weight_scale"]) * layer.weight_global_scale
        assert torch.equal(nvfp4.dequantize(layer.quantized_weight), w)
        if name != "down":
            x_q = nvfp4.fake_quantize(x, layer.input_global_scale)
            bias = 0 if layer.bias is None else layer.bias
            torch.testing.assert_close(layer(x), x_q @ w.t() + bias, rtol=0, atol=0)


def test_modelopt_weight_only(tmp_path):
    tensors = modelopt_tensors(Tiny(), ["up"])
    write_checkpoint(tmp_path, tensors, {}, {"quantization": {"quant_algo": "W4A16_NVFP4", "group_size": 16}})
    model = Tiny()
    assert interop.load_external(model, tmp_path).layers == {"up": "nvfp4a16"}
    assert model.up.input_global_scale is None


def test_detect_format_of_plain_checkpoint(tmp_path):
    write_checkpoint(tmp_path, Tiny().state_dict(), {"model_type": "tiny"})
    assert interop.detect_format(tmp_path) is None
    with pytest.raises(CheckpointError, match="neither"):
        interop.load_external(Tiny(), tmp_path)


# ---------------------------------------------------------------------------------------------------- errors


def load_broken_ct(tmp_path, edit, config=None):
    tensors = ct_tensors(Tiny(), ["q", "up"])
    edit(tensors)
    write_checkpoint(tmp_path, tensors, config or ct_config())
    interop.load_external(Tiny(), tmp_path)


def test_wrong_packed_shape_names_the_layer(tmp_path):
    with pytest.raises(CheckpointError, match=r"'up packed weight' has shape \(128, 16\), expected \(128, 32\)"):
        load_broken_ct(tmp_path, lambda t: t.update({"up.weight_packed": t["up.weight_packed"][:, :16]}))


def test_missing_block_scale_names_the_tensor(tmp_path):
    with pytest.raises(CheckpointError, match="'q.weight_scale' is missing"):
        load_broken_ct(tmp_path, lambda t: t.pop("q.weight_scale"))


def test_missing_static_input_scale_names_the_tensor(tmp_path):
    with pytest.raises(CheckpointError, match="'up.input_global_scale' is missing"):
        load_broken_ct(tmp_path, lambda t: t.pop("up.input_global_scale"))


def test_fully_dynamic_activations_need_no_input_scale(tmp_path):
    tensors = ct_tensors(Tiny(), ["up"])
    tensors.pop("up.input_global_scale")
    write_checkpoint(tmp_path, tensors, ct_config(dynamic=True))
    model = Tiny()
    interop.load_external(model, tmp_path)
    assert model.up.scheme == "nvfp4" and model.up.input_global_scale is None


def test_block_scales_of_wrong_dtype(tmp_path):
    with pytest.raises(CheckpointError, match="'q block scales' has dtype torch.uint8"):
        load_broken_ct(tmp_path, lambda t: t.update({"q.weight_scale": t["q.weight_scale"].view(torch.uint8)}))


def test_global_scale_with_several_values(tmp_path):
    with pytest.raises(CheckpointError, match="'q.weight_global_scale' should hold one float"):
        load_broken_ct(tmp_path, lambda t: t.update({"q.weight_global_scale": torch.ones(3)}))


def test_unmatched_tensor_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="'q.k_scale' matches nothing"):
        load_broken_ct(tmp_path, lambda t: t.update({"q.k_scale": torch.ones(1)}))


def test_missing_model_tensor_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="'norm.weight' is missing"):
        load_broken_ct(tmp_path, lambda t: t.pop("norm.weight"))


def test_wrong_shape_of_plain_tensor(tmp_path):
    with pytest.raises(CheckpointError, match=r"'embed.weight' has shape \(8, 64\), expected \(32, 64\)"):
        load_broken_ct(tmp_path, lambda t: t.update({"embed.weight": t["embed.weight"][:8]}))


def test_quantized_layer_that_is_not_linear(tmp_path):
    def edit(t):
        t["norm.weight_packed"] = torch.zeros(1, 8, dtype=torch.uint8)
    with pytest.raises(CheckpointError, match="'norm', a LayerNorm"):
        load_broken_ct(tmp_path, edit)


def test_layer_the_model_lacks(tmp_path):
    with pytest.raises(CheckpointError, match="layer 'gate', which the model does not have"):
        load_broken_ct(tmp_path, lambda t: t.update({"gate.weight_packed": t["q.weight_packed"].clone()}))


def test_ignored_layer_with_packed_weight(tmp_path):
    config = ct_config()
    config["quantization_config"]["ignore"].append("q")
    with pytest.raises(CheckpointError, match="'q' is in quantization_config.ignore"):
        load_broken_ct(tmp_path, lambda t: None, config)


def test_compressed_tensors_format_that_is_not_nvfp4(tmp_path):
    config = ct_config()
    config["quantization_config"]["config_groups"]["group_0"].update(
        format="pack-quantized", weights={"num_bits": 4, "type": "int", "group_size": 128})
    with pytest.raises(CheckpointError, match="'group_0' .* is not NVFP4"):
        load_broken_ct(tmp_path, lambda t: None, config)


def test_modelopt_algorithm_that_is_not_nvfp4(tmp_path):
    write_checkpoint(tmp_path, modelopt_tensors(Tiny(), ["up"]), {}, {"quantization": {"quant_algo": "FP8"}})
    with pytest.raises(CheckpointError, match="quant_algo 'FP8'"):
        interop.load_external(Tiny(), tmp_path)


def test_modelopt_missing_input_scale(tmp_path):
    tensors = modelopt_tensors(Tiny(), ["up"])
    tensors.pop("up.input_scale")
    write_checkpoint(tmp_path, tensors, {}, {"quantization": {"quant_algo": "NVFP4", "group_size": 16}})
    with pytest.raises(CheckpointError, match="'up.input_scale' is missing"):
        interop.load_external(Tiny(), tmp_path)
