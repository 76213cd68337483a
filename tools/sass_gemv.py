"""The decode GEMVs' machine code for Hopper, without a GPU: compiles ``triton_gemm._gemv_kernel`` (bf16 activation)
or ``_gemv_w4a4_kernel`` (NVFP4) ahead of time for sm_90 with Triton's bundled ``ptxas`` and prints its registers and
the instructions of its main loop by opcode.

    PYTHONPATH=. python tools/sass_gemv.py [--config 16,1024,4] [--activation bf16|nvfp4] [--rows 1] [--sass out.sass]

The arguments are specialized as the launcher's are on the benchmark shapes (pointers 16-byte aligned, K_WORDS and
the strides multiples of 16), so the code is what an H100/H200 runs there. "per element" divides the loop's
instructions by the weight elements each thread handles a step (BLOCK_N * BLOCK_K / threads). The loads are listed
by width: the weight words should come as ``LDG.E.128`` (tools/KERNEL_NOTES.md, version 27).
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fp4compile.kernels import triton_gemm  # noqa: E402

_ALIGNED = [["tt.divisibility", 16]]


def compile_gemv(block_n: int, block_k: int, warps: int, activation: str, rows: int = 1):
    """The GEMV for one weight (no bias), bf16 output, ``rows`` activation rows (1 to 4), compiled for sm_90:
    ``_gemv_kernel`` for a bf16 activation, ``_gemv_w4a4_kernel`` for an NVFP4 one."""
    common = {"w_ptrs": ("*u8",), "w_scale_ptrs": ("*u8",), "w_pts_ptrs": ("*fp32",), "bias_ptrs": "constexpr",
              "out_ptrs": ("*bf16",), "ends": ("i32",), "K_WORDS": "i32",
              "stride_wn": "i32", "stride_wsn": "i32", "PTX": "constexpr", "ROWS": "constexpr",
              "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}
    constants = {"bias_ptrs": None, "PTX": True, "ROWS": rows, "BLOCK_N": block_n, "BLOCK_K": block_k}
    if activation == "nvfp4":
        kernel = triton_gemm._gemv_w4a4_kernel
        signature = {"a_ptr": "*i32", "a_factor_ptr": "*fp32", "a_pts_ptr": "*fp32", **common, "PDL": "constexpr"}
        constants["PDL"] = True
        aligned_args = ("a_ptr", "a_factor_ptr", "K_WORDS", "stride_wn", "stride_wsn")
    else:
        kernel = triton_gemm._gemv_kernel
        signature = {"a_ptr": "*bf16", **common}
        aligned_args = ("a_ptr", "K_WORDS", "stride_wn", "stride_wsn")
    names = kernel.arg_names
    signature = {name: signature[name] for name in names}
    aligned = [(names.index(n),) for n in aligned_args]
    aligned += [(names.index(n), 0) for n in ("w_ptrs", "w_scale_ptrs", "out_ptrs", "ends")]
    source = triton.compiler.ASTSource(kernel, signature, constants, attrs={key: _ALIGNED for key in aligned})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})


def _cuobjdump(cubin: bytes, flag: str) -> str:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, flag, f.name], capture_output=True, text=True, check=True).stdout


def main_loop(sass: str) -> list[str]:
    """The instructions of the longest backward branch's body (the K loop)."""
    lines = [line for line in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4}\*/", line)]
    address = [int(re.match(r"\s+/\*([0-9a-f]{4})\*/", line).group(1), 16) for line in lines]
    loops = []
    for at, line in zip(address, lines):
        target = re.search(r"BRA (0x[0-9a-f]+)", line)
        if target and int(target.group(1), 16) < at:
            loops.append((int(target.group(1), 16), at))
    if not loops:
        return []
    start, end = max(loops, key=lambda span: span[1] - span[0])
    return [line for at, line in zip(address, lines) if start <= at <= end]


def opcode(line: str) -> str:
    """The full opcode of a SASS line (``LDG.E.128``), without its predicate."""
    text = re.sub(r"^\s+/\*[0-9a-f]{4}\*/\s+(@!?U?P\w+\s+)?", "", line)
    return text.split(" ")[0].rstrip(";")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="16,1024,4", help="BLOCK_N,BLOCK_K,num_warps")
    p.add_argument("--activation", default="bf16", choices=("bf16", "nvfp4"),
                   help="bf16 (nvfp4a16) or NVFP4 (nvfp4: the integer GEMV)")
    p.add_argument("--rows", type=int, default=1, help="activation rows the kernel is compiled for (1 to 4)")
    p.add_argument("--sass", help="write the whole SASS here")
    args = p.parse_args()
    block_n, block_k, warps = (int(v) for v in args.config.split(","))
    kernel = compile_gemv(block_n, block_k, warps, args.activation, args.rows)
    sass = _cuobjdump(kernel.asm["cubin"], "-sass")
    if args.sass:
        Path(args.sass).write_text(sass)
    usage = re.findall(r"(REG|STACK|SHARED):(\d+)", _cuobjdump(kernel.asm["cubin"], "-res-usage"))
    loop = main_loop(sass)
    per_thread = block_n * block_k // (32 * warps)
    ops = Counter(opcode(line) for line in loop)
    print(f"GEMV {args.activation}, {args.rows} row(s), config {block_n},{block_k},{warps}, sm_90, "
          f"Triton {triton.__version__}: "
          + ", ".join(f"{k.lower()} {v}" for k, v in usage))
    print(f"loop: {len(loop)} instructions a step, {per_thread} weight elements a thread, "
          f"{len(loop) / per_thread:.2f} per element")
    print("loads: " + ", ".join(f"{k} {v}" for k, v in sorted(ops.items()) if k.startswith(("LDG", "LDS"))))
    by_base = Counter()
    for k, v in ops.items():
        by_base[k.split(".")[0]] += v
    print("by opcode: " + ", ".join(f"{k} {v}" for k, v in by_base.most_common()))


if __name__ == "__main__":
    main()
