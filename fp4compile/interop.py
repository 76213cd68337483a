"""NVFP4 checkpoints of other tools: write compressed-tensors, read compressed-tensors and ModelOpt.

compressed-tensors ("nvfp4-pack-quantized", written by llm-compressor, read by vLLM), per quantized layer:

    <layer>.weight_packed        uint8 [N, K/2]          low nibble = even element (our layout)
    <layer>.weight_scale         float8_e4m3fn [N, K/16]
    <layer>.weight_global_scale  fp32 [1]                = 2688 / amax = 1 / pts   (the RECIPROCAL of pts)
    <layer>.input_global_scale   fp32 [1]                = 1 / activation pts      (when the scale is static)

ModelOpt (``hf_quant_config.json`` or ``quantization_config.quant_algo`` NVFP4 / W4A16_NVFP4), per layer:

    <layer>.weight               uint8 [N, K/2]
    <layer>.weight_scale         float8_e4m3fn [N, K/16]
    <layer>.weight_scale_2       fp32 [] or [1]          = amax / 2688 = pts
    <layer>.input_scale          fp32 [] or [1]          = activation amax / 2688 (W4A4 only)

Import keeps the checkpoint's numbers: packed values and block scales are copied bit for bit, ModelOpt's scales
are pts already, and compressed-tensors' reciprocals become ``pts = fp32(1 / global_scale)``. That division
rounds once: it is exact when the global scale is a power of two, otherwise ``1 / (1 / pts)`` can miss ``pts``
by one ulp (about 14% of random fp32 values), so a compressed-tensors round trip keeps every packed byte and
block scale and each global scale to within one ulp (2**-23 relative).
"""

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from . import format as nvfp4
from .checkpoint import CheckpointError, LoadResult
from .modules import NVFP4Linear

COMPRESSED_TENSORS = "compressed-tensors"
MODELOPT = "modelopt"
CT_FORMAT = "nvfp4-pack-quantized"
MODELOPT_ALGOS = {"NVFP4": "nvfp4", "W4A16_NVFP4": "nvfp4a16"}
WEIGHTS_FILE = "model.safetensors"
_CT_SUFFIXES = ("weight_packed", "weight_scale", "weight_global_scale", "input_global_scale")
_MODELOPT_SUFFIXES = ("weight", "weight_scale", "weight_scale_2", "input_scale")
_OUR_BUFFERS = ("weight_packed", "weight_scales", "weight_global_scale", "input_global_scale")


# ---------------------------------------------------------------------------------------------------- writing


def _weight_args() -> dict:
    return {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": nvfp4.BLOCK_SIZE,
            "symmetric": True, "dynamic": False, "observer": None}


def _input_args(static: bool) -> dict:
    # "local": block scales computed at run time, global scale calibrated (stored); True: both at run time.
    return {**_weight_args(), "dynamic": "local" if static else True}


def _group_key(layer: NVFP4Linear) -> tuple[str, bool]:
    return layer.scheme, layer.scheme == "nvfp4" and layer.input_global_scale is not None


def quantization_config(model: nn.Module) -> dict:
    """The ``quantization_config`` entry of config.json describing ``model``'s NVFP4Linear layers."""
    groups: dict[tuple[str, bool], list[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, NVFP4Linear):
            groups.setdefault(_group_key(module), []).append(name)
    if not groups:
        raise ValueError("the model has no NVFP4Linear layers to export: calibrate or load it first")
    config_groups = {}
    for i, ((scheme, static), names) in enumerate(groups.items()):
        config_groups[f"group_{i}"] = {
            "targets": ["Linear"] if len(groups) == 1 else names,
            "weights": _weight_args(),
            "input_activations": _input_args(static) if scheme == "nvfp4" else None,
            "output_activations": None,
            "format": CT_FORMAT,
        }
    ignore = [name for name, module in model.named_modules() if type(module) is nn.Linear]
    return {"quant_method": COMPRESSED_TENSORS, "format": CT_FORMAT, "quantization_status": "compressed",
            "config_groups": config_groups, "ignore": ignore, "kv_cache_scheme": None, "sparsity_config": {}}


def _reciprocal(pts: torch.Tensor) -> torch.Tensor:
    return pts.detach().float().reciprocal().reshape(1)


def _layer_tensors(name: str, layer: NVFP4Linear) -> dict[str, torch.Tensor]:
    out = {f"{name}.weight_packed": layer.weight_packed,
           f"{name}.weight_scale": layer.weight_scales.view(torch.float8_e4m3fn),
           f"{name}.weight_global_scale": _reciprocal(layer.weight_global_scale)}
    if layer.scheme == "nvfp4" and layer.input_global_scale is not None:
        out[f"{name}.input_global_scale"] = _reciprocal(layer.input_global_scale)
    return out


def compressed_tensors_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s tensors under compressed-tensors names; a tensor shared by several names is kept once."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, NVFP4Linear)}
    ours = {f"{name}.{b}" for name in layers for b in _OUR_BUFFERS}
    state: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, tuple[int, ...], torch.dtype]] = set()
    for key, t in model.state_dict(keep_vars=False).items():
        alias = (t.data_ptr(), tuple(t.shape), t.dtype)
        if key in ours or (t.numel() and alias in seen):
            continue
        seen.add(alias)
        state[key] = t
    for name, layer in layers.items():
        state.update(_layer_tensors(name, layer))
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def _hf_config(model: nn.Module) -> dict:
    config = getattr(model, "config", None)
    return config.to_dict() if hasattr(config, "to_dict") else {}


def save_compressed_tensors(model: nn.Module, path: str | Path) -> None:
    """Write ``model`` to the directory ``path`` as a compressed-tensors NVFP4 checkpoint.

    Files: ``model.safetensors`` and ``config.json`` (the model's Hugging Face config, if it has one, plus
    ``quantization_config``). Layers other than NVFP4Linear are written as they are and listed in ``ignore``.
    """
    path = Path(path)
    config = {**_hf_config(model), "quantization_config": quantization_config(model)}
    path.mkdir(parents=True, exist_ok=True)
    save_file(compressed_tensors_state_dict(model), str(path / WEIGHTS_FILE), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------------- reading


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _modelopt_section(path: Path) -> dict | None:
    """ModelOpt's quantization settings: hf_quant_config.json's ``quantization`` or config.json's entry."""
    hf_quant = _read_json(path / "hf_quant_config.json")
    if hf_quant is not None and isinstance(hf_quant.get("quantization"), dict):
        return hf_quant["quantization"]
    qc = (_read_json(path / "config.json") or {}).get("quantization_config") or {}
    if str(qc.get("quant_method", "")).lower().startswith(MODELOPT):
        return qc.get("quantization", qc)
    return None


def _ct_config(path: Path) -> dict | None:
    qc = (_read_json(path / "config.json") or {}).get("quantization_config") or {}
    return qc if qc.get("quant_method") == COMPRESSED_TENSORS else None


def detect_format(path: str | Path) -> str | None:
    """``"compressed-tensors"`` or ``"modelopt"`` when the directory ``path`` declares that tool, else None."""
    path = Path(path)
    if _ct_config(path) is not None:
        return COMPRESSED_TENSORS
    if _modelopt_section(path) is not None:
        return MODELOPT
    return None


class _Tensors:
    """The tensors of every ``*.safetensors`` file in a directory (``model.safetensors.index.json`` if present)."""

    def __init__(self, path: Path):
        index = _read_json(path / "model.safetensors.index.json")
        if index is not None:
            files = sorted(set(index["weight_map"].values()))
        else:
            files = sorted(p.name for p in path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"no .safetensors files in {path}")
        self.file_of: dict[str, Path] = {}
        for name in files:
            with safe_open(str(path / name), framework="pt") as f:
                self.file_of.update(dict.fromkeys(f.keys(), path / name))
        self.used: set[str] = set()

    def __contains__(self, key: str) -> bool:
        return key in self.file_of

    def get(self, key: str, device) -> torch.Tensor:
        if key not in self.file_of:
            raise CheckpointError(f"checkpoint tensor {key!r} is missing")
        self.used.add(key)
        with safe_open(str(self.file_of[key]), framework="pt", device="cpu") as f:
            return f.get_tensor(key).to(device)

    def skip(self, key: str) -> None:
        """Mark ``key`` as read on purpose although its value is not used."""
        self.used.add(key)

    def layers_with(self, suffix: str) -> list[str]:
        return sorted(k[: -len(suffix) - 1] for k in self.file_of if k.endswith("." + suffix))


def _check(t: torch.Tensor, key: str, dtype: torch.dtype | None, shape: tuple[int, ...] | None) -> torch.Tensor:
    if dtype is not None and t.dtype != dtype:
        raise CheckpointError(f"checkpoint tensor {key!r} has dtype {t.dtype}, expected {dtype}")
    if shape is not None and tuple(t.shape) != shape:
        raise CheckpointError(f"checkpoint tensor {key!r} has shape {tuple(t.shape)}, expected {shape}")
    return t


def _scalar(t: torch.Tensor, key: str) -> torch.Tensor:
    """A per-tensor scale stored as ``[]`` or ``[1]``, as fp32 (exact for fp16/bf16 inputs)."""
    if t.numel() != 1 or not t.dtype.is_floating_point or t.dtype.itemsize < 2:
        raise CheckpointError(f"checkpoint tensor {key!r} should hold one float, got {t.dtype} {tuple(t.shape)}")
    return t.float().reshape(())


def _device(module: nn.Module) -> torch.device:
    return next(iter([*module.parameters(), *module.buffers()]), torch.empty(0)).device


def _linear_to_replace(model: nn.Module, name: str) -> nn.Module:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise CheckpointError(f"checkpoint quantizes layer {name!r}, which the model does not have") from None
    if not isinstance(module, (nn.Linear, NVFP4Linear)):
        raise CheckpointError(f"checkpoint quantizes {name!r}, a {type(module).__name__} in the model; "
                              f"only nn.Linear layers can become NVFP4Linear")
    return module


def _install(model: nn.Module, name: str, packed, scales, pts, act_pts, scheme: str) -> None:
    """Replace the linear ``name`` by an NVFP4Linear holding exactly these tensors."""
    old = _linear_to_replace(model, name)
    n, k = old.out_features, old.in_features
    _check(packed, f"{name} packed weight", torch.uint8, (n, k // 2))
    _check(scales, f"{name} block scales", torch.float8_e4m3fn, (n, k // nvfp4.BLOCK_SIZE))
    ref = old.bias if old.bias is not None else getattr(old, "weight", packed)
    dtype = ref.dtype if ref.dtype.is_floating_point else torch.float32
    new = NVFP4Linear(k, n, old.bias is not None, scheme=scheme, dtype=dtype, device=_device(old))
    new.weight_packed.copy_(packed)
    new.weight_scales.copy_(scales.view(torch.uint8))
    new.weight_global_scale.copy_(pts)
    if act_pts is not None:
        new.input_global_scale = act_pts.to(new.weight_packed.device)
    if old.bias is not None:
        new.bias.data.copy_(old.bias.detach())
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, new)


def _matches(target: str, name: str, module: nn.Module) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    kind = "Linear" if isinstance(module, NVFP4Linear) else type(module).__name__
    return target in (name, kind)


def _ct_group(qc: dict, name: str, module: nn.Module) -> dict:
    """The config group of compressed-tensors' ``quantization_config`` that covers layer ``name``."""
    if any(_matches(t, name, module) for t in qc.get("ignore") or []):
        raise CheckpointError(f"layer {name!r} is in quantization_config.ignore but has {name}.weight_packed")
    for group_name, group in (qc.get("config_groups") or {}).items():
        if any(_matches(t, name, module) for t in group.get("targets") or []):
            fmt = group.get("format") or qc.get("format")
            w = group.get("weights") or {}
            if fmt != CT_FORMAT or w.get("num_bits") != 4 or w.get("type") != "float" \
                    or w.get("group_size") != nvfp4.BLOCK_SIZE:
                raise CheckpointError(f"config group {group_name!r} (covering {name!r}) is not NVFP4: format "
                                      f"{fmt!r}, weights {w}")
            return group
    raise CheckpointError(f"checkpoint has {name}.weight_packed but no config group of quantization_config "
                          f"targets layer {name!r}")


def _load_ct_layer(model: nn.Module, tensors: _Tensors, qc: dict, name: str) -> str:
    module = _linear_to_replace(model, name)
    group = _ct_group(qc, name, module)
    device = _device(module)
    packed, scales, gs = (tensors.get(f"{name}.{s}", device) for s in _CT_SUFFIXES[:3])
    act = group.get("input_activations")
    scheme = "nvfp4" if act else "nvfp4a16"
    act_pts = None
    key = f"{name}.input_global_scale"
    if act and act.get("dynamic") is not True:
        act_pts = _scalar(tensors.get(key, device), key).reciprocal()
    elif key in tensors:
        tensors.skip(key)  # a weight-only or fully dynamic layer has no use for a calibrated input scale
    pts = _scalar(gs, f"{name}.weight_global_scale").reciprocal()
    _install(model, name, packed, scales, pts, act_pts, scheme)
    return scheme


def _load_modelopt_layer(model: nn.Module, tensors: _Tensors, algo: str, name: str) -> str:
    module = _linear_to_replace(model, name)
    device = _device(module)
    packed, scales, pts = (tensors.get(f"{name}.{s}", device) for s in _MODELOPT_SUFFIXES[:3])
    scheme = MODELOPT_ALGOS[algo]
    key = f"{name}.input_scale"
    act_pts = None
    if scheme == "nvfp4":
        act_pts = _scalar(tensors.get(key, device), key)
    elif key in tensors:
        tensors.skip(key)  # W4A16 checkpoints may carry an input scale; weight-only layers have no use for it
    _install(model, name, packed, scales, _scalar(pts, f"{name}.weight_scale_2"), act_pts, scheme)
    return scheme


def _modelopt_algo(path: Path) -> str:
    section = _modelopt_section(path) or {}
    algo = str(section.get("quant_algo", "")).upper()
    if algo not in MODELOPT_ALGOS:
        raise CheckpointError(f"ModelOpt checkpoint with quant_algo {algo!r}: only {sorted(MODELOPT_ALGOS)} "
                              f"are NVFP4 checkpoints fp4compile reads")
    if section.get("group_size", nvfp4.BLOCK_SIZE) != nvfp4.BLOCK_SIZE:
        raise CheckpointError(f"ModelOpt group_size {section['group_size']}, NVFP4 needs {nvfp4.BLOCK_SIZE}")
    return algo


def _load_rest(model: nn.Module, tensors: _Tensors) -> None:
    """Copy every tensor the quantized layers did not consume into the model's parameter or buffer of that name."""
    ours = {f"{n}.{b}" for n, m in model.named_modules() if isinstance(m, NVFP4Linear) for b in _OUR_BUFFERS}
    targets = {k: v for k, v in model.state_dict(keep_vars=True).items() if k not in ours}
    extra = sorted(k for k in tensors.file_of if k not in tensors.used and k not in targets)
    if extra:
        raise CheckpointError(f"checkpoint tensor {extra[0]!r} matches nothing in the model "
                              f"({len(extra)} unmatched tensors in all)")
    loaded: set[int] = set()
    for key, target in targets.items():
        if key in tensors:
            value = tensors.get(key, target.device)
            _check(value, key, None, tuple(target.shape))
            with torch.no_grad():
                target.copy_(value)
            loaded.add(id(target))
    missing = [k for k, t in targets.items() if k not in tensors and id(t) not in loaded]
    if missing:
        raise CheckpointError(f"the model's tensor {missing[0]!r} is missing from the checkpoint "
                              f"({len(missing)} missing in all)")


def load_external(model: nn.Module, path: str | Path) -> LoadResult:
    """Load a compressed-tensors or ModelOpt NVFP4 checkpoint directory into ``model``, in place.

    Each quantized layer (an ``nn.Linear`` of the model) becomes an NVFP4Linear holding the checkpoint's
    numbers; every other tensor is copied into the model's parameter or buffer of the same name. Any mismatch
    (missing or unmatched tensor, wrong shape or dtype) raises CheckpointError naming the tensor.
    """
    path = Path(path)
    fmt = detect_format(path)
    if fmt is None:
        raise CheckpointError(f"{path} declares neither a compressed-tensors nor a ModelOpt quantization config")
    tensors = _Tensors(path)
    report = LoadResult(fmt)
    if fmt == COMPRESSED_TENSORS:
        qc = _ct_config(path)
        for name in tensors.layers_with("weight_packed"):
            report.layers[name] = _load_ct_layer(model, tensors, qc, name)
    else:
        algo = _modelopt_algo(path)
        for name in tensors.layers_with("weight_scale_2"):
            report.layers[name] = _load_modelopt_layer(model, tensors, algo, name)
    if not report.layers:
        raise CheckpointError(f"{fmt} checkpoint {path} holds no NVFP4 layers")
    _load_rest(model, tensors)
    return report
