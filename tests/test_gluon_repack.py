"""tools/gluon_gemm.py's weight repack, on the CPU: every thread finds, at its 16 repacked bytes, the bytes its
register layout says it holds. (The kernel itself runs only on Hopper; the tool checks it there.)"""

import pytest
import torch
from tools_module import load_tool

pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper")


@pytest.fixture(scope="module")
def gluon_gemm():
    return load_tool("gluon_gemm")


def _holder_of(layout, thread: int, register: int) -> tuple[int, int, int]:
    """(row, group, byte) that a linear layout assigns to register ``register`` of thread ``thread``."""
    coord = [0, 0, 0]
    bases = [(register, layout.reg_bases), (thread % 32, layout.lane_bases), (thread // 32, layout.warp_bases)]
    for index, vectors in bases:
        for bit, vector in enumerate(vectors):
            if index >> bit & 1:
                coord = [c ^ v for c, v in zip(coord, vector)]
    return tuple(coord)


@pytest.mark.parametrize("config_index", [0, 1])
def test_repack_puts_each_thread_bytes_in_register_order(gluon_gemm, config_index):
    config = gluon_gemm.CONFIGS[config_index]
    block_n, warps = config[1], config[4]
    n, k = block_n + 24, 256  # a partial row tile (zero-padded) and four K steps
    packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)
    repacked = gluon_gemm.repack(packed, config)
    threads = 32 * warps
    assert repacked.shape == (2, k // 64, threads * 16)
    layout = gluon_gemm._byte_layout(block_n, warps)
    padded = torch.nn.functional.pad(packed, (0, 0, 0, 2 * block_n - n))
    for tile in range(2):
        for step in range(k // 64):
            for thread in range(threads):
                for register in range(16):
                    row, group, byte = _holder_of(layout, thread, register)
                    expected = padded[tile * block_n + row, step * 32 + group * 8 + byte]
                    assert repacked[tile, step, thread * 16 + register] == expected
