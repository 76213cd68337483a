"""What bounds the decode GEMV (M = 1): its weight bytes, or its work per byte? One CUDA GPU (sm_90 for TMA).

    PYTHONPATH=. python3 tools/bound_gemv.py [--out bound.json]

For each weight shape of ``bench_gemm.SHAPES``, CUDA-graph replays over weight copies that miss L2 (as
``tune_kernels.py``) of:
- cuBLAS bf16 ``F.linear`` (the baseline) and the backend's GEMV (``triton_gemm.launch_gemv``, best of
  ``tune_kernels.GEMV_CANDIDATES``);
- ``read_ldg``: a kernel that only reads the packed weight words, with the GEMV's tiles and loads (each thread's
  16-byte loads of the next step issued before it works on the current one), and XORs them;
- ``read_tma``: the same reads by TMA into shared memory (tensor descriptors, software-pipelined over STAGES);
- ``gemv_tma``: the GEMV's arithmetic (the same unpack and fp32 sums) with its weight words and scales by TMA.
The reads show how fast the bytes can come; the GEMVs, how much of that their work leaves. Each ``gemv_tma``
output (fp32) is checked against an fp64 product of the dequantized weight. tools/KERNEL_NOTES.md (version 19) has
a run.
"""

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gemm import SHAPES, geomean, graph_us  # noqa: E402
from tune_kernels import GEMV_CANDIDATES, L2_MISS_BYTES  # noqa: E402

from fp4compile import format as nvfp4  # noqa: E402
from fp4compile.kernels import triton_gemm  # noqa: E402
from fp4compile.kernels.triton_gemm import _UNPACK_SHIFT, _e2m1_word_to_f32, _e4m3_to_f16, _gemv_row  # noqa: E402

# (BLOCK_N, BLOCK_K, num_warps) and (BLOCK_N, BLOCK_K, num_warps, STAGES)
READ_LDG_CONFIGS = [(16, 1024, 4), (32, 1024, 4), (64, 512, 4), (16, 2048, 4), (32, 1024, 8)]
READ_TMA_CONFIGS = [(16, 1024, 4, 3), (32, 1024, 4, 3), (64, 512, 4, 4), (32, 512, 4, 6), (64, 1024, 8, 3),
                    (128, 256, 4, 6), (16, 2048, 4, 3)]
GEMV_TMA_CONFIGS = [(bn, bk, warps, stages) for bn in (8, 16, 32) for bk in (256, 512, 1024, 2048)
                    for warps in (2, 4, 8) for stages in (3, 4)
                    if 2048 <= bn * bk <= 32768 and bn * bk // (32 * warps) in (32, 64, 128)]


@triton.jit
def read_ldg(w_ptr, out_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    W: tl.constexpr = BLOCK_K // 8  # 32-bit words of 8 elements per row and step
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    acc = tl.zeros((BLOCK_N, W), dtype=tl.int32)
    words = w_ptr.to(tl.pointer_type(tl.int32)) + rows[:, None] * (K // 8) + tl.arange(0, W)[None, :]
    p = tl.load(words)
    for step in range(1, tl.cdiv(K, BLOCK_K) + 1):
        current = p
        p = tl.load(words + step * W, mask=step * W < K // 8, other=0)
        acc ^= current
    tl.store(out_ptr + rows, tl.xor_sum(acc, axis=1))


@triton.jit
def read_tma(w_desc, out_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr):
    W: tl.constexpr = BLOCK_K // 8
    off_n = tl.program_id(0) * BLOCK_N
    acc = tl.zeros((BLOCK_N, W), dtype=tl.int32)
    for step in tl.range(0, tl.cdiv(K, BLOCK_K), num_stages=STAGES):
        acc ^= w_desc.load([off_n, step * W])
    rows = off_n + tl.arange(0, BLOCK_N)
    tl.store(out_ptr + rows, tl.xor_sum(acc, axis=1), mask=rows < N)


@triton.jit
def gemv_tma(a_ptr, w_desc, s_desc, w_pts_ptr, out_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
             STAGES: tl.constexpr):
    """``triton_gemm._gemv_kernel``'s arithmetic for one bf16 row and one weight, the weight words and block scales
    coming by TMA (rows past N read as zeros and are not stored)."""
    W: tl.constexpr = BLOCK_K // 8
    G: tl.constexpr = BLOCK_K // 16
    off_n = tl.program_id(0) * BLOCK_N
    acc = tl.zeros((BLOCK_N, G), dtype=tl.float32)
    for step in tl.range(0, tl.cdiv(K, BLOCK_K), num_stages=STAGES):
        p = w_desc.load([off_n, step * W]).to(tl.uint32, bitcast=True)
        s = s_desc.load([off_n, step * G])
        offs_u = step * W + tl.arange(0, W)
        a = tl.load(a_ptr + offs_u[:, None] * 8 + tl.arange(0, 8)[None, :], mask=(offs_u < K // 8)[:, None],
                    other=0.0).to(tl.float32)
        acc = _gemv_row(acc, _e2m1_word_to_f32(p, True), _e4m3_to_f16(s, True).to(tl.float32), a)
    rows = off_n + tl.arange(0, BLOCK_N)
    out = tl.sum(acc, axis=1) * (tl.load(w_pts_ptr) * _UNPACK_SHIFT)
    tl.store(out_ptr + rows, out.to(out_ptr.dtype.element_ty), mask=rows < N)


def best(configs, calls_for) -> tuple:
    """(us, config) of the fastest config; a config that does not compile or fit is skipped with its reason."""
    times = []
    for config in configs:
        try:
            times.append((graph_us(calls_for(config)), config))
        except Exception as e:
            print(f"  skipped {config}: {type(e).__name__}: {str(e)[:150]}", flush=True)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.environ["OUT"], "bound_gemv.json") if "OUT" in os.environ
                        else None, help="JSON results path")
    args = parser.parse_args()
    rows = []
    for n, k in SHAPES:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        q = nvfp4.quantize(w)
        packed = (q.packed, q.scales.view(torch.uint8), q.global_scale)
        copies = [tuple(t.clone() for t in packed) for _ in range(math.ceil(L2_MISS_BYTES / (n * k * 9 / 16)))]
        bf16_copies = [w.clone() for _ in range(math.ceil(L2_MISS_BYTES / (2 * n * k)))]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        out = torch.empty(1, n, device="cuda", dtype=torch.float32)
        words_out = torch.empty(n, device="cuda", dtype=torch.int32)
        ref = x.double() @ nvfp4.dequantize_parts(*packed).double().t()

        def tma_gemv_calls(config, out=out):
            bn, bk, warps, stages = config
            descriptors = [(TensorDescriptor.from_tensor(c[0].view(torch.int32), [bn, bk // 8]),
                            TensorDescriptor.from_tensor(c[1], [bn, bk // 16]), c[2]) for c in copies]
            return [lambda d=d: gemv_tma[(triton.cdiv(n, bn),)](x, *d, out, n, k, BLOCK_N=bn, BLOCK_K=bk,
                                                                STAGES=stages, num_warps=warps)
                    for d in descriptors]

        row = {"N": n, "K": k, "weight_bytes": n * k * 9 // 16,
               "bf16": graph_us([lambda w=w: torch.nn.functional.linear(x, w) for w in bf16_copies]),
               "gemv": best(GEMV_CANDIDATES, lambda c: [lambda p=p: triton_gemm.launch_gemv(
                   x, None, None, [p], None, [out], config=c) for p in copies]),
               "read_ldg": best(READ_LDG_CONFIGS, lambda c: [lambda p=p: read_ldg[(triton.cdiv(n, c[0]),)](
                   p[0], words_out, n, k, BLOCK_N=c[0], BLOCK_K=c[1], num_warps=c[2]) for p in copies]),
               "read_tma": best(READ_TMA_CONFIGS, lambda c: [lambda d=TensorDescriptor.from_tensor(
                   p[0].view(torch.int32), [c[0], c[1] // 8]): read_tma[(triton.cdiv(n, c[0]),)](
                   d, words_out, n, k, BLOCK_N=c[0], BLOCK_K=c[1], STAGES=c[3], num_warps=c[2]) for p in copies]),
               "gemv_tma": best(GEMV_TMA_CONFIGS, tma_gemv_calls)}
        out.fill_(float("nan"))
        tma_gemv_calls(row["gemv_tma"][1])[0]()
        row["gemv_tma_err"] = ((out.double() - ref).norm() / ref.norm()).item()
        assert row["gemv_tma_err"] < 1e-5, f"gemv_tma off by {row['gemv_tma_err']:.1e} relative"
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
    names = ("gemv", "read_ldg", "read_tma", "gemv_tma")
    print(f"\n{torch.cuda.get_device_name()}: us (CUDA-graph replay), GB/s of packed weight bytes for the reads")
    print(f"{'N':>6} {'K':>6} | {'bf16':>6} | " + " | ".join(f"{name:>8}" for name in names))
    for r in rows:
        cells = [f"{r[name][0]:8.2f}" for name in names]
        cells[1] += f" ({r['weight_bytes'] / r['read_ldg'][0] / 1e3:4.0f})"
        cells[2] += f" ({r['weight_bytes'] / r['read_tma'][0] / 1e3:4.0f})"
        print(f"{r['N']:>6} {r['K']:>6} | {r['bf16']:6.2f} | " + " | ".join(cells))
    print("geo-mean speed against bf16: " + ", ".join(
        f"{name} {geomean([r['bf16'] / r[name][0] for r in rows]):.2f}x" for name in names))


if __name__ == "__main__":
    main()
