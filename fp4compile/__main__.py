"""Command line: calibrate, evaluate and benchmark a causal language model in NVFP4.

    python -m fp4compile calibrate [MODEL] --data calib.txt --out ckpt/ [--scheme nvfp4a16] [--format fp4compile]
                                   [--samples 32 --generated 32]
    python -m fp4compile eval [MODEL] --data test.txt [--scheme nvfp4|nvfp4a16|none]
    python -m fp4compile bench [MODEL] [--scheme nvfp4|nvfp4a16|none] [--batch 1] [--prompt-len 128] [--new-tokens 64]

MODEL is a directory: a Hugging Face model (safetensors, or a single ``.gguf`` file), a checkpoint that
``calibrate`` wrote, or a compressed-tensors / ModelOpt NVFP4 export. Without one, the embedded demo is used: a
small random Llama over byte tokens, enough to try every command. Needs ``transformers``.
"""

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

SCHEMES = ("nvfp4", "nvfp4a16", "none")
DEMO_CONFIG = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass
class Loaded:
    """A model ready to run, and how to turn text into its token ids."""

    model: torch.nn.Module
    tokenize: Callable[[str], list[int]]
    tokenizer: object | None  # the Hugging Face tokenizer, None for byte tokens
    source: str


def _transformers():
    try:
        import transformers
    except ImportError:
        sys.exit("fp4compile: the command line needs transformers (pip install transformers)")
    return transformers


def _byte_tokens(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def demo_model() -> torch.nn.Module:
    """A small random Llama (seeded) over byte tokens: the model used when no directory is given."""
    tf = _transformers()
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(tf.LlamaConfig(**DEMO_CONFIG))


def _gguf_file(path: Path) -> str | None:
    files = sorted(p.name for p in path.glob("*.gguf"))
    if len(files) > 1:
        sys.exit(f"fp4compile: {path} holds several .gguf files ({', '.join(files)}); keep one")
    return files[0] if files and not (path / "config.json").is_file() else None


def _is_quantized_checkpoint(path: Path) -> bool:
    from . import checkpoint, interop

    return (path / checkpoint.META_FILE).is_file() or interop.detect_format(path) is not None


def _from_dir(path: Path, dtype: torch.dtype) -> torch.nn.Module:
    tf = _transformers()
    gguf = _gguf_file(path)
    if gguf is not None:  # transformers expands GGUF weights; rebuild a plain model so nothing of GGUF remains
        expanded = tf.AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf, dtype=dtype)
        config = expanded.config
        config.quantization_config = None
        model = tf.AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.load_state_dict(expanded.state_dict())
        return model
    if not _is_quantized_checkpoint(path):
        return tf.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    from .checkpoint import load

    config = tf.AutoConfig.from_pretrained(path)
    config.quantization_config = None
    model = tf.AutoModelForCausalLM.from_config(config, dtype=dtype)
    load(model, path)
    return model


def load_model(path: str | None, device: torch.device, dtype: torch.dtype) -> Loaded:
    """The model in ``path`` (or the demo) on ``device``, in eval mode with gradients off."""
    if path is None:
        model, tokenizer, source = demo_model().to(dtype), None, "demo (random Llama, byte tokens)"
    else:
        p = Path(path)
        if not p.is_dir():
            sys.exit(f"fp4compile: {path} is not a directory")
        model, source = _from_dir(p, dtype), str(p)
        tokenizer = None
        gguf = _gguf_file(p)
        if gguf is not None or any((p / f).is_file() for f in TOKENIZER_FILES):
            tokenizer = _transformers().AutoTokenizer.from_pretrained(p, gguf_file=gguf)
    if tokenizer is None and model.config.vocab_size < 256:
        sys.exit(f"fp4compile: {source} has no tokenizer and a vocabulary too small for byte tokens")
    tokenize = _byte_tokens if tokenizer is None else (lambda text: tokenizer(text).input_ids)
    model = model.to(device).eval().requires_grad_(False)
    return Loaded(model, tokenize, tokenizer, source)


def text_windows(loaded: Loaded, path: str, seq_len: int, limit: int | None) -> list[torch.Tensor]:
    """Non-overlapping ``[1, seq_len]`` windows of the tokenized text file (at most ``limit``)."""
    ids = loaded.tokenize(Path(path).read_text(encoding="utf-8", errors="replace"))
    n = len(ids) // seq_len if limit is None else min(len(ids) // seq_len, limit)
    if n == 0:
        sys.exit(f"fp4compile: {path} has {len(ids)} tokens, fewer than one window of {seq_len}")
    return [torch.tensor(ids[i * seq_len:(i + 1) * seq_len]).unsqueeze(0) for i in range(n)]


@torch.no_grad()
def generated_windows(model: torch.nn.Module, start_token: int, seq_len: int, count: int, seed: int = 0,
                      batch: int = 16, progress: bool = False) -> torch.Tensor:
    """``[count, seq_len]`` tokens that ``model`` (a transformers causal LM) samples itself from ``start_token``
    (top-p 0.95; seeded, without touching the global random state): calibration text from no corpus at all. Half
    text, half the model's own text calibrated nvfp4 better than either alone (tools/QUALITY.md)."""
    device = next(model.parameters()).device
    rows = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for n in tqdm(range(0, count, batch), desc="sampling calibration text", unit="batch", disable=not progress):
            start = torch.full((min(batch, count - n), 1), start_token, device=device)
            rows.append(model.generate(start, attention_mask=torch.ones_like(start), do_sample=True, top_p=0.95,
                                       top_k=0, max_new_tokens=seq_len - 1, min_new_tokens=seq_len - 1,
                                       pad_token_id=start_token))
    return torch.cat(rows)


def compiled(model: torch.nn.Module, scheme: str, options: dict | None = None):
    """``model`` under ``torch.compile(backend="fp4")``, or as it is for scheme "none"."""
    if scheme == "none":
        return model
    from . import backend  # noqa: F401  (registers "fp4" where the entry point is not installed)

    return torch.compile(model, backend="fp4", options={"scheme": scheme, **(options or {})})


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


@dataclass
class Timing:
    first_s: float  # the first call, compilation included
    median_s: float  # median of the timed calls after it


def time_calls(fn: Callable[[], object], device: torch.device, reps: int, desc: str) -> Timing:
    first = timed(fn, device)
    times = [timed(fn, device) for _ in tqdm(range(reps), desc=desc, leave=False)]
    return Timing(first, statistics.median(times))


def compile_config(backend: str, scheme: str | None, device: torch.device, cudagraphs: bool, group: bool = True):
    """transformers' CompileConfig for ``generate``: ``mode=None`` since torch.compile takes mode or options."""
    options = {"triton.cudagraphs": True} if cudagraphs else {}
    if scheme is not None:
        options["scheme"] = scheme
    if not group:
        options["group"] = False
    config = _transformers().CompileConfig(backend=backend, mode=None, fullgraph=False, options=options)
    if device.type == "cpu":
        config._compile_all_devices = True  # transformers compiles generate's decode step on GPUs only otherwise
    return config


def time_prefill(model, batch: int, tokens: int, vocab: int, device, reps: int) -> Timing:
    ids = torch.randint(0, vocab, (batch, tokens), device=device)
    with torch.no_grad():
        return time_calls(lambda: model(ids, use_cache=False, logits_to_keep=1), device, reps, "prefill")


@dataclass
class DecodeTiming:
    """``generate`` timings: the first call (compiling the decode step), then medians of a full call and of a
    prefill-only call (one new token); their difference is the time of the ``new_tokens - 1`` decode steps."""

    first_s: float
    generate_s: float
    prefill_s: float
    decode_steps: int

    @property
    def decode_s(self) -> float:
        return self.generate_s - self.prefill_s


def time_decode(model, batch: int, prompt_len: int, new_tokens: int, config, device, reps: int) -> DecodeTiming:
    """``generate`` with a static cache and ``config`` compiling its decode step (its prefill stays eager)."""
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt_len), device=device)
    model.generation_config.compile_config = config

    def generate(n: int):
        return lambda: model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                      do_sample=False, cache_implementation="static", pad_token_id=0)

    with torch.no_grad():
        full = time_calls(generate(new_tokens), device, reps, "decode")
        prefill = time_calls(generate(1), device, reps, "prefill only")
    return DecodeTiming(full.first_s, full.median_s, prefill.median_s, new_tokens - 1)


# ---------------------------------------------------------------------------------------------------- commands


def cmd_calibrate(args, loaded: Loaded) -> dict:
    from .calibrate import calibrate
    from .checkpoint import save

    windows = text_windows(loaded, args.data, args.seq_len, args.samples)
    if args.generated:
        start = windows[0][0, 0].item()
        windows += list(generated_windows(loaded.model, start, args.seq_len, args.generated, progress=True).cpu()
                        .split(1))
    device = next(loaded.model.parameters()).device
    report = calibrate(loaded.model, [w.to(device) for w in windows], scheme=args.scheme,
                       static_activation_scale=args.static_activation_scale, tune_steps=args.tune_steps)
    print(report.summary())
    out = Path(args.out)
    save(loaded.model, out, format=args.format)
    if not (out / "config.json").is_file():
        loaded.model.config.save_pretrained(out)
    if loaded.tokenizer is not None:
        loaded.tokenizer.save_pretrained(out)
    return {"layers": len(report.layers), "skipped": len(report.skipped), "samples": len(windows),
            "rtn_error": report.rtn_error, "gptq_error": report.gptq_error, "seconds": report.seconds, "out": str(out),
            "format": args.format, "blocks_tuned": len(report.tuning),
            "blocks_tuning_kept": sum(t.kept for t in report.tuning)}


def cmd_eval(args, loaded: Loaded) -> dict:
    windows = text_windows(loaded, args.data, args.seq_len, args.max_windows)
    model = compiled(loaded.model, args.scheme)
    device = next(loaded.model.parameters()).device
    nll, count, t0 = 0.0, 0, time.perf_counter()
    with torch.no_grad():
        for ids in tqdm(windows, desc="eval"):
            ids = ids.to(device)
            logits = model(ids, use_cache=False).logits.float()
            nll += torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum").item()
            count += ids.shape[1] - 1
    return {"perplexity": math.exp(nll / count), "tokens": count, "windows": len(windows),
            "seconds": time.perf_counter() - t0, "scheme": args.scheme}


def cmd_bench(args, loaded: Loaded) -> dict:
    model = loaded.model
    device = next(model.parameters()).device
    cudagraphs = device.type == "cuda" and not args.no_cudagraphs
    prefill_model = torch.compile(model) if args.scheme == "none" else compiled(model, args.scheme)
    prefill = time_prefill(prefill_model, args.batch, args.prompt_len, model.config.vocab_size, device, args.reps)
    backend, scheme = ("inductor", None) if args.scheme == "none" else ("fp4", args.scheme)
    decode = time_decode(model, args.batch, args.prompt_len, args.new_tokens,
                         compile_config(backend, scheme, device, cudagraphs), device, args.reps)
    return {"scheme": args.scheme, "batch": args.batch, "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens, "prefill_tokens_per_s": args.batch * args.prompt_len / prefill.median_s,
            "decode_tokens_per_s": args.batch * decode.decode_steps / decode.decode_s,
            "prefill": asdict(prefill), "generate": asdict(decode)}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fp4compile", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("model", nargs="?", help="model directory (default: the embedded demo)")
    common.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    common.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help="default: bfloat16 on CUDA, float32 on CPU")
    common.add_argument("--json", help="also write the summary to this JSON file")
    c = sub.add_parser("calibrate", parents=[common], help="GPTQ-calibrate to NVFP4 and save a checkpoint")
    c.add_argument("--data", required=True, help="calibration text file")
    c.add_argument("--out", required=True, help="checkpoint directory to write")
    c.add_argument("--scheme", choices=SCHEMES[:2], default="nvfp4")
    c.add_argument("--format", choices=("fp4compile", "compressed-tensors"), default="fp4compile")
    c.add_argument("--samples", type=int, default=64, help="calibration windows of --data")
    c.add_argument("--generated", type=int, default=0,
                   help="and this many windows the model samples itself, from the first token of --data")
    c.add_argument("--seq-len", type=int, default=512)
    c.add_argument("--static-activation-scale", action="store_true", help="record calibrated activation scales")
    c.add_argument("--tune-steps", type=int, default=0,
                   help="after GPTQ, tune each block's codes by its output error for this many steps (0: off)")
    e = sub.add_parser("eval", parents=[common], help="perplexity on a text file")
    e.add_argument("--data", required=True, help="evaluation text file")
    e.add_argument("--scheme", choices=SCHEMES, default="nvfp4", help="'none': the model as it is, eagerly")
    e.add_argument("--seq-len", type=int, default=512)
    e.add_argument("--max-windows", type=int, help="evaluate at most this many windows")
    b = sub.add_parser("bench", parents=[common], help="prefill and decode tokens/s")
    b.add_argument("--scheme", choices=SCHEMES, default="nvfp4", help="'none': plain torch.compile")
    b.add_argument("--batch", type=int, default=1)
    b.add_argument("--prompt-len", type=int, default=128)
    b.add_argument("--new-tokens", type=int, default=64)
    b.add_argument("--reps", type=int, default=3)
    b.add_argument("--no-cudagraphs", action="store_true")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    loaded = load_model(args.model, device, dtype)
    command = {"calibrate": cmd_calibrate, "eval": cmd_eval, "bench": cmd_bench}[args.command]
    summary = {"command": args.command, "model": loaded.source, "device": str(device), "dtype": str(dtype),
               **command(args, loaded)}
    width = max(map(len, summary))
    print("\n".join(f"{k:<{width}}  {v:.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}"
                    for k, v in summary.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
