"""Checkpoints of calibrated models: a directory with ``model.safetensors`` and ``fp4compile.json``. Never unpickles.

``fp4compile.json`` lists the NVFP4Linear layers (shape, bias, scheme, whether the activation scale is static),
the state-dict keys that alias another one (tied weights are stored once) and a sha256 of every tensor's bytes.
``load`` rebuilds the listed layers in a model of the original architecture and copies every tensor bit for bit.
``save(..., format="compressed-tensors")`` and loading directories written by other tools go through ``interop``.
"""

import hashlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .modules import NVFP4Linear

FORMAT = "fp4compile"
VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "fp4compile.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that does not fit the model; the message names the tensor or layer."""


@dataclass
class LoadResult:
    """What ``load`` read: the checkpoint's format and the scheme of each NVFP4 layer it installed."""

    format: str
    layers: dict[str, str] = field(default_factory=dict)


def _sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()


def _unique_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict with tied tensors kept once: (tensors, {alias key: stored key})."""
    tensors, aliases, seen = {}, {}, {}
    for key, t in model.state_dict().items():
        ident = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), t.dtype, tuple(t.shape), t.stride())
        if ident in seen:
            aliases[key] = seen[ident]
        else:
            seen[ident] = key
            tensors[key] = t.detach().contiguous().cpu()
    return tensors, aliases


def _layer_entry(m: NVFP4Linear) -> dict:
    return {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None,
            "scheme": m.scheme, "static_activation_scale": m.input_global_scale is not None}


def save(model: nn.Module, path: str | Path, *, format: str = FORMAT) -> None:
    """Write ``model`` (typically calibrated) to the directory ``path``.

    format: "fp4compile" (this module's layout) or "compressed-tensors" (``interop.save_compressed_tensors``).
    """
    if format == "compressed-tensors":
        from .interop import save_compressed_tensors

        save_compressed_tensors(model, path)
        return
    if format != FORMAT:
        raise ValueError(f"unknown checkpoint format {format!r}; expected 'fp4compile' or 'compressed-tensors'")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors, aliases = _unique_tensors(model)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "layers": {n: _layer_entry(m) for n, m in model.named_modules() if isinstance(m, NVFP4Linear)},
        "aliases": aliases,
        "sha256": {k: _sha256(t) for k, t in tensors.items()},
    }
    save_file(tensors, str(path / WEIGHTS_FILE), metadata={"format": FORMAT})
    (path / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")


def _read_meta(path: Path) -> dict:
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path / META_FILE} is not valid JSON: {e}") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CheckpointError(f"{path / META_FILE} describes format {meta.get('format')!r} version "
                              f"{meta.get('version')!r}; this fp4compile reads {FORMAT!r} version {VERSION}")
    return meta


def _check_file(file: Path) -> None:
    """Read the safetensors header by hand to name the first tensor whose bytes the file does not hold."""
    if not file.is_file():
        raise CheckpointError(f"{file} is missing")
    size = file.stat().st_size
    with file.open("rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        if n is None or 8 + n > size:
            raise CheckpointError(f"{file} is corrupt: its safetensors header is cut short")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{file} is corrupt: its safetensors header is not valid JSON") from None
    for key, info in header.items():
        if key != "__metadata__" and 8 + n + info["data_offsets"][1] > size:
            raise CheckpointError(f"{file} is corrupt: the bytes of tensor {key!r} are cut short")


def _install_layer(model: nn.Module, name: str, entry: dict) -> None:
    """Make ``model.<name>`` an NVFP4Linear as ``entry`` describes (replacing an nn.Linear of the same shape)."""
    try:
        old = model.get_submodule(name)
    except AttributeError:
        raise CheckpointError(f"the checkpoint's NVFP4 layer {name!r} is not in the model") from None
    shape = (entry["out_features"], entry["in_features"])
    if not isinstance(old, (nn.Linear, NVFP4Linear)):
        raise CheckpointError(f"the checkpoint's NVFP4 layer {name!r} is a {type(old).__name__} in the model, "
                              "not a Linear")
    if (old.out_features, old.in_features) != shape or (old.bias is not None) != entry["bias"]:
        raise CheckpointError(f"the checkpoint's NVFP4 layer {name!r} is {shape} bias={entry['bias']}, the "
                              f"model's {(old.out_features, old.in_features)} bias={old.bias is not None}")
    if isinstance(old, NVFP4Linear):
        dtype = old.bias.dtype if old.bias is not None else torch.float32
        device = old.weight_packed.device
    else:
        dtype, device = old.weight.dtype, old.weight.device
    new = NVFP4Linear(entry["in_features"], entry["out_features"], entry["bias"], scheme=entry["scheme"],
                      dtype=dtype, device=device)
    if entry["static_activation_scale"]:
        new.input_global_scale = torch.zeros((), dtype=torch.float32, device=new.weight_packed.device)
    model.set_submodule(name, new)


def _copy_tensors(model: nn.Module, file: Path, meta: dict) -> None:
    targets = model.state_dict(keep_vars=True)
    aliases, sums = meta.get("aliases", {}), meta.get("sha256", {})
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            stored = set(f.keys())
            for key in targets:
                if key not in stored and aliases.get(key) not in stored:
                    raise CheckpointError(f"the model's tensor {key!r} is missing from {file}")
            for key in sorted(stored - set(targets)):
                raise CheckpointError(f"the checkpoint's tensor {key!r} has no place in the model")
            for key, target in targets.items():
                src_key = key if key in stored else aliases[key]
                try:
                    t = f.get_tensor(src_key)
                except SafetensorError as e:
                    raise CheckpointError(f"tensor {src_key!r} of {file} cannot be read: {e}") from None
                if src_key in sums and _sha256(t) != sums[src_key]:
                    raise CheckpointError(f"tensor {src_key!r} of {file} is corrupt (its sha256 does not match)")
                if t.dtype != target.dtype or t.shape != target.shape:
                    raise CheckpointError(f"tensor {key!r}: the checkpoint has {t.dtype} {tuple(t.shape)}, the "
                                          f"model {target.dtype} {tuple(target.shape)}")
                with torch.no_grad():
                    target.copy_(t)
    except SafetensorError as e:
        raise CheckpointError(f"{file} is not a readable safetensors file: {e}") from None


def load(model: nn.Module, path: str | Path) -> LoadResult:
    """Load a checkpoint directory into ``model`` in place; the listed ``nn.Linear`` layers become NVFP4Linear.

    Reads fp4compile checkpoints, and (through ``interop``) compressed-tensors and ModelOpt ones. Any mismatch
    (missing or extra tensor, wrong shape or dtype, corrupt file) raises CheckpointError naming the tensor.
    """
    path = Path(path)
    if not (path / META_FILE).is_file():
        from . import interop

        if interop.detect_format(path) is None:
            raise CheckpointError(f"{path} holds no {META_FILE} and no compressed-tensors or ModelOpt config")
        external = interop.load_external(model, path)
        return LoadResult(external.format, dict(external.layers))
    meta = _read_meta(path)
    file = path / WEIGHTS_FILE
    _check_file(file)
    for name, entry in meta["layers"].items():
        _install_layer(model, name, entry)
    _copy_tensors(model, file, meta)
    return LoadResult(FORMAT, {name: entry["scheme"] for name, entry in meta["layers"].items()})
