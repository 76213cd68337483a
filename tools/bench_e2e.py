"""End-to-end benchmark: bf16 ``torch.compile`` against ``backend="fp4"`` (nvfp4a16, nvfp4) on Llama-architecture
models with random weights (nothing is downloaded).

    PYTHONPATH=. python tools/bench_e2e.py --out bench.json                     # GPU: the full run
    PYTHONPATH=. python tools/bench_e2e.py --tiny --device cpu --out dry.json   # dry run at tiny sizes

Models: Llama-3-8B layer shapes (hidden 4096, intermediate 14336, 32 heads, 8 KV heads; ``--layers`` of them,
vocabulary reduced to 32000) and SmolLM2-135M's config (30 layers, hidden 576). Per model and configuration:
prefill tokens/s (batch 1, ``--prefill-tokens`` tokens, compiled forward), decode tokens/s (batch 1 and 16,
``--new-tokens`` new tokens, ``generate()`` with a static cache whose decode step is compiled with CUDA graphs:
``options={"triton.cudagraphs": True}``), compile seconds (first call minus a timed call), peak memory, and
weight memory (bytes the configuration's weights need: packed values + block scales + global scale for each
rewritten layer, the model's own bytes for the rest). The model keeps its bf16 weights beside the packed ones,
so peak memory counts both. Results go to JSON after every measurement; a table is printed last. The
``-ungrouped`` configurations turn off the backend's grouping of q/k/v and gate/up into one GEMM launch each, for an
A/B of that.
"""

import argparse
import copy
import gc
import json
import logging
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fp4compile  # noqa: E402  (registers backend="fp4")
from fp4compile import format as nvfp4  # noqa: E402
from fp4compile.__main__ import compile_config, time_decode, time_prefill  # noqa: E402

# name -> (fp4 scheme or None for a plain compile, group linears that share an input)
CONFIGS = {"bf16": (None, True), "nvfp4a16": ("nvfp4a16", True), "nvfp4": ("nvfp4", True),
           "nvfp4a16-ungrouped": ("nvfp4a16", False), "nvfp4-ungrouped": ("nvfp4", False)}

MODELS = {
    "llama3-8b-shapes": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                             vocab_size=32000, rope_theta=500000.0, tie_word_embeddings=False),
    "smollm2-135m-shapes": dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                                num_hidden_layers=30, vocab_size=49152, rope_theta=100000.0, tie_word_embeddings=True),
}
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=256)


def build(name: str, layers: int, tiny: bool, device, dtype) -> torch.nn.Module:
    shape = {**MODELS[name], **(TINY if tiny else {})}
    shape.setdefault("num_hidden_layers", layers)
    if tiny:
        shape["num_hidden_layers"] = 2
    config = transformers.LlamaConfig(**shape, max_position_embeddings=4096, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config).to(dtype)
    return model.eval().requires_grad_(False)


def converted(model: torch.nn.Module, scheme: str) -> torch.nn.Module:
    """A copy of ``model`` whose linears ``fp4compile.quantize_model`` replaced (packed weights only): ``--convert``."""
    copied = copy.deepcopy(model)
    fp4compile.quantize_model(copied, scheme=scheme)
    return copied


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers (packed ones included), each shared tensor once."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def weight_bytes(model: torch.nn.Module, report) -> int:
    """Bytes of the weights as the configuration stores them: each float [N, K] weight the backend rewrote counts
    as NVFP4 (packed values, block scales, global scale); an already packed model counts as it is."""
    total = model_bytes(model)
    for d in {d.name: d for r in report for d in r.rewritten}.values():
        module = model.get_submodule(d.name)
        if isinstance(module, torch.nn.Linear):
            n, k = d.shape
            total += n * k // 2 + n * k // nvfp4.BLOCK_SIZE + 4 - module.weight.numel() * module.weight.element_size()
    return total


def reset_memory(device) -> int | None:
    """Free what earlier configurations left behind and restart the peak count; returns the bytes still held."""
    gc.collect()
    if device.type != "cuda":
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def peak_memory(device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def bench_config(model, scheme: str | None, group: bool, args, device) -> dict:
    """Every measurement of one configuration; Dynamo is reset first so earlier graphs cannot be reused."""
    torch._dynamo.reset()
    held = reset_memory(device)
    report: list = []
    if scheme is None:
        prefill_model = torch.compile(model)
    else:
        options = {"scheme": scheme, "group": group, "report": report}
        prefill_model = torch.compile(model, backend="fp4", options=options)
    prefill = time_prefill(prefill_model, 1, args.prefill_tokens, model.config.vocab_size, device, args.reps)
    out = {"prefill_tokens_per_s": args.prefill_tokens / prefill.median_s,
           "prefill_compile_s": prefill.first_s - prefill.median_s,
           "rewritten_layers": len({d.name for r in report for d in r.rewritten}),
           "weight_bytes": weight_bytes(model, report)}
    backend_name = "inductor" if scheme is None else "fp4"
    cudagraphs = device.type == "cuda"
    for batch in args.batches:
        config = compile_config(backend_name, scheme, device, cudagraphs, group)
        t = time_decode(model, batch, args.prompt_len, args.new_tokens, config, device, args.reps)
        out[f"decode_b{batch}_tokens_per_s"] = batch * t.decode_steps / t.decode_s
        out[f"decode_b{batch}_compile_s"] = t.first_s - t.generate_s
    out["peak_memory_bytes"] = peak_memory(device)
    out["memory_at_start_bytes"] = held  # the model's weights and anything earlier runs still hold
    return out


def table(results: dict) -> str:
    cols = ["prefill_tokens_per_s", *[k for k in next(iter(next(iter(results.values())).values())) if
                                      k.startswith("decode_") and k.endswith("tokens_per_s")],
            "prefill_compile_s", "weight_bytes", "peak_memory_bytes"]
    heads = ["model", "config", "prefill tok/s",
             *[c.removeprefix("decode_").removesuffix("_tokens_per_s") + " tok/s" for c in cols[1:-3]],
             "compile s", "weights MiB", "peak MiB"]
    rows = [heads]
    for model, configs in results.items():
        for config, r in configs.items():
            cells = []
            for c in cols:
                v = r.get(c)
                cells.append("-" if v is None else f"{v / 2**20:.0f}" if c.endswith("bytes") else f"{v:.1f}")
            rows.append([model, config, *cells])
    widths = [max(len(row[i]) for row in rows) for i in range(len(heads))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON file for the results")
    p.add_argument("--device", default="cuda")
    p.add_argument("--layers", type=int, default=4, help="layers of the Llama-3-8B-shaped model")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--configs", default="bf16,nvfp4a16,nvfp4", help=f"of {', '.join(CONFIGS)}")
    p.add_argument("--prefill-tokens", type=int, default=1024)
    p.add_argument("--prompt-len", type=int, default=32, help="prompt of the decode runs")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--batches", default="1,16", help='decode batch sizes; "" measures prefill only')
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--budget-s", type=float, default=float("inf"), help="start no configuration after this long")
    p.add_argument("--tiny", action="store_true", help="tiny model sizes, for a dry run")
    p.add_argument("--convert", action="store_true",
                   help="fp4 configurations run a copy converted by fp4compile.quantize_model (packed weights only)")
    args = p.parse_args()
    args.batches = [int(b) for b in args.batches.split(",") if b.strip()]
    logging.basicConfig(level=logging.WARNING)
    device = torch.device(args.device)
    dtype = torch.bfloat16
    torch._dynamo.config.recompile_limit = 64
    start = time.perf_counter()
    results: dict = {}
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "transformers": transformers.__version__, "args": vars(args)}
    for name in args.models.split(","):
        model = build(name, args.layers, args.tiny, device, dtype)
        results[name] = {}
        meta[name] = {"layers": model.config.num_hidden_layers, "bf16_weight_bytes": model_bytes(model)}
        for config in args.configs.split(","):
            if time.perf_counter() - start > args.budget_s:
                print(f"budget spent: skipping {name} {config}", flush=True)
                continue
            t0 = time.perf_counter()
            scheme, group = CONFIGS[config]
            run_model = converted(model, scheme) if args.convert and scheme is not None else model
            results[name][config] = bench_config(run_model, scheme, group, args, device)
            del run_model  # a converted copy is freed before the next configuration
            print(f"{name} {config}: {results[name][config]} ({time.perf_counter() - t0:.0f} s)", flush=True)
            Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
        del model
    print(table({m: r for m, r in results.items() if r}))


if __name__ == "__main__":
    main()
