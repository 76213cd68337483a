"""Sweep the kernels' configurations on one CUDA GPU (CUDA-graph replay, weights rotated past L2).

    PYTHONPATH=. python3 tools/tune_kernels.py [--shapes 4096x4096,...] [--ms 1,16,32,64,128] [--paths gemv,...]
                                               [--out tune.json]

For each weight shape (N, K) and batch M it times cuBLAS bf16 ``F.linear``, the dequantize + cuBLAS path
(``triton_gemm.launch_cublas``, what compiled graphs run above ``DIRECT_MAX_ROWS`` rows) and every candidate
configuration of the kernels for that M (``_gemv_kernel`` up to ``GEMV_MAX_ROWS``, whatever the backend's own limit
for bf16 activations, ``GEMV_A16_MAX_ROWS``; ``_mma_kernel`` from 2 rows up to ``DIRECT_MAX_ROWS``;
on Hopper also the fused Gluon kernel, from one row up to ``FUSED_MAX_ROWS``: ``FUSED_CANDIDATES`` up to
``DIRECT_MAX_ROWS``, a wider list than ``gluon_gemm.configs_for``), all nvfp4a16 with bf16 activations; and the
integer GEMV of nvfp4 (``gemv-nvfp4``: ``_gemv_w4a4_kernel`` after its operand kernel, the activation quantized with
its dynamic scale, as the backend runs it) up to ``GEMV_MAX_ROWS``. ``--paths`` picks among them. It prints the
fastest configurations per point, a table of the best of each path, and per path and M the configs closest to each
shape's best over all shapes: what the row limits and the default lists (``_GEMV_CONFIGS``, ``_GEMV_W4A4_CONFIGS``,
``_mma_configs``, ``gluon_gemm.configs_for``) are chosen from (tools/KERNEL_NOTES.md records the runs).
"""

import argparse
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gemm import SHAPES, geomean, graph_us, write_rows  # noqa: E402

from fp4compile import format as nvfp4  # noqa: E402
from fp4compile import kernels  # noqa: E402
from fp4compile.kernels import triton_gemm  # noqa: E402

# (BLOCK_N, BLOCK_K, num_warps)
GEMV_CANDIDATES = [(bn, bk, warps) for bn in (4, 8, 16, 32) for bk in (256, 512, 1024) for warps in (4, 8)
                   if bn * bk <= 16384]
# The integer GEMV holds a quarter of the bf16 GEMV's registers a weight element: tiles up to twice as large
GEMV_W4A4_CANDIDATES = [(bn, bk, warps) for bn in (8, 16, 32, 64) for bk in (512, 1024, 2048) for warps in (4, 8)
                        if 4096 <= bn * bk <= 32768]
# (BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages, A_DOT_ORDER); BLOCK_M is M rounded up to a power of two, 16
# at least
MMA_CANDIDATES = [(bn, 64, split, 4 if bn == 64 else 8, stages, order)
                  for bn, stages in ((64, 3), (64, 4), (64, 6), (128, 3)) for split in (1, 2, 4, 8)
                  for order in (False, True)]
# (BLOCK_N, num_warps, STAGES, SPLIT_K, GATHER) of the fused kernel up to DIRECT_MAX_ROWS rows, where graphs call
# it; above, gluon_gemm.configs_for. BLOCK_M is M rounded up to a power of two (16 at least).
FUSED_CANDIDATES = [(bn, warps, stages, split, gather) for bn, warps in ((64, 4), (128, 4), (128, 8), (256, 8))
                    for stages in (6, 10) for split in (1, 2, 4, 8) for gather in (True, False)
                    if gather or (stages == 6 and split in (1, 4))]
PATHS = ("gemv", "gemv-nvfp4", "kernel", "fused")
L2_MISS_BYTES = 150 * 2**20  # weight copies per graph: enough bytes that every replay reads from memory


def sweep(configs, launch) -> list[tuple[float, tuple]]:
    times = []
    for config in configs:
        try:
            times.append((graph_us(launch(config)), config))
        except Exception as e:  # a config that does not compile or fit is skipped, with the reason
            print(f"  skipped {config}: {type(e).__name__}: {str(e)[:200]}", flush=True)
    return sorted(times)


def quantizing_gemv(a, a_scales, a_pts, weights, biases, outs, config):
    """nvfp4's GEMV as ``kernels.quantize_gemm`` runs it: the activation quantized with its dynamic scale."""
    return triton_gemm.launch_gemv(a, a_scales, a_pts, weights, biases, outs, config=config, quantize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_out = os.path.join(os.environ["OUT"], "tune.json") if "OUT" in os.environ else None
    parser.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES), help="NxK,NxK,...")
    parser.add_argument("--ms", default="1,16,32,64,128", help="batch sizes M")
    parser.add_argument("--paths", default=",".join(PATHS), help=f"of {', '.join(PATHS)}")
    parser.add_argument("--out", default=default_out, help="JSON results path")
    args = parser.parse_args()
    chosen = args.paths.split(",")
    if not set(chosen) <= set(PATHS):
        parser.error(f"--paths takes {', '.join(PATHS)}")
    rows = []
    for n, k in (tuple(map(int, s.split("x"))) for s in args.shapes.split(",")):
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        q = nvfp4.quantize(w)
        packed = (q.packed, q.scales.view(torch.uint8), q.global_scale)
        fp4_copies = [tuple(t.clone() for t in packed) for _ in range(math.ceil(L2_MISS_BYTES / (n * k * 9 / 16)))]
        bf16_copies = [w.clone() for _ in range(math.ceil(L2_MISS_BYTES / (2 * n * k)))]
        for m in (int(v) for v in args.ms.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            w_deq = nvfp4.dequantize_parts(*packed)
            ref = x.float() @ w_deq.t()
            xq = nvfp4.quantize(x)
            ref_nvfp4 = nvfp4.dequantize_parts(xq.packed, xq.scales.view(torch.uint8), xq.global_scale) @ w_deq.t()
            row = {"N": n, "K": k, "M": m, "bf16_us": graph_us([lambda w=w: F.linear(x, w) for w in bf16_copies])}
            row["cublas_path_us"] = graph_us([lambda w=w: triton_gemm.launch_cublas(x, None, None, [w], None, [out])
                                              for w in fp4_copies])
            paths = []  # (name, configs, launch)
            if m <= kernels.GEMV_MAX_ROWS:
                paths.append(("gemv", GEMV_CANDIDATES, triton_gemm.launch_gemv))
                paths.append(("gemv-nvfp4", GEMV_W4A4_CANDIDATES, quantizing_gemv))
            if 1 < m <= kernels.DIRECT_MAX_ROWS:
                block_m = max(16, triton_gemm.triton.next_power_of_2(m))
                paths.append(("kernel", [(bn, block_m, bk, split, warps, stages, order)
                                         for bn, bk, split, warps, stages, order in MMA_CANDIDATES],
                              triton_gemm.launch_mma))
            if kernels.fused_problem(x.device, max(m, 2), k) is None:  # at one row too, against the GEMV
                from fp4compile.kernels import gluon_gemm

                block_m = max(16, triton_gemm.triton.next_power_of_2(m))
                configs = (gluon_gemm.configs_for(m) if m > kernels.DIRECT_MAX_ROWS else
                           [(block_m, bn, stages, warps, split, gather)
                            for bn, warps, stages, split, gather in FUSED_CANDIDATES])
                paths.append(("fused", configs, gluon_gemm.launch))
            for name, configs, launch in (path for path in paths if path[0] in chosen):
                times = sweep(configs, lambda c: [lambda w=w: launch(x, None, None, [w], None, [out], config=c)
                                                  for w in fp4_copies])
                out.fill_(float("nan"))
                launch(x, None, None, [packed], None, [out], config=times[0][1])
                expected = ref_nvfp4 if name == "gemv-nvfp4" else ref
                row[f"{name}_err"] = ((out.float() - expected).norm() / expected.norm()).item()
                row[f"{name}_us"], row[f"{name}_config"] = times[0]
                row[f"{name}_top"] = [(round(t, 2), c) for t, c in times[:5]]
                row[f"{name}_all"] = [(t, c) for t, c in times]
                print(f"N={n} K={k} M={m}: bf16 {row['bf16_us']:.1f} us, dequantize+cuBLAS "
                      f"{row['cublas_path_us']:.1f} | {name} (err {row[name + '_err']:.1e}): "
                      + ", ".join(f"{t:.1f} us {c}" for t, c in times[:4]), flush=True)
            rows.append(row)
            write_rows(args.out, rows)
    print(f"\n{torch.cuda.get_device_name()} (us, CUDA-graph replay; x = bf16 / path)")
    print(f"{'N':>6} {'K':>6} {'M':>4} | {'bf16':>6} {'deq+cuBLAS':>10} {'x':>5} | "
          + " | ".join(f"{name:>10} {'x':>5}" for name in PATHS))
    for r in rows:
        cells = [f"{r[name + '_us']:10.1f} {r['bf16_us'] / r[name + '_us']:5.2f}" if name + "_us" in r else
                 f"{'-':>10} {'-':>5}" for name in PATHS]
        print(f"{r['N']:>6} {r['K']:>6} {r['M']:>4} | {r['bf16_us']:6.1f} {r['cublas_path_us']:10.1f} "
              f"{r['bf16_us'] / r['cublas_path_us']:5.2f} | {' | '.join(cells)}")
    for m in sorted({r["M"] for r in rows}):
        sel = [r for r in rows if r["M"] == m]
        line = f"  M={m:>4}: dequantize+cuBLAS {geomean([r['bf16_us'] / r['cublas_path_us'] for r in sel]):.2f}x"
        for name in PATHS:
            if all(name + "_us" in r for r in sel):
                line += f", {name} {geomean([r['bf16_us'] / r[name + '_us'] for r in sel]):.2f}x"
        print(line + " of bf16 (geo-mean)")
    print("\nconfigs whose time over the shapes is closest to each shape's best (geo-mean of time / best):")
    for name in PATHS:
        for m in sorted({r["M"] for r in rows if name + "_all" in r}):
            print(f"  {name} M={m}: " + ", ".join(f"{c} {x:.3f}" for x, c in closest(rows, name, m)[:5]))


def closest(rows, name: str, m: int) -> list[tuple[float, tuple]]:
    """(geo-mean over the shapes of time / that shape's best time, config) for the configs that ran on every
    shape at ``m`` rows, best first."""
    sel = [r for r in rows if r["M"] == m and name + "_all" in r]
    per_shape = [{tuple(c): t / r[name + "_us"] for t, c in r[name + "_all"]} for r in sel]
    common = set.intersection(*(set(times) for times in per_shape))
    return sorted((geomean([times[c] for times in per_shape]), c) for c in common)

if __name__ == "__main__":
    main()
