"""Time ``_mma_kernel`` configurations at decode sizes on one CUDA GPU (CUDA-graph replay, weights rotated past L2).

    PYTHONPATH=. python3 tools/tune_mma.py [--shapes 4096x4096,14336x4096] [--ms 2,16]

Prints, per (N, K, M), cuBLAS bf16 and the four fastest configurations of the candidate list below (the kernel's
default list, ``triton_gemm._mma_configs``, is the winners of such runs; tools/KERNEL_NOTES.md has them).
Configurations are (BLOCK_N, BLOCK_M, BLOCK_K, SPLIT_K, num_warps, num_stages).
"""

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gemm import graph_us  # noqa: E402

from fp4compile import format as nvfp4  # noqa: E402
from fp4compile.kernels import triton_gemm  # noqa: E402

CANDIDATES = [(bn, 16, bk, split, 4, stages) for bn in (64, 128) for bk in (64, 128, 256)
              for split in (2, 4, 8) for stages in (3, 4)]
L2_MISS_BYTES = 150 * 2**20  # weight copies per graph: enough bytes that every replay reads from memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="4096x4096,14336x4096", help="NxK,NxK,...")
    parser.add_argument("--ms", default="2,16", help="batch sizes M (at most 16)")
    args = parser.parse_args()
    for n, k in (tuple(map(int, s.split("x"))) for s in args.shapes.split(",")):
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        q = nvfp4.quantize(w)
        packed = (q.packed, q.scales.view(torch.uint8), q.global_scale)
        fp4_copies = [tuple(t.clone() for t in packed) for _ in range(math.ceil(L2_MISS_BYTES / (n * k * 9 / 16)))]
        bf16_copies = [w.clone() for _ in range(math.ceil(L2_MISS_BYTES / (2 * n * k)))]
        for m in (int(v) for v in args.ms.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            bf16_us = graph_us([lambda w=w: F.linear(x, w) for w in bf16_copies])
            times = []
            for config in CANDIDATES:
                try:
                    times.append((graph_us([lambda w=w: triton_gemm.launch_mma(x, None, None, *w, None, out,
                                                                               config=config) for w in fp4_copies]),
                                  config))
                except triton_gemm.triton.runtime.errors.OutOfResources:
                    continue
            best = ", ".join(f"{t:.1f} us {c}" for t, c in sorted(times)[:4])
            print(f"N={n} K={k} M={m}: bf16 {bf16_us:.1f} us | {best}", flush=True)


if __name__ == "__main__":
    main()
