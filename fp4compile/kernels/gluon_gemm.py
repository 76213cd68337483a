"""A fused NVFP4 GEMM for Hopper (sm_90), written in Gluon: 2 to ``FUSED_MAX_ROWS`` activation rows, K a multiple
of ``FUSED_K_MULTIPLE`` (``kernels.fused_problem`` says which GEMMs it takes). Gluon is experimental and changes
between Triton releases: this is written for, and was run with, Triton 3.6.

    out^T tile [BLOCK_N, BLOCK_M] = W tile [BLOCK_N, K] @ A tile^T        (then alpha, bias, one cast)

The weight is wgmma's left operand, dequantized in registers from the packed bytes as the backend stores them
(torchao's layout, no repacking); the activation is the right operand, in shared memory. No dequantized weight
goes to memory. Gluon (``triton.experimental.gluon``) is needed for what plain Triton 3.6
does not do: an asynchronous wgmma whose operand comes from registers, so that the dequantize of step i+1 runs
while the MMA of step i does (tools/KERNEL_NOTES.md, versions 7 and 14).

The sum over K may take K in any order if both operands take the same. The wgmma register fragment gives lane t
(of each 4) positions 2t, 2t+1, 2t+8, 2t+9 of every 16; the dot's order is chosen so that these are the lane's own
8 contiguous packed bytes of each 64-element step, one 16-element block with one scale: dot position
``J*16 + h*8 + t*2 + n`` (J < 4; h, n < 2) is element ``t*16 + J*4 + h*2 + n``, as in ``triton_gemm._mma_kernel``.
Each thread loads its bytes with two 8-byte shared loads. The activation takes the same order one of two ways,
chosen by the config: gathered by 4-byte cp.async straight from the tensor (no other kernel; up to 64 rows), or
copied into that order once (``triton_gemm._dot_order``) and read by TMA.

A group of weights over one activation (q/k/v) is one launch: each program finds its weight with
``triton_gemm._member`` and ``_pick``, called from Gluon as they are. K is split over programs when few output
tiles would leave SMs idle; the last program of each tile to finish sums the fp32 partials, so a split GEMM is
still one launch.
"""

from concurrent.futures import ThreadPoolExecutor

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from . import triton_gemm
from .triton_gemm import _member, _operand_ptx, _pick

BLOCK_K = gl.constexpr(64)  # one step: 32 packed bytes and 4 block scales per weight row
MAX_SPLIT_TILES = 16384  # output tiles of a launch whose K is split: one int32 ticket counter each
_TICKETS: dict[torch.device, torch.Tensor] = {}
_PTX_BF16 = gl.constexpr(_operand_ptx("bf16"))
_PTX_F16 = gl.constexpr(_operand_ptx("f16"))


def configs_for(m: int) -> list:
    """(BLOCK_M, BLOCK_N, STAGES, num_warps, SPLIT_K, GATHER) timed at ``m`` rows, BLOCK_M the rows rounded up to
    a power of two (16-256). From the H200 sweeps of ``tools/tune_kernels.py`` (KERNEL_NOTES.md, version 16): at
    16 rows a gathered activation with 128 (or 64) weight rows on 4 warps and K split 2-8 ways won every shape; at
    128 rows gathering spills registers and TMA with 64 weight rows won, split 1-4 ways; above 128 rows,
    TMA with 128 weight rows on 8 warps or 64 on 4 (version 14's runs)."""
    block_m = min(256, max(16, triton.next_power_of_2(m)))
    if m > 128:
        return [(block_m, 128, 4, 8, 1, False), (block_m, 128, 5, 8, 1, False), (block_m, 64, 6, 4, 1, False)]
    gathered = [(block_m, 128, 6, 4, split, True) for split in (4, 2, 8)] if block_m <= 32 else []
    gathered += [(block_m, 64, 6, 4, 4, True)] if block_m <= 64 else []  # more rows spill registers
    by_tma = [(block_m, 64, 6, 4, split, False) for split in (1, 4)] + [(block_m, 128, 6, 4, 1, False)]
    return gathered + (by_tma if block_m >= 32 else [])


@gluon.constexpr_function
def _dot_element(position):
    """The weight element (within a step of 64) at a dot position: ``J*16 + h*8 + t*2 + n -> t*16 + J*4 + h*2 + n``."""
    j, h, t, n = position // 16, position // 8 % 2, position // 2 % 4, position % 2
    return t * 16 + j * 4 + h * 2 + n


@gluon.constexpr_function
def _operand_bytes(dot_ll):
    """wgmma's left-operand layout over [rows, dot positions] -> the layout of its packed bytes as
    [rows, 4 blocks, 8 bytes]. Dropping the register basis that steps the position by one (the nibble) and
    mapping the other position bases through ``_dot_element`` gives the bytes each thread must hold."""
    def byte(basis):
        row, position = basis
        b = _dot_element(position) // 2
        return [row, b // 8, b % 8]

    regs = [b for b in dot_ll.reg_bases if b != [0, 1]]
    assert len(regs) == len(dot_ll.reg_bases) - 1, dot_ll.reg_bases
    return gl.DistributedLinearLayout([byte(b) for b in regs], [byte(b) for b in dot_ll.lane_bases],
                                      [byte(b) for b in dot_ll.warp_bases], [], [dot_ll.shape[0], 4, 8])


@gluon.constexpr_function
def _byte_layout(block_n, num_warps):
    """``_operand_bytes`` with its registers reordered so that a thread's 8 bytes of a row come first (one
    8-byte shared load per row): registers step the byte by 1, 2, 4, then the row by 8 (and by the rows past
    the warps); lanes step the block by 1, 2 and the row by 1, 2, 4; warps step the row by 16, 32, ..."""
    reg = [[0, 0, 1], [0, 0, 2], [0, 0, 4], [8, 0, 0]]
    rows = 16 * num_warps
    while rows < block_n:
        reg.append([rows, 0, 0])
        rows *= 2
    warps = [[16 << i, 0, 0] for i in range(num_warps.bit_length() - 1)]
    return gl.DistributedLinearLayout(reg, [[0, 1, 0], [0, 2, 0], [1, 0, 0], [2, 0, 0], [4, 0, 0]], warps, [],
                                      [block_n, 4, 8])


@gluon.constexpr_function
def _same_but_register_order(a, b):
    """Whether two linear layouts give every thread the same elements (registers possibly in another order):
    then converting one into the other moves no data between threads."""
    return (sorted(a.reg_bases) == sorted(b.reg_bases) and a.lane_bases == b.lane_bases
            and a.warp_bases == b.warp_bases and list(a.shape) == list(b.shape))


@gluon.constexpr_function
def _flat(layout):
    """A layout over [rows, 4 blocks, 8 bytes] as the same layout over [rows, 32 bytes] (how shared memory holds
    a step's bytes: each row's 32 contiguous, as in global memory)."""
    def flat(basis):
        return [basis[0], basis[1] * 8 + basis[2]]

    return gl.DistributedLinearLayout([flat(b) for b in layout.reg_bases], [flat(b) for b in layout.lane_bases],
                                      [flat(b) for b in layout.warp_bases], [], [layout.shape[0], 32])


@gluon.jit
def _copy_step(step, slot, a_desc, a_ptrs, a_mask, off_m, off_k, bars, w_ptrs, s_ptrs, a_smem, w_smem, s_smem,
               steps):
    """K step ``step`` of this program's slice (starting at element ``off_k``; ``w_ptrs``, ``s_ptrs`` and, for a
    gathered activation, ``a_ptrs`` point at its start) into ring slot ``slot``: the activation tile by TMA
    (arriving on the slot's mbarrier; rows past M read as zeros) or gathered into dot order by cp.async (rows past
    M masked), the weight bytes and block scales by cp.async. Steps past the slice copy nothing."""
    live = step < steps
    if a_desc is None:
        cp.async_copy_global_to_shared(a_smem.index(slot), a_ptrs + step * BLOCK_K, mask=a_mask & live)
    else:
        mbarrier.expect(bars.index(slot), a_desc.block_type.nbytes, pred=live)
        tma.async_copy_global_to_shared(a_desc, [off_m, off_k + step * BLOCK_K], bars.index(slot),
                                        a_smem.index(slot), pred=live)
    cp.async_copy_global_to_shared(w_smem.index(slot), w_ptrs + step * (BLOCK_K // 2), mask=live)
    cp.async_copy_global_to_shared(s_smem.index(slot), s_ptrs + step * (BLOCK_K // 16), mask=live)


@gluon.jit
def _dequantize_step(w_smem, s_smem, slot, byte_layout: gl.constexpr, dot_layout: gl.constexpr,
                     DTYPE: gl.constexpr, BLOCK_N: gl.constexpr):
    """Packed bytes and scales of one ring slot -> the exact ``e2m1 * S_b`` weight tile in dot order (times 2**-7
    for bf16, 2**-14 for fp16, as ``triton_gemm``'s inline PTX leaves it), in wgmma's left-operand layout."""
    flat: gl.constexpr = _flat(byte_layout)
    p = gl.convert_layout(gl.reshape(w_smem.index(slot).load(flat), [BLOCK_N, 4, 8]), byte_layout,
                          assert_trivial=True)
    s = s_smem.index(slot).load(gl.SliceLayout(2, byte_layout)).to(gl.float8e4nv, bitcast=True)
    if DTYPE == gl.bfloat16:
        _, scale = gl.broadcast(p, gl.expand_dims((s.to(gl.float32) * 2.0**119).to(gl.bfloat16), 2))
        lo, hi = gl.inline_asm_elementwise(_PTX_BF16, "=r,=r,=r,=r,r,r,r", [p, scale],
                                           dtype=(gl.bfloat16, gl.bfloat16), is_pure=True, pack=4)
    else:
        _, scale = gl.broadcast(p, gl.expand_dims(s.to(gl.float16), 2))
        lo, hi = gl.inline_asm_elementwise(_PTX_F16, "=r,=r,=r,=r,r,r,r", [p, scale],
                                           dtype=(gl.float16, gl.float16), is_pure=True, pack=4)
    w = gl.reshape(gl.join(lo, hi), [BLOCK_N, 4, 4, 2, 2])  # [row, t, J, h, nibble]: storage order
    w = gl.reshape(gl.permute(w, (0, 2, 3, 1, 4)), [BLOCK_N, BLOCK_K])  # dot order: J, h, t, nibble
    return gl.convert_layout(w, dot_layout)


@gluon.jit
def _finish(acc, alpha, member, offs_n, offs_m, mask, N, bias_ptrs, out_ptrs):
    """``acc * alpha`` plus the member's bias, cast once and stored into the member's output (tile in the store
    layout: rows of the weight along dim 0)."""
    out = acc * alpha
    if bias_ptrs is not None:
        out += gl.load(_pick(member, bias_ptrs) + offs_n, mask=offs_n < N, other=0.0).to(gl.float32)[:, None]
    out_ptr = _pick(member, out_ptrs)
    gl.store(out_ptr + offs_m[None, :] * N + offs_n[:, None], out.to(out_ptr.dtype.element_ty), mask=mask)


@gluon.jit
def fused_kernel(a_desc, a_ptr, a_pts_ptr, w_ptrs, w_scale_ptrs, w_pts_ptrs, bias_ptrs, out_ptrs, partial_ptr,
                 tickets_ptr, M, ends, K, stride_am, stride_wn, stride_sn,
                 ALPHA_SHIFT: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                 SPLIT_K: gl.constexpr, num_warps: gl.constexpr):
    """Program (m, n, s): BLOCK_N rows of the stacked weights (one member of the group), BLOCK_M activation rows,
    the s-th of SPLIT_K slices of the K steps. Weight rows past a member's end wrap around and are not stored.

    The activation comes by TMA through ``a_desc`` (already copied into dot order, ``triton_gemm._dot_order``),
    or, when ``a_desc`` is None, is gathered into dot order from ``a_ptr`` [M, K] by 4-byte cp.async (the
    element pairs ``n`` = 0, 1 are contiguous in both orders): no extra kernel, at the cost of many small copies,
    which pays at few rows.

    With one slice the program applies alpha and the bias and casts. With more, each stores its raw fp32 sum in
    ``partial_ptr`` [SPLIT_K, M, ends[-1]] and takes a ticket from its tile's counter in ``tickets_ptr``; the
    last to arrive sums the slices in slice order (the result does not depend on which program is last), applies
    alpha and the bias, casts, and sets the counter back to zero for the next launch.

    Pipeline, per K step i: wgmma(i) is issued on the operand dequantized the step before; while it runs, the
    bytes of step i+1 (copied STAGES - 2 steps ahead) are dequantized; then the wait retires wgmma(i-1), a CTA
    barrier makes sure every warpgroup has, and the copies of step i + STAGES - 2 go into the slot that
    wgmma(i-2) read. The operand of wgmma(i-1) is passed to that wait, which keeps its registers from being reused
    while the MMA reads them.
    """
    DTYPE: gl.constexpr = a_ptr.dtype.element_ty if a_desc is None else a_desc.dtype
    pid_m = gl.program_id(0)
    pid_n = gl.program_id(1)
    member, first_n, end_n = _member(pid_n * BLOCK_N, ends)
    w_ptr, s_ptr = _pick(member, w_ptrs), _pick(member, w_scale_ptrs)
    N = end_n - first_n
    per_split = gl.cdiv(K // BLOCK_K, SPLIT_K)
    first = gl.program_id(2) * per_split
    steps = gl.maximum(gl.minimum(per_split, K // BLOCK_K - first), 0)

    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, BLOCK_M, 16])
    dot: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    byte_layout: gl.constexpr = _byte_layout(BLOCK_N, num_warps)
    gl.static_assert(_same_but_register_order(byte_layout, _operand_bytes(gl.to_linear_layout(dot, [BLOCK_N,
                                                                                                    BLOCK_K]))))

    # cp.async: each thread 16 contiguous bytes of a weight row (2 threads a row), each row's 4 scale bytes, and
    # for a gathered activation 2 elements (4 bytes) at a time. Shared memory holds the weight bytes as global
    # memory does, without swizzling: a warp's 8-byte loads of ``flat`` read 8 rows x 32 contiguous bytes, free
    # of bank conflicts.
    w_copy: gl.constexpr = gl.BlockedLayout([1, 16], [16, 2], [num_warps, 1], [1, 0])
    s_copy: gl.constexpr = gl.BlockedLayout([1, 4], [32, 1], [num_warps, 1], [1, 0])
    a_copy: gl.constexpr = gl.BlockedLayout([1, 2], [1, 32], [num_warps, 1], [1, 0])
    plain: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[1, 0])
    if a_desc is None:
        a_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    else:
        gl.static_assert(a_desc.block_type.shape[0] == BLOCK_M)
        a_layout: gl.constexpr = a_desc.layout
    a_smem = gl.allocate_shared_memory(DTYPE, [STAGES, BLOCK_M, BLOCK_K], a_layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(bars.index(s), count=1)
    w_smem = gl.allocate_shared_memory(gl.uint8, [STAGES, BLOCK_N, BLOCK_K // 2], plain)
    s_smem = gl.allocate_shared_memory(gl.uint8, [STAGES, BLOCK_N, BLOCK_K // 16], plain)

    rows_w = (pid_n * BLOCK_N - first_n + gl.arange(0, BLOCK_N, gl.SliceLayout(1, w_copy))) % N
    w_ptrs = (w_ptr + rows_w[:, None] * stride_wn + first * (BLOCK_K // 2)
              + gl.arange(0, BLOCK_K // 2, gl.SliceLayout(0, w_copy))[None, :])
    rows_s = (pid_n * BLOCK_N - first_n + gl.arange(0, BLOCK_N, gl.SliceLayout(1, s_copy))) % N
    s_ptrs = (s_ptr + rows_s[:, None] * stride_sn + first * (BLOCK_K // 16)
              + gl.arange(0, 4, gl.SliceLayout(0, s_copy))[None, :])
    off_m = pid_m * BLOCK_M
    off_k = first * BLOCK_K
    # The gathered activation's pointers (unused with TMA): dot position J*16 + h*8 + t*2 + n of each step reads
    # element t*16 + J*4 + h*2 + n, pairs of elements 4-byte aligned.
    position = gl.arange(0, BLOCK_K, gl.SliceLayout(0, a_copy))
    element = gl.max_contiguous(gl.multiple_of((position // 2 % 4) * 16 + (position // 16) * 4
                                               + (position // 8 % 2) * 2 + position % 2, 2), 2)
    rows_a = off_m + gl.arange(0, BLOCK_M, gl.SliceLayout(1, a_copy))
    a_ptrs = a_ptr + rows_a[:, None] * stride_am + off_k + element[None, :]
    a_mask = (rows_a < M)[:, None]

    for s in gl.static_range(STAGES - 2):
        _copy_step(s, s, a_desc, a_ptrs, a_mask, off_m, off_k, bars, w_ptrs, s_ptrs, a_smem, w_smem, s_smem, steps)
        cp.commit_group()
    acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, mma)
    cp.wait_group(STAGES - 3)
    if a_desc is None:  # the gathered activation, written by cp.async, is read by wgmma (the async proxy)
        fence_async_shared()
        gl.thread_barrier()
    w_next = _dequantize_step(w_smem, s_smem, 0, byte_layout, dot, DTYPE, BLOCK_N)
    w_prev = gl.zeros([BLOCK_N, BLOCK_K], DTYPE, dot)
    for i in range(steps):
        w = w_next
        if a_desc is not None:
            mbarrier.wait(bars.index(i % STAGES), (i // STAGES) & 1)
        acc = warpgroup_mma(w, a_smem.index(i % STAGES).permute((1, 0)), acc, is_async=True)
        cp.wait_group(STAGES - 4)
        if a_desc is None:
            fence_async_shared()
        w_next = _dequantize_step(w_smem, s_smem, (i + 1) % STAGES, byte_layout, dot, DTYPE, BLOCK_N)
        acc, w_prev = warpgroup_mma_wait(num_outstanding=1, deps=(acc, w_prev))
        w_prev = w
        gl.thread_barrier()
        _copy_step(i + STAGES - 2, (i + STAGES - 2) % STAGES, a_desc, a_ptrs, a_mask, off_m, off_k, bars, w_ptrs,
                   s_ptrs, a_smem, w_smem, s_smem, steps)
        cp.commit_group()
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    cp.wait_group(0)

    # The tile is out^T: store it through a layout whose threads run along n, the output's contiguous dimension.
    store: gl.constexpr = gl.BlockedLayout([8, 1], [BLOCK_N // 8, 32 // (BLOCK_N // 8)], [1, num_warps], [0, 1])
    offs_n = pid_n * BLOCK_N - first_n + gl.arange(0, BLOCK_N, gl.SliceLayout(1, store))
    offs_m = off_m + gl.arange(0, BLOCK_M, gl.SliceLayout(0, store))
    mask = (offs_n < N)[:, None] & (offs_m < M)[None, :]
    acc = gl.convert_layout(acc, store)
    alpha = gl.load(_pick(member, w_pts_ptrs)) * ALPHA_SHIFT
    if a_pts_ptr is not None:
        alpha = alpha * gl.load(a_pts_ptr)
    if SPLIT_K == 1:
        _finish(acc, alpha, member, offs_n, offs_m, mask, N, bias_ptrs, out_ptrs)
    else:
        total_n = ends[len(ends) - 1]
        partials = partial_ptr + (offs_m[None, :] * total_n + first_n + offs_n[:, None])
        gl.store(partials + gl.program_id(2) * M * total_n, acc, mask=mask)
        gl.thread_barrier()  # every thread's partial is written before the ticket releases them
        ticket_ptr = tickets_ptr + pid_m * gl.num_programs(1) + pid_n
        if gl.atomic_add(ticket_ptr, 1, sem="acq_rel", scope="gpu") == SPLIT_K - 1:
            total = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, store)
            for s in gl.static_range(SPLIT_K):
                total += gl.load(partials + s * M * total_n, mask=mask, other=0.0, cache_modifier=".cg")
            _finish(total, alpha, member, offs_n, offs_m, mask, N, bias_ptrs, out_ptrs)
            gl.store(ticket_ptr, 0)


def _zeroed_counters(device: torch.device) -> torch.Tensor:
    counters = torch.zeros(MAX_SPLIT_TILES, dtype=torch.int32, device=device)
    torch.cuda.synchronize(device)  # zero before any stream of the caller's thread reads them
    return counters


def _tickets(device: torch.device) -> torch.Tensor | None:
    """The split-K tile counters of ``device`` (zero between launches), made on first use; None while a CUDA graph
    is being captured before they exist. Split launches on one device share them, so they must not run
    concurrently on several streams (the backend uses one).

    They must not live in a CUDA graph's memory pool: Inductor's CUDA graphs (``triton.cudagraphs``) run a graph
    eagerly once first, with every allocation of the calling thread taken from their pool, and then refuse any
    tensor of the pool that the graph did not return ("tensor(s) in the cudagraph pool not tracked as outputs").
    So the counters are made by a thread of their own, whose allocations no pool takes, and waited for."""
    if device not in _TICKETS:
        if torch.cuda.is_current_stream_capturing():
            return None
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fp4compile-tickets") as maker:
            _TICKETS[device] = maker.submit(_zeroed_counters, device).result()
    return _TICKETS[device]


def launch(a, a_scales, a_pts, weights, biases, outs, config=None):
    """Run ``fused_kernel`` into ``outs`` (one [M, N_i] per weight); arguments as for ``triton_gemm.launch_mma``.
    ``config`` is (BLOCK_M, BLOCK_N, STAGES, num_warps, SPLIT_K, GATHER): GATHER reads the activation as it is,
    otherwise it is copied into dot order first and read by TMA."""
    m, k = a.shape[0], weights[0][0].shape[1] * 2
    w_packed, w_scales, w_pts = triton_gemm._columns(weights)
    biases = None if biases is None else tuple(biases)
    outs = tuple(outs)
    ends = triton_gemm._ends(weights)
    if a_scales is not None:
        a = triton_gemm.dequantize(a, a_scales, torch.float16)
    dtype = gl.bfloat16 if a.dtype == torch.bfloat16 else gl.float16
    alpha_shift = 2.0**7 if a.dtype == torch.bfloat16 else 2.0**14

    def run(cfg):
        block_m, block_n, stages, warps, split, gather = cfg
        grid = (triton.cdiv(m, block_m), triton.cdiv(ends[-1], block_n), min(split, k // BLOCK_K.value))
        tickets = _tickets(a.device) if grid[2] > 1 and grid[0] * grid[1] <= MAX_SPLIT_TILES else None
        if tickets is None:
            grid = (*grid[:2], 1)
        partials = (None if grid[2] == 1 else
                    torch.empty((grid[2], m, ends[-1]), device=a.device, dtype=torch.float32))
        a_in, a_desc = a, None
        if gather and (a.stride(1) != 1 or a.stride(0) % 16 or a.data_ptr() % 16):
            a_in = torch.empty(a.shape, dtype=a.dtype, device=a.device).copy_(a)  # rows of aligned 16-byte vectors
        elif not gather:
            a_in = triton_gemm._dot_order(a)  # a new, contiguous tensor whatever ``a``'s strides
            a_desc = TensorDescriptor(a_in, [m, k], [k, 1], [block_m, BLOCK_K.value],
                                      gl.NVMMASharedLayout.get_default_for([block_m, BLOCK_K.value], dtype))
        fused_kernel[grid](a_desc, a_in, a_pts, w_packed, w_scales, w_pts, biases, outs, partials, tickets,
                           m, ends, k, a_in.stride(0), w_packed[0].stride(0), w_scales[0].stride(0),
                           ALPHA_SHIFT=alpha_shift, BLOCK_M=block_m, BLOCK_N=block_n, STAGES=stages,
                           SPLIT_K=grid[2], num_warps=warps)

    if config is None:
        key = ("fused", a.dtype, outs[0].dtype, biases is not None, ends, k, triton.next_power_of_2(m))
        fitting = [c for c in configs_for(m) if all(end % c[1] == 0 for end in ends[:-1])]  # no tile straddles
        config = triton_gemm._choose(key, fitting, run)
    run(config)
    return outs
