"""Time the NVFP4 GEMMs against cuBLAS bf16 on one CUDA GPU; everything in one command.

    PYTHONPATH=. python3 tools/bench_gemm.py [--out bench.json] [--shapes 4096x4096,...] [--ms 1,16,...]
                                             [--gemv-rows R]

For each weight shape (N, K) and batch M: the median time (triton.testing.do_bench, L2 flushed between runs) of
cuBLAS bf16 ``F.linear``, fp4compile nvfp4a16 (``torch.ops.fp4.gemm_a16``) and nvfp4 (``torch.ops.fp4.gemm``, which
quantizes its activation), both under torch.compile as the backend runs them, the quantize alone, the
ratios to bf16 and the floors (bytes over the measured copy bandwidth, FLOPs over the measured bf16 rate), timed
with Python's garbage collector off (as ``timeit`` does) and cuBLAS's reduced-precision reductions off for fp4. At
decode sizes up to M=128 it also times CUDA-graph replays over enough weight copies to miss L2. Each fp4 result is
checked against an fp32 product of the dequantized operands. ``--gemv-rows R`` lets the GEMVs take at most R rows
of either activation (``kernels.GEMV_MAX_ROWS``, ``GEMV_A16_MAX_ROWS``; above, the tensor-core kernels), to compare
the two paths at a few rows. JSON goes to --out (default $OUT/bench_gemm.json when OUT is
set); a short table is printed last.
"""

import argparse
import gc
import json
import math
import os
import time

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from fp4compile import format as nvfp4
from fp4compile.backend import fp32_gemm_reductions
from fp4compile import kernels
from fp4compile.kernels import triton_gemm

SHAPES = ((4096, 4096), (14336, 4096), (4096, 14336), (8192, 8192))
MS = (1, 16, 128, 1024, 4096)
GRAPH_MAX_M = 128  # up to here also timed as CUDA-graph replays, where launch overhead would hide the kernels
TARGETS = {1: (3.0, 2.5), 16: (3.0, 2.5), 128: (2.0, 1.5), 4096: (0.9, 0.8)}  # (nvfp4a16, nvfp4) vs bf16


def median_us(fn) -> float:
    """Median of ``fn``'s time in us, with Python's garbage collector off while timing, as ``timeit`` does: the
    collections that the compiled calls' allocations set off otherwise land in the timed calls (H200, one shape and
    every M: nvfp4 at 4096^2, M = 4096 took 557.7 us with the collector on for the whole run, 259.2 us with it off;
    tools/KERNEL_NOTES.md, version 24)."""
    gc.collect()
    gc.disable()
    try:
        return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3
    finally:
        gc.enable()


def write_rows(path: str | None, rows: list) -> None:
    """Results so far as JSON (the GPU's name and the rows), rewritten after each row; nothing when ``path`` is None."""
    if path:
        with open(path, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


def graph_us(calls, replays: int = 20) -> float:
    """Per-call time of a CUDA graph that runs every closure in ``calls`` once, replayed ``replays`` times."""
    for call in calls:
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (replays * len(calls))


def ceilings() -> dict:
    """Measured copy bandwidth (bytes read + written) and bf16 matmul rate on random data."""
    src = torch.randn(2**29, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    copy_s = median_us(lambda: dst.copy_(src)) * 1e-6
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_s = median_us(lambda: a @ b) * 1e-6
    return {"copy_GBps": 2 * src.numel() * 2 / copy_s / 1e9, "bf16_TFLOPs": 2 * 8192**3 / mm_s / 1e12}


def rel_err(out, ref) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


def bench_point(n, k, m, weights, ceil, quant, a16_compiled, w4a4_compiled) -> dict:
    w_bf16, w_fp4 = weights
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w_deq = nvfp4.dequantize_parts(*w_fp4)

    def a16(w=w_fp4):
        return a16_compiled(x, *w)

    def w4a4(w=w_fp4):
        return w4a4_compiled(x, *w)

    a_deq = nvfp4.dequantize_parts(*quant(x))
    row = {"N": n, "K": k, "M": m, "bf16_us": median_us(lambda: F.linear(x, w_bf16[0]))}
    # The fp4 GEMMs run with cuBLAS's reduced-precision reductions off, as the backend runs its compiled graphs. The
    # backend sets that once per call of a whole graph (all of a model's layers), so here it is set once around the
    # timing, not inside each timed call: toggled around every call of a compiled function, it added 15 us (a
    # one-kernel function) to 60 us (nvfp4a16, M = 1024) of CPU to each call on an H200 host, while the toggle by
    # itself took 3.5 us.
    with fp32_gemm_reductions():
        row.update({
            "err_a16": rel_err(a16(), x.float() @ w_deq.t()),
            "err_nvfp4": rel_err(w4a4(), a_deq @ w_deq.t()),
            "a16_us": median_us(a16),
            "nvfp4_us": median_us(w4a4),
        })
    row["quant_us"] = median_us(lambda: quant(x))
    gb = ceil["copy_GBps"] * 1e3  # bytes per microsecond
    flop_us = 2 * m * n * k / (ceil["bf16_TFLOPs"] * 1e6)
    row["floor_bf16_us"] = max((2 * n * k + 2 * m * k + 2 * m * n) / gb, flop_us)
    row["floor_a16_us"] = max((n * k * 9 / 16 + 2 * m * k + 2 * m * n) / gb, flop_us)
    row["floor_nvfp4_us"] = max((n * k * 9 / 16 + m * k * 9 / 16 + 2 * m * n) / gb, flop_us)
    row["floor_quant_us"] = (2 * m * k + m * k * 9 / 16) / gb
    row["a16_x"] = row["bf16_us"] / row["a16_us"]
    row["nvfp4_x"] = row["bf16_us"] / row["nvfp4_us"]
    if m <= GRAPH_MAX_M:
        l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20)
        copies = max(2, math.ceil(3 * l2 / (n * k * 9 / 16)))
        fp4_copies = [tuple(t.clone() for t in w_fp4) for _ in range(copies)]
        bf16_copies = [w_bf16[0].clone() for _ in range(max(2, math.ceil(3 * l2 / (2 * n * k))))]
        row["graph_bf16_us"] = graph_us([lambda w=w: F.linear(x, w) for w in bf16_copies])
        with fp32_gemm_reductions():
            row["graph_a16_us"] = graph_us([lambda w=w: a16(w) for w in fp4_copies])
            row["graph_nvfp4_us"] = graph_us([lambda w=w: w4a4(w) for w in fp4_copies])
        row["graph_a16_x"] = row["graph_bf16_us"] / row["graph_a16_us"]
        row["graph_nvfp4_x"] = row["graph_bf16_us"] / row["graph_nvfp4_us"]
    return row


def geomean(values) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_out = os.path.join(os.environ["OUT"], "bench_gemm.json") if "OUT" in os.environ else None
    parser.add_argument("--out", default=default_out, help="JSON results path")
    parser.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES), help="NxK,NxK,...")
    parser.add_argument("--ms", default=",".join(map(str, MS)), help="batch sizes M")
    parser.add_argument("--gemv-rows", type=int, help=f"the most rows either GEMV takes (1 to {kernels.GEMV_MAX_ROWS};"
                        f" default {kernels.GEMV_A16_MAX_ROWS} with a bf16 activation, {kernels.GEMV_MAX_ROWS} NVFP4)")
    args = parser.parse_args()
    if args.gemv_rows is not None:
        if not 1 <= args.gemv_rows <= kernels.GEMV_MAX_ROWS:
            parser.error(f"--gemv-rows takes 1 to {kernels.GEMV_MAX_ROWS}")
        kernels.GEMV_MAX_ROWS = kernels.GEMV_A16_MAX_ROWS = args.gemv_rows
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]
    ms = [int(v) for v in args.ms.split(",")]
    torch._dynamo.config.cache_size_limit = 64
    quant = torch.compile(lambda x: torch.ops.fp4.quantize_act(x, None), dynamic=False)
    # The GEMMs as the fp4 backend runs them: Inductor compiles the ops' decompositions (the kernels up to 128 rows,
    # dequantize + cuBLAS above), with the weights as inputs; nvfp4a16's global scale also as the host float the
    # backend's pass gives (cuBLAS's alpha above 128 rows).
    w4a4_compiled = torch.compile(lambda x, p, s, t: torch.ops.fp4.gemm(x, None, [p], [s], [t], [None])[0],
                                  dynamic=False)

    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "gemv_rows": args.gemv_rows,
              "rows": []}
    result.update(ceilings())
    print(f"{result['device']}: copy {result['copy_GBps']:.0f} GB/s, bf16 mm {result['bf16_TFLOPs']:.0f} TFLOP/s",
          flush=True)
    for n, k in shapes:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        q = nvfp4.quantize(w)
        weights = ((w,), (q.packed, q.scales.view(torch.uint8), q.global_scale))
        alphas = [float(q.global_scale)]
        a16_compiled = torch.compile(lambda x, p, s, t: torch.ops.fp4.gemm_a16(x, [p], [s], [t], [None], alphas)[0],
                                     dynamic=False)
        for m in ms:
            t0 = time.time()
            torch._dynamo.reset()  # one compiled graph per point: no time spent on other points' guards
            row = bench_point(n, k, m, weights, result, quant, a16_compiled, w4a4_compiled)
            row["wall_s"] = time.time() - t0
            result["rows"].append(row)
            print(json.dumps({key: round(v, 3) if isinstance(v, float) else v for key, v in row.items()}), flush=True)
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(result, f, indent=1)
    result["tuned_configs"] = {repr(key): config for key, config in triton_gemm._best.items()}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    print(f"\n{result['device']}  copy {result['copy_GBps']:.0f} GB/s  bf16 {result['bf16_TFLOPs']:.0f} TFLOP/s")
    print(f"{'N':>6} {'K':>6} {'M':>5} | {'bf16':>7} {'a16':>7} {'x':>5} {'floor':>6} | {'nvfp4':>7} {'x':>5} "
          f"{'quant':>6} {'floor':>6} | {'g.bf16':>7} {'g.a16':>6} {'x':>5} {'g.nvfp4':>7} {'x':>5}   (us)")
    for r in result["rows"]:
        line = (f"{r['N']:>6} {r['K']:>6} {r['M']:>5} | {r['bf16_us']:7.1f} {r['a16_us']:7.1f} {r['a16_x']:5.2f} "
                f"{r['floor_a16_us']:6.1f} | {r['nvfp4_us']:7.1f} {r['nvfp4_x']:5.2f} {r['quant_us']:6.1f} "
                f"{r['floor_nvfp4_us']:6.1f}")
        if "graph_a16_us" in r:
            line += (f" | {r['graph_bf16_us']:7.1f} {r['graph_a16_us']:6.1f} {r['graph_a16_x']:5.2f} "
                     f"{r['graph_nvfp4_us']:7.1f} {r['graph_nvfp4_x']:5.2f}")
        print(line)
    print("geo-mean over shapes (do_bench; CUDA graph in brackets), target in parentheses:")
    for m in ms:
        rows = [r for r in result["rows"] if r["M"] == m]
        a16_x, w4_x = geomean([r["a16_x"] for r in rows]), geomean([r["nvfp4_x"] for r in rows])
        line = f"  M={m:>5}: nvfp4a16 {a16_x:.2f}x  nvfp4 {w4_x:.2f}x"
        if m <= GRAPH_MAX_M:
            line += (f"  [{geomean([r['graph_a16_x'] for r in rows]):.2f}x "
                     f"{geomean([r['graph_nvfp4_x'] for r in rows]):.2f}x]")
        if m in TARGETS:
            line += f"  (targets {TARGETS[m][0]}x / {TARGETS[m][1]}x)"
        print(line)


if __name__ == "__main__":
    main()
