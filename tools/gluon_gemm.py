"""Experiment (not used by the backend): a fused NVFP4 x bf16/fp16 GEMM for Hopper written in Gluon.

    PYTHONPATH=. python3 tools/gluon_gemm.py [--out gluon_gemm.json] [--ms 16,128,256,1024,2048,4096]

One kernel reads the packed weight, dequantizes it in registers straight into the layout of wgmma's left operand
and multiplies it with the activation from shared memory (``out^T = W @ A^T``), so no dequantized weight ever
goes to memory. The weight is repacked once, offline (``repack``), so that each thread's bytes of a K step are
16 contiguous bytes in the order its registers need them; the activation tiles come by TMA. Gluon (Triton's
layout-explicit dialect, ``triton.experimental.gluon``) is needed for what plain Triton 3.6 does not do: an
asynchronous wgmma whose operand comes from registers, with the dequantize of the next K step placed while the
current wgmma runs.

The command checks the kernel against an fp64 product of the dequantized operands (fp32 accumulation: at most
1e-5 relative; three launches per case, output poisoned with NaN) and times it with ``triton.testing.do_bench``
against cuBLAS bf16 ``F.linear`` and the backend's own kernels as it runs them (``torch.ops.fp4.gemm_a16``
compiled: above 128 rows exact dequantize, cuBLAS with fp32 output and a fused epilogue; at 128 rows and fewer the
tensor-core kernel). At 128 rows and fewer it also times CUDA-graph replays over weight copies that miss L2 and
picks the fused kernel's config by them. tools/KERNEL_NOTES.md (version 14) has the results: the fused kernel
beats the backend's kernels from 16 to 1024 rows, ties the plan at 2048 and loses at 4096. The backend does not use it yet
because it needs the repacked weight layout, which the one-row GEMV does not read (the notes say what wiring it in
takes).
"""

import argparse
import json
import math
import os

import torch
import torch.nn.functional as F
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from triton.testing import do_bench

import fp4compile.ops  # noqa: F401  (registers torch.ops.fp4)
from fp4compile import format as nvfp4
from fp4compile.kernels.triton_gemm import _operand_ptx, dequantize

_PTX_BF16 = gl.constexpr(_operand_ptx("bf16"))
_PTX_F16 = gl.constexpr(_operand_ptx("f16"))
# (BLOCK_M, BLOCK_N, BLOCK_K, STAGES, warps, SPLIT_K): one config of each weight tile (128 rows, 8 warps; 64, 4)
CONFIGS = [(256, 128, 64, 4, 8, 1), (16, 64, 64, 6, 4, 1)]
SHAPES = ((4096, 4096), (14336, 4096), (4096, 14336), (8192, 8192))
MS = (16, 128, 256, 1024, 2048, 4096)
GRAPH_MS = 128  # and fewer rows: also timed as CUDA-graph replays


def configs_for(m: int) -> list:
    """The configs timed at ``m`` rows: BLOCK_M the rows rounded up to a power of two (16-256), BLOCK_N 128 with
    8 warps (4 or 5 stages) or 64 with 4 warps; at up to 128 rows also K split 4 ways."""
    block_m = min(256, max(16, triton.next_power_of_2(m)))
    configs = [(block_m, 128, 64, 4, 8, 1), (block_m, 128, 64, 5, 8, 1), (block_m, 64, 64, 6, 4, 1)]
    return configs + ([(block_m, 64, 64, 6, 4, 4)] if m <= GRAPH_MS else [])


@gluon.constexpr_function
def _operand_bytes(dot_ll, groups):
    """The wgmma left operand's linear layout over [rows, K] -> the layout of its packed bytes as [rows, groups, 8].

    Element k is nibble ``k % 2`` of byte ``k // 2``, so dropping the register basis that steps k by one (the
    nibble) and halving k in the others gives the bytes each thread must hold; after the unpack, ``join`` puts the
    nibble back as the lowest register basis and the operand needs no data movement."""
    def per_block(basis):
        row, k = basis
        return [row, k // 2 // 8, k // 2 % 8]

    regs = [b for b in dot_ll.reg_bases if b != [0, 1]]
    assert len(regs) == len(dot_ll.reg_bases) - 1, dot_ll.reg_bases
    return gl.DistributedLinearLayout([per_block(b) for b in regs], [per_block(b) for b in dot_ll.lane_bases],
                                      [per_block(b) for b in dot_ll.warp_bases], [], [dot_ll.shape[0], groups, 8])


@gluon.constexpr_function
def _byte_layout(block_n, num_warps):
    """``_operand_bytes`` written out for BLOCK_K = 64 (the kernel checks at compile time that they agree):
    registers step the row by 8, the byte by 4 and the 16-element block by 1 and 2 (then rows past the warps);
    lanes step the byte by 1 and 2 and the row by 1, 2, 4; warps step the row by 16, 32, ..."""
    reg = [[8, 0, 0], [0, 0, 4], [0, 1, 0], [0, 2, 0]]
    rows = 16 * num_warps
    while rows < block_n:
        reg.append([rows, 0, 0])
        rows *= 2
    warps = [[16 << i, 0, 0] for i in range(num_warps.bit_length() - 1)]
    return gl.DistributedLinearLayout(reg, [[0, 0, 1], [0, 0, 2], [1, 0, 0], [2, 0, 0], [4, 0, 0]], warps, [],
                                      [block_n, 4, 8])


@gluon.constexpr_function
def _repack_order(layout):
    """For each bit of a row-major [rows, groups, 8] byte index, from the most significant, the bit of the
    repacked index ``thread * 16 + register`` (warp bits, lane bits, register bits, most significant first)
    that the layout maps onto it."""
    source = [list(b) for b in [*reversed(layout.warp_bases), *reversed(layout.lane_bases),
                                *reversed(layout.reg_bases)]]
    order = []
    for dim, size in enumerate(layout.shape):
        for bit in reversed(range(size.bit_length() - 1)):
            target = [0] * len(layout.shape)
            target[dim] = 1 << bit
            order.append(source.index(target))
    return order


@gluon.constexpr_function
def _bit_shape(layout):
    return [2] * len(_repack_order(layout))


def repack(packed, config):
    """[N, K/2] packed bytes -> [N/BLOCK_N (rows zero-padded), K/64, threads * 16] for ``fused_gemm``: the bytes
    thread t holds in a K step of 64 elements at [t * 16, t * 16 + 16), in its register order."""
    block_n, warps = config[1], config[4]
    n, half_k = packed.shape
    order = _repack_order(_byte_layout(block_n, warps))
    inverse = [order.index(d) for d in range(len(order))]
    tiles = torch.nn.functional.pad(packed, (0, 0, 0, -n % block_n)).view(-1, block_n, half_k // 32, 32)
    tiles = tiles.permute(0, 2, 1, 3)
    bits = tiles.reshape(*tiles.shape[:2], *([2] * len(order)))
    return bits.permute(0, 1, *[2 + d for d in inverse]).reshape(*tiles.shape[:2], -1).contiguous()


@gluon.jit
def _copy_step(step, slot, a_desc, off_m, off_k, bars, w_ptrs, s_ptrs, s_ok, a_smem, w_smem, s_smem, steps,
               BLOCK_K: gl.constexpr):
    """K step ``step`` of this program's slice (which starts at element ``off_k``; ``w_ptrs`` and ``s_ptrs`` point
    at its start) into ring slot ``slot``: the activation tile by TMA (arriving on the slot's mbarrier; rows past
    M read as zeros), the repacked weight bytes and block scales by cp.async. Steps past the slice copy nothing."""
    live = step < steps
    mbarrier.expect(bars.index(slot), a_desc.block_type.nbytes, pred=live)
    tma.async_copy_global_to_shared(a_desc, [off_m, off_k + step * BLOCK_K], bars.index(slot), a_smem.index(slot),
                                    pred=live)
    cp.async_copy_global_to_shared(w_smem.index(slot), w_ptrs + step * w_smem.shape[1] * 16, mask=live)
    cp.async_copy_global_to_shared(s_smem.index(slot), s_ptrs + step * (BLOCK_K // 16), mask=s_ok & live)


@gluon.jit
def _dequantize_step(w_smem, s_smem, slot, byte_layout: gl.constexpr, dot_layout: gl.constexpr,
                     DTYPE: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr):
    """Repacked bytes and scales of one ring slot -> the exact ``e2m1 * S_b`` weight tile (times 2**-7 for bf16,
    2**-14 for fp16, as the inline PTX of triton_gemm leaves it) in wgmma's left-operand layout.

    Each thread reads its 16 bytes with one vector load; reshaping them into bits and permuting the bits
    (``_repack_order``) only relabels registers, into ``byte_layout``: ``assert_trivial`` makes the compiler
    prove that no data moves."""
    G: gl.constexpr = BLOCK_K // 16
    THREADS: gl.constexpr = w_smem.shape[1]
    raw = w_smem.index(slot).load(gl.BlockedLayout([1, 16], [32, 1], [THREADS // 32, 1], [1, 0]))
    order: gl.constexpr = _repack_order(_byte_layout(BLOCK_N, THREADS // 32))
    p = gl.reshape(gl.permute(gl.reshape(raw, _bit_shape(byte_layout).value), order.value), [BLOCK_N, G, 8])
    p = gl.convert_layout(p, byte_layout, assert_trivial=True)
    s = s_smem.index(slot).load(gl.SliceLayout(2, byte_layout)).to(gl.float8e4nv, bitcast=True)
    if DTYPE == gl.bfloat16:
        _, scale = gl.broadcast(p, gl.expand_dims((s.to(gl.float32) * 2.0**119).to(gl.bfloat16), 2))
        lo, hi = gl.inline_asm_elementwise(_PTX_BF16, "=r,=r,=r,=r,r,r,r", [p, scale],
                                           dtype=(gl.bfloat16, gl.bfloat16), is_pure=True, pack=4)
    else:
        _, scale = gl.broadcast(p, gl.expand_dims(s.to(gl.float16), 2))
        lo, hi = gl.inline_asm_elementwise(_PTX_F16, "=r,=r,=r,=r,r,r,r", [p, scale],
                                           dtype=(gl.float16, gl.float16), is_pure=True, pack=4)
    return gl.convert_layout(gl.reshape(gl.join(lo, hi), [BLOCK_N, BLOCK_K]), dot_layout)


@gluon.jit
def fused_kernel(a_desc, w_ptr, s_ptr, w_pts_ptr, a_pts_ptr, bias_ptr, out_ptr, partial_ptr,
                 M, N, K, stride_wn, stride_sn, stride_om,
                 ALPHA_SHIFT: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, SPLIT_K: gl.constexpr,
                 num_warps: gl.constexpr):
    """out[m, n] = alpha * sum_k A[m, k] W[n, k] + bias[n] for a tile of BLOCK_N weight rows and BLOCK_M activation
    rows; K must be a multiple of BLOCK_K (the launcher checks). With SPLIT_K > 1, program (m, n, s) sums the s-th
    slice of the K steps and stores its raw fp32 sum in ``partial_ptr`` [SPLIT_K, M, N] for the launcher to add up.

    Pipeline, per K step i: wgmma(i) is issued on the operand dequantized the step before; while it runs, the
    bytes of step i+1 (copied STAGES - 2 steps ahead) are dequantized; then the wait retires wgmma(i-1), a CTA
    barrier makes sure every warpgroup has, and the copies of step i + STAGES - 2 go into the slot that
    wgmma(i-2) read. The operand of wgmma(i-1) is passed to that wait, which keeps its registers from being reused
    while the MMA reads them.
    """
    BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
    G: gl.constexpr = BLOCK_K // 16
    DTYPE: gl.constexpr = a_desc.dtype
    pid_m = gl.program_id(0)
    pid_n = gl.program_id(1)
    per_split = gl.cdiv(K // BLOCK_K, SPLIT_K)
    first = gl.program_id(2) * per_split
    steps = gl.maximum(gl.minimum(per_split, K // BLOCK_K - first), 0)

    # cp.async: 16 bytes per thread of the repacked weight (one thread's bytes), and each row's G scale bytes.
    w_copy: gl.constexpr = gl.BlockedLayout([1, 16], [32, 1], [num_warps, 1], [1, 0])
    s_copy: gl.constexpr = gl.BlockedLayout([1, G], [32, 1], [num_warps, 1], [1, 0])
    plain: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[1, 0])
    a_smem = gl.allocate_shared_memory(DTYPE, [STAGES, BLOCK_M, BLOCK_K], a_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(bars.index(s), count=1)
    w_smem = gl.allocate_shared_memory(gl.uint8, [STAGES, 32 * num_warps, 16], plain)
    s_smem = gl.allocate_shared_memory(gl.uint8, [STAGES, BLOCK_N, G], plain)

    thread = gl.arange(0, 32 * num_warps, gl.SliceLayout(1, w_copy))
    w_ptrs = (w_ptr + pid_n * stride_wn + first * 32 * num_warps * 16 + thread[:, None] * 16
              + gl.arange(0, 16, gl.SliceLayout(0, w_copy))[None, :])
    rows_s = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, gl.SliceLayout(1, s_copy))
    s_ptrs = s_ptr + rows_s[:, None] * stride_sn + first * G + gl.arange(0, G, gl.SliceLayout(0, s_copy))[None, :]
    s_ok = (rows_s < N)[:, None]
    off_m = pid_m * BLOCK_M
    off_k = first * BLOCK_K

    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, BLOCK_M, 16])
    dot: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    bytes3: gl.constexpr = _operand_bytes(gl.to_linear_layout(dot, [BLOCK_N, BLOCK_K]), G)

    for s in gl.static_range(STAGES - 2):
        _copy_step(s, s, a_desc, off_m, off_k, bars, w_ptrs, s_ptrs, s_ok, a_smem, w_smem, s_smem, steps, BLOCK_K)
        cp.commit_group()
    acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, mma)
    cp.wait_group(STAGES - 3)
    w_next = _dequantize_step(w_smem, s_smem, 0, bytes3, dot, DTYPE, BLOCK_N, BLOCK_K)
    w_prev = gl.zeros([BLOCK_N, BLOCK_K], DTYPE, dot)
    for i in range(steps):
        w = w_next
        mbarrier.wait(bars.index(i % STAGES), (i // STAGES) & 1)
        acc = warpgroup_mma(w, a_smem.index(i % STAGES).permute((1, 0)), acc, is_async=True)
        cp.wait_group(STAGES - 4)
        w_next = _dequantize_step(w_smem, s_smem, (i + 1) % STAGES, bytes3, dot, DTYPE, BLOCK_N, BLOCK_K)
        acc, w_prev = warpgroup_mma_wait(num_outstanding=1, deps=(acc, w_prev))
        w_prev = w
        gl.thread_barrier()
        _copy_step(i + STAGES - 2, (i + STAGES - 2) % STAGES, a_desc, off_m, off_k, bars, w_ptrs, s_ptrs, s_ok,
                   a_smem, w_smem, s_smem, steps, BLOCK_K)
        cp.commit_group()
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    cp.wait_group(0)

    # The tile is out^T: store it through a layout whose threads run along n, the output's contiguous dimension.
    store: gl.constexpr = gl.BlockedLayout([8, 1], [BLOCK_N // 8, 32 // (BLOCK_N // 8)], [1, num_warps], [0, 1])
    offs_n = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, gl.SliceLayout(1, store))
    offs_m = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, gl.SliceLayout(0, store))
    mask = (offs_n < N)[:, None] & (offs_m < M)[None, :]
    if SPLIT_K > 1:
        partial = partial_ptr + (gl.program_id(2) * M + offs_m[None, :]) * N + offs_n[:, None]
        gl.store(partial, gl.convert_layout(acc, store), mask=mask)
        return
    alpha = gl.load(w_pts_ptr) * ALPHA_SHIFT
    if a_pts_ptr is not None:
        alpha = alpha * gl.load(a_pts_ptr)
    out = gl.convert_layout(acc * alpha, store)
    if bias_ptr is not None:
        out += gl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(gl.float32)[:, None]
    gl.store(out_ptr + offs_m[None, :] * stride_om + offs_n[:, None], out.to(out_ptr.dtype.element_ty), mask=mask)


def fused_gemm(a, w_repacked, w_scales, w_pts, bias, out, a_pts=None, config=CONFIGS[0]):
    """``out = a @ dequant(w).T * a_pts + bias`` with bf16/fp16 ``a [M, K]`` (an NVFP4 activation arrives
    dequantized, its global scale in ``a_pts``), ``w_repacked = repack(w_packed, config)``; ``out`` [M, N] of any
    float dtype. With a K split the slices' fp32 sums are added up, scaled and cast by torch ops afterwards."""
    block_m, block_n, block_k, stages, warps, split = config
    m, k = a.shape
    n = w_scales.shape[0]
    if block_k != 64 or k % 256:  # the repacked layout's K step; scale rows aligned for 4-byte copies
        raise ValueError(f"this kernel takes BLOCK_K=64 and K a multiple of 256, got {block_k} and K={k}")
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), split)
    partials = torch.empty((split, m, n), device=a.device, dtype=torch.float32) if split > 1 else None
    shift = 2.0**7 if a.dtype == torch.bfloat16 else 2.0**14
    gl_dtype = gl.bfloat16 if a.dtype == torch.bfloat16 else gl.float16
    a_desc = TensorDescriptor(a, list(a.shape), list(a.stride()), [block_m, block_k],
                              gl.NVMMASharedLayout.get_default_for([block_m, block_k], gl_dtype))
    fused_kernel[grid](a_desc, w_repacked, w_scales.view(torch.uint8), w_pts, a_pts, bias, out, partials, m, n, k,
                       w_repacked.stride(0), w_scales.stride(0), out.stride(0),
                       ALPHA_SHIFT=shift, BLOCK_N=block_n, STAGES=stages, SPLIT_K=split, num_warps=warps)
    if partials is not None:
        alpha = w_pts.float() * shift * (1.0 if a_pts is None else a_pts.float())
        total = partials.sum(0) * alpha + (0.0 if bias is None else bias.float())
        out.copy_(total)
    return out


def random_weight(n, k):
    """A bf16 weight with columns spread over six decades, and its NVFP4 parts."""
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    w *= torch.logspace(-3, 3, k, device="cuda", dtype=torch.bfloat16)[torch.randperm(k, device="cuda")]
    q = nvfp4.quantize(w)
    return w, q.packed, q.scales.view(torch.uint8), q.global_scale


def check(m, n, k, dtype, with_bias, a_fp4, config) -> dict:
    """Worst relative error over three launches against the fp64 product, and the NaNs left in the output."""
    _, p, s, pts = random_weight(n, k)
    x = (torch.randn(m, k, device="cuda") * 3).to(dtype)
    x[0, :16] = 0
    bias = torch.randn(n, device="cuda", dtype=dtype) if with_bias else None
    a_pts = None
    if a_fp4:
        qa = nvfp4.quantize(x)
        x = dequantize(qa.packed, qa.scales.view(torch.uint8), dtype)
        a_pts = qa.global_scale.float().reshape(1)
    ref = x.double() @ nvfp4.dequantize_parts(p, s, pts).double().t()
    ref = ref * (1.0 if a_pts is None else a_pts.double()) + (0.0 if bias is None else bias.double())
    worst, nans = 0.0, 0
    repacked = repack(p, config)
    for _ in range(3):
        out = torch.full((m, n), float("nan"), device="cuda", dtype=torch.float32)
        fused_gemm(x, repacked, s, pts, bias, out, a_pts, config)
        worst = max(worst, ((out.double() - ref).norm() / ref.norm()).item())
        nans += int(torch.isnan(out).sum())
    return {"M": m, "N": n, "K": k, "dtype": str(dtype), "bias": with_bias, "a_fp4": a_fp4, "config": config,
            "err": worst, "nan": nans}


def main() -> None:
    from bench_gemm import graph_us  # tools/ is the script's directory

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.environ["OUT"], "gluon_gemm.json") if "OUT" in os.environ
                        else None, help="JSON results path")
    parser.add_argument("--ms", default=",".join(map(str, MS)), help="activation rows M")
    parser.add_argument("--no-check", action="store_true", help="time only (the configs were checked before)")
    args = parser.parse_args()
    ms = [int(v) for v in args.ms.split(",")]
    torch.manual_seed(0)
    result = {"device": torch.cuda.get_device_name(), "checks": [], "rows": []}
    for config in [] if args.no_check else sorted({c for m in ms for c in configs_for(m)}):
        for m, n, k in [(1000, 4096, 4096), (300, 100, 256), (17, 4096, 4096), (4096, 4096, 14336), (1, 200, 256)]:
            for dtype in (torch.bfloat16, torch.float16):
                for a_fp4 in (False, True) if m == 1000 else (False,):
                    result["checks"].append(check(m, n, k, dtype, m % 2 == 1, a_fp4, config))
    bad = [c for c in result["checks"] if c["err"] > 1e-5 or c["nan"]]
    print(f"{len(result['checks'])} checks, {len(bad)} failed: {bad}", flush=True)

    def us(fn):
        return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3

    torch._dynamo.config.cache_size_limit = 64
    plan = torch.compile(lambda x, p, s, t: torch.ops.fp4.gemm_a16(x, [p], [s], [t], [None])[0], dynamic=False)
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    for n, k in SHAPES:
        w, p, s, pts = random_weight(n, k)
        for m in ms:
            torch._dynamo.reset()
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            repacked = {c: repack(p, c) for c in configs_for(m)}
            fused = {c: us(lambda c=c: fused_gemm(x, repacked[c], s, pts, None, out, None, c)) for c in repacked}
            best = min(fused, key=fused.get)
            row = {"N": n, "K": k, "M": m, "bf16_us": us(lambda: F.linear(x, w)),
                   "plan_us": us(lambda: plan(x, p, s, pts)), "fused_us": fused[best], "config": best}
            if m <= GRAPH_MS:  # kernel times: each config in a graph over weight copies that miss L2; the best
                copies = max(2, math.ceil(3 * l2 / (n * k * 9 / 16)))
                plain = [(p.clone(), s.clone(), pts.clone()) for _ in range(copies)]
                bf16 = [w.clone() for _ in range(max(2, math.ceil(3 * l2 / (2 * n * k))))]
                row["graph_bf16_us"] = graph_us([lambda w=w: F.linear(x, w) for w in bf16])
                row["graph_plan_us"] = graph_us([lambda q=q: plan(x, *q) for q in plain])
                graph = {}
                for c in repacked:
                    parts = [(repack(q[0], c), q[1], q[2]) for q in plain]
                    graph[c] = graph_us([lambda q=q, c=c: fused_gemm(x, q[0], q[1], q[2], None, out, None, c)
                                         for q in parts])
                row["graph_config"] = min(graph, key=graph.get)
                row["graph_fused_us"] = graph[row["graph_config"]]
            result["rows"].append(row)
            print(json.dumps({key: round(v, 1) if isinstance(v, float) else v for key, v in row.items()}), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(f"\n{result['device']}: geo-mean over shapes of bf16 time / time (do_bench medians; CUDA graph in brackets)")
    for m in ms:
        rows = [r for r in result["rows"] if r["M"] == m]

        def ratio(key, base="bf16_us"):
            return math.exp(sum(math.log(r[base] / r[key]) for r in rows) / len(rows))

        line = f"  M={m:>5}: backend plan {ratio('plan_us'):.2f}x  Gluon fused {ratio('fused_us'):.2f}x"
        if m <= GRAPH_MS:
            line += (f"  [plan {ratio('graph_plan_us', 'graph_bf16_us'):.2f}x  "
                     f"fused {ratio('graph_fused_us', 'graph_bf16_us'):.2f}x]")
        print(line)


if __name__ == "__main__":
    main()
