"""The decode GEMV's machine code for Hopper, compiled ahead of time on any machine by tools/sass_gemv.py: its weight
words must come in 16-byte loads, which a mask Triton cannot prove constant over four words silently splits into
4-byte ones (9% of the GEMV's speed on an H200, tools/KERNEL_NOTES.md version 27). The tool runs in a process of its
own, without the CPU interpreter the other kernel tests use."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import triton

ROOT = Path(__file__).resolve().parents[1]
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


@pytest.mark.skipif(not os.access(CUOBJDUMP, os.X_OK), reason="Triton's bundled CUDA tools (ptxas, cuobjdump) absent")
@pytest.mark.parametrize("rows", (1, 2))
@pytest.mark.parametrize("activation", ("bf16", "nvfp4"))
def test_gemv_loads_weight_words_16_bytes_at_a_time(activation, rows):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "sass_gemv.py"), "--config", "16,1024,4",
                          "--activation", activation, "--rows", str(rows)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    loads = dict(re.findall(r"(LDG[\w.]*) (\d+)", run.stdout.split("loads: ")[1].splitlines()[0]))
    # 16 x 1024 elements over 128 threads: 16 weight words a thread and step, four 16-byte loads
    assert int(loads.get("LDG.E.128", 0)) >= 4, run.stdout
    assert int(loads.get("LDG.E", 0)) <= 1, run.stdout
