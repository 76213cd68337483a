"""save/load: bit-identical round trips into the original architecture, and errors that name the tensor."""

import importlib.util
import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fp4compile import checkpoint
from fp4compile import format as nvfp4
from fp4compile.checkpoint import CheckpointError, load, save
from fp4compile.modules import NVFP4Linear


class Net(nn.Module):
    def __init__(self, vocab: int = 40, d: int = 32):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(nn.ModuleDict({"up": nn.Linear(d, 2 * d), "down": nn.Linear(2 * d, d, bias=False)})
                                    for _ in range(2))
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied, as many language models are

    def forward(self, ids):
        x = self.embed(ids)
        for b in self.blocks:
            x = x + b["down"](torch.relu(b["up"](x)))
        return self.head(x)


def quantized_net(seed: int = 0) -> Net:
    """A Net whose block linears are NVFP4 (one with a static activation scale), as calibrate leaves it."""
    torch.manual_seed(seed)
    net = Net()
    for i, b in enumerate(net.blocks):
        for key in ("up", "down"):
            lin = b[key]
            act = torch.tensor(0.01 * (i + 1)) if (i, key) == (1, "up") else None
            b[key] = NVFP4Linear.from_linear(lin, nvfp4.quantize(lin.weight), scheme="nvfp4" if i else "nvfp4a16",
                                             input_global_scale=act)
    return net


def state_bytes(model: nn.Module) -> dict[str, bytes]:
    return {k: v.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            for k, v in model.state_dict().items()}


@pytest.fixture
def saved(tmp_path):
    net = quantized_net()
    save(net, tmp_path / "ckpt")
    return net, tmp_path / "ckpt"


def test_round_trip_is_bit_identical_into_the_original_architecture(saved):
    net, path = saved
    assert sorted(p.name for p in path.iterdir()) == ["fp4compile.json", "model.safetensors"]
    fresh = Net()  # plain nn.Linear layers, other random values
    result = load(fresh, path)
    assert result.format == "fp4compile"
    assert result.layers == {"blocks.0.up": "nvfp4a16", "blocks.0.down": "nvfp4a16", "blocks.1.up": "nvfp4",
                             "blocks.1.down": "nvfp4"}
    assert isinstance(fresh.blocks[1]["up"], NVFP4Linear) and fresh.blocks[1]["up"].scheme == "nvfp4"
    assert fresh.blocks[1]["down"].input_global_scale is None and fresh.blocks[1]["down"].bias is None
    assert state_bytes(fresh) == state_bytes(net)
    assert fresh.head.weight is fresh.embed.weight  # still tied
    ids = torch.randint(0, 40, (2, 7))
    assert torch.equal(fresh(ids), net(ids))


def test_tied_tensors_are_stored_once(saved):
    _, path = saved
    meta = json.loads((path / "fp4compile.json").read_text())
    assert meta["aliases"] == {"head.weight": "embed.weight"}
    assert "head.weight" not in load_file(path / "model.safetensors")


def test_load_into_an_already_quantized_model(saved):
    net, path = saved
    other = quantized_net(seed=5)
    load(other, path)
    assert state_bytes(other) == state_bytes(net)


def test_load_never_unpickles(saved, monkeypatch):
    _, path = saved

    def forbidden(*args, **kwargs):
        raise AssertionError("load unpickled something")

    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    load(Net(), path)


def test_missing_tensor_is_named(saved):
    _, path = saved
    tensors = load_file(path / "model.safetensors")
    del tensors["blocks.1.up.weight_scales"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"'blocks\.1\.up\.weight_scales' is missing"):
        load(Net(), path)


def test_extra_tensor_is_named(saved):
    _, path = saved
    tensors = load_file(path / "model.safetensors")
    tensors["blocks.0.extra"] = torch.zeros(3)
    save_file(tensors, path / "model.safetensors")
    meta = json.loads((path / "fp4compile.json").read_text())
    del meta["sha256"]
    (path / "fp4compile.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"'blocks\.0\.extra' has no place"):
        load(Net(), path)


def test_wrong_shape_is_named(saved):
    _, path = saved
    with pytest.raises(CheckpointError, match=r"'embed\.weight'"):
        load(Net(vocab=48), path)
    with pytest.raises(CheckpointError, match=r"'blocks\.0\.up' is \(64, 32\)"):
        load(Net(d=48), path)


def test_wrong_dtype_is_named(saved):
    _, path = saved
    with pytest.raises(CheckpointError, match=r"'embed\.weight': the checkpoint has torch\.float32"):
        load(Net().to(torch.bfloat16), path)


def test_layer_missing_from_the_model(saved):
    _, path = saved
    net = Net()
    del net.blocks[1]
    with pytest.raises(CheckpointError, match=r"'blocks\.1\.up' is not in the model"):
        load(net, path)


def test_truncated_file_names_the_cut_tensor(saved):
    _, path = saved
    file = path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match=r"bytes of tensor '.*' are cut short"):
        load(Net(), path)
    file.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="header is cut short"):
        load(Net(), path)


def test_flipped_byte_names_the_corrupt_tensor(saved):
    _, path = saved
    file = path / "model.safetensors"
    data = bytearray(file.read_bytes())
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    start = 8 + n + header["blocks.0.down.weight_packed"]["data_offsets"][0]
    data[start] ^= 0xFF
    file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"'blocks\.0\.down\.weight_packed' .* is corrupt"):
        load(Net(), path)


def test_bad_json_and_other_formats(saved, tmp_path):
    _, path = saved
    (path / "fp4compile.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load(Net(), path)
    (path / "fp4compile.json").write_text(json.dumps({"format": "fp4compile", "version": 99}))
    with pytest.raises(CheckpointError, match="version 99"):
        load(Net(), path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no fp4compile.json"):
        load(Net(), tmp_path / "empty")
    with pytest.raises(ValueError, match="unknown checkpoint format"):
        save(Net(), tmp_path / "x", format="gguf")


@pytest.mark.skipif(importlib.util.find_spec("fp4compile.interop") is None, reason="fp4compile.interop is absent")
def test_compressed_tensors_goes_through_interop(tmp_path):
    net = quantized_net()
    save(net, tmp_path / "ct", format="compressed-tensors")
    assert not (tmp_path / "ct" / checkpoint.META_FILE).exists()
    fresh = Net()
    result = load(fresh, tmp_path / "ct")
    assert result.format == "compressed-tensors"
    assert set(result.layers) == {f"blocks.{i}.{k}" for i in range(2) for k in ("up", "down")}
    for i in range(2):
        for key in ("up", "down"):
            assert torch.equal(fresh.blocks[i][key].weight_packed, net.blocks[i][key].weight_packed)
