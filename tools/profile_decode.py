"""Where the time of a decode step goes: GPU kernel time per decode step, split into GEMMs and the rest, against
the wall time of the same steps, per configuration.

    PYTHONPATH=. python tools/profile_decode.py [--layers 32] [--configs bf16,nvfp4a16] [--convert] [--python 20]
    PYTHONPATH=. python tools/profile_decode.py --tiny --device cpu          # dry run (no kernels on a CPU)

Runs ``generate()`` as ``tools/bench_e2e.py`` does (Llama-3-8B layer shapes, random bf16 weights, static cache,
decode step compiled with CUDA graphs) under ``torch.profiler``. "GEMM" is every kernel of cuBLAS or of
fp4compile's GEMM path; the wall time that no kernel covers is launch gaps inside the CUDA graph plus the host work
of ``generate()`` between steps. Every figure is per decode step: a call generating ``--new-tokens`` tokens less a
call generating one (the prompt's eager prefill and the first token, which ``bench_e2e.py`` leaves out the same
way), divided by the steps between them.

The GPU timeline is split into time with a kernel running, gaps under ``--gap-us`` (one kernel waiting for the next
inside a CUDA graph) and longer gaps (the GPU waiting for the host: ``generate()``'s work between two graph
replays). The profiler slows the host, so the longer gaps of the profiled calls overstate the host's share; the last
column estimates it without the profiler: the unprofiled calls' wall time less the kernels and the short gaps. The
host side lists the operations with the most CPU time of their own per decode step (profiled, so inflated too);
``--python N`` also lists the N Python functions with the most time of their own per step, by ``cProfile`` over
the same two calls (the torch profiler does not see Python). ``--convert`` runs the fp4 configurations on a copy
converted by ``fp4compile.quantize_model``, as ``bench_e2e.py --convert`` does. The count of graphs Inductor did
not capture as CUDA graphs is printed per configuration (transformers' decode step replays one when none is).
"""

import argparse
import cProfile
import json
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fp4compile.__main__ import compile_config  # noqa: E402
from tools.bench_e2e import CONFIGS, build, converted  # noqa: E402

# _int8_operand_kernel is nvfp4's activation quantize at a few rows; it counts with its GEMV, as when the GEMV did it.
GEMM_KERNELS = ("nvjet", "gemm", "xmma", "cutlass", "splitKreduce", "_gemv_kernel", "_gemv_w4a4_kernel",
                "_int8_operand_kernel", "_mma_kernel", "_epilogue_kernel", "_dequant_kernel")


def is_gemm(name: str) -> bool:
    """A cuBLAS kernel or one of fp4compile's GEMM kernels. Inductor's own kernels (``triton_...``) never are, even
    when their name lists a fused GEMM epilogue (``triton_poi_fused_gemm_a16_mul_silu``)."""
    return not name.startswith("triton_") and any(k in name for k in GEMM_KERNELS)


def kernel_times(prof) -> dict[str, tuple[int, float]]:
    """Kernel name -> (launches, total us) of every GPU kernel the profiler saw."""
    rows: dict[str, list] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            row = rows.setdefault(e.name, [0, 0.0])
            row[0] += 1
            row[1] += e.device_time_total
    return {name: (n, us) for name, (n, us) in rows.items()}


def gpu_timeline(prof, gap_us: float) -> dict[str, float]:
    """Total us with a kernel running, in gaps shorter than ``gap_us`` and in longer gaps, between the first kernel
    and the last."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA)
    busy = short = long = 0.0
    if spans:
        start, end = spans[0]
        for s, e in spans[1:]:
            if s > end:
                busy += end - start
                if s - end < gap_us:
                    short += s - end
                else:
                    long += s - end
                start = s
            end = max(end, e)
        busy += end - start
    return {"busy_us": busy, "short_gaps_us": short, "long_gaps_us": long}


def host_times(prof) -> dict[str, tuple[int, float]]:
    """Host operation -> (calls, own CPU us) of everything the profiler saw on the host."""
    return {r.key: (r.count, r.self_cpu_time_total) for r in prof.key_averages()}


def difference(full: dict, prefill: dict) -> dict[str, tuple[float, float]]:
    """Per name, (count, us) of ``full`` less those of ``prefill``: what the decode steps alone added."""
    return {name: (n - prefill.get(name, (0, 0.0))[0], us - prefill.get(name, (0, 0.0))[1])
            for name, (n, us) in full.items()}


def python_times(generate, new_tokens: int) -> dict[str, tuple[int, float]]:
    """Python function -> (calls, own us) of one ``generate(new_tokens)`` under cProfile."""
    profiler = cProfile.Profile()
    profiler.runcall(generate, new_tokens)
    stats = pstats.Stats(profiler).stats
    return {f"{Path(file).name}:{line}({name})": (calls, own_s * 1e6)
            for (file, line, name), (_, calls, own_s, _, _) in stats.items()}


def measure(generate, new_tokens: int, activities, gap_us: float, python: bool) -> dict:
    """One unprofiled and one profiled ``generate(new_tokens)`` (and one under cProfile where ``python``): wall us,
    kernels, host operations, GPU timeline, Python functions."""
    start = time.perf_counter()
    generate(new_tokens)
    wall_us = (time.perf_counter() - start) * 1e6
    with torch.profiler.profile(activities=activities) as prof:
        generate(new_tokens)
    return {"wall_us": wall_us, "kernels": kernel_times(prof), "host": host_times(prof),
            "timeline": gpu_timeline(prof, gap_us), "python": python_times(generate, new_tokens) if python else {}}


def profile_config(model, scheme: str | None, group: bool, args, device) -> dict:
    """Per decode step: a call generating ``args.new_tokens`` tokens less one generating a single token (its eager
    prefill of the prompt and the first token), divided by the steps between them."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    backend = "inductor" if scheme is None else "fp4"
    model.generation_config.compile_config = compile_config(backend, scheme, device, device.type == "cuda", group)
    ids = torch.randint(0, model.config.vocab_size, (1, args.prompt_len), device=device)

    def generate(new_tokens: int):
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, cache_implementation="static", pad_token_id=0)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.no_grad():
        for _ in range(2):  # compile, record the CUDA graphs, then plain calls: the profiled calls replay
            generate(args.new_tokens)
            generate(1)
        full = measure(generate, args.new_tokens, activities, args.gap_us, args.python > 0)
        prefill = measure(generate, 1, activities, args.gap_us, args.python > 0)
    steps = args.new_tokens - 1

    def per_step(part: str) -> dict[str, tuple[float, float]]:
        return {name: (n / steps, us / steps) for name, (n, us) in difference(full[part], prefill[part]).items()}

    kernels, host, python = per_step("kernels"), per_step("host"), per_step("python")
    timeline = {k: (full["timeline"][k] - prefill["timeline"][k]) / steps for k in full["timeline"]}
    return {"wall_us": (full["wall_us"] - prefill["wall_us"]) / steps,
            "kernel_us": sum(us for _, us in kernels.values()),
            "gemm_us": sum(us for name, (_, us) in kernels.items() if is_gemm(name)),
            "launches": sum(n for n, _ in kernels.values()), **timeline,
            "top": [(name, n, us) for name, (n, us) in sorted(kernels.items(), key=lambda kv: -kv[1][1])[: args.top]],
            "host": [(name, n, us) for name, (n, us) in sorted(host.items(), key=lambda kv: -kv[1][1])[: args.top]],
            "python": [(name, n, us) for name, (n, us) in
                       sorted(python.items(), key=lambda kv: -kv[1][1])[: args.python]],
            "python_us": sum(us for _, us in python.values()),
            "cudagraph_skips": torch._dynamo.utils.counters["inductor"].get("cudagraph_skips", 0)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--layers", type=int, default=32, help="layers of the Llama-3-8B-shaped model")
    p.add_argument("--configs", default="bf16,nvfp4a16")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--top", type=int, default=8, help="kernels and host operations listed per configuration")
    p.add_argument("--gap-us", type=float, default=20.0, help="shorter gaps between kernels count as inside a graph")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--tiny", action="store_true", help="tiny model sizes, for a dry run")
    p.add_argument("--convert", action="store_true",
                   help="fp4 configurations run a copy converted by fp4compile.quantize_model (packed weights only)")
    p.add_argument("--python", type=int, default=0, metavar="N",
                   help="also list the N Python functions with the most own time per step (cProfile)")
    args = p.parse_args()
    if args.new_tokens < 2:
        p.error("--new-tokens must be at least 2: the figures are those of the steps after the first token")
    device = torch.device(args.device)
    torch._dynamo.config.recompile_limit = 64
    model = build("llama3-8b-shapes", args.layers, args.tiny, device, torch.bfloat16)
    results = {}
    for config in args.configs.split(","):
        scheme, group = CONFIGS[config]
        run_model = converted(model, scheme) if args.convert and scheme is not None else model
        r = results[config] = profile_config(run_model, scheme, group, args, device)
        del run_model
        print(f"\n{config}: {r['cudagraph_skips']} graph(s) not captured as CUDA graphs")
        print(f"{config}: kernels per decode step, by GPU time")
        for name, n, us in r["top"]:
            print(f"  {us:8.1f} us  {n:5.1f}x  {name[:100]}")
        print(f"{config}: host operations per decode step, by their own CPU time")
        for name, n, us in r["host"]:
            print(f"  {us:8.1f} us  {n:5.1f}x  {name[:100]}")
        if r["python"]:
            print(f"{config}: Python functions per decode step, by their own time (cProfile; {r['python_us']:.0f} us "
                  "in all)")
            for name, n, us in r["python"]:
                print(f"  {us:8.1f} us  {n:5.1f}x  {name[:100]}")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"\nper decode step ({args.new_tokens} tokens less 1 after a {args.prompt_len}-token prompt, "
          f"{model.config.num_hidden_layers} layers, {device_name})")
    print(f"{'config':>18} {'wall us':>9} {'kernels us':>11} {'GEMM us':>9} {'other us':>9} {'not kernels us':>15} "
          f"{'launches':>9}")
    for config, r in results.items():
        print(f"{config:>18} {r['wall_us']:9.0f} {r['kernel_us']:11.0f} {r['gemm_us']:9.0f} "
              f"{r['kernel_us'] - r['gemm_us']:9.0f} {r['wall_us'] - r['kernel_us']:15.0f} {r['launches']:9.0f}")
    print(f"\nGPU timeline per decode step (profiled calls): gaps under {args.gap_us:g} us count as inside a graph")
    print(f"{'config':>18} {'kernel running':>15} {'short gaps':>11} {'long gaps':>10} {'host wait, unprofiled':>22}")
    for config, r in results.items():
        host_wait = r["wall_us"] - r["busy_us"] - r["short_gaps_us"]
        print(f"{config:>18} {r['busy_us']:15.0f} {r['short_gaps_us']:11.0f} {r['long_gaps_us']:10.0f} "
              f"{host_wait:22.0f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"device": device_name, "args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
