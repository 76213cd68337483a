"""Without a GPU, Triton kernels run under Triton's CPU interpreter. TRITON_INTERPRET must be set before anything
imports triton (torch's Inductor does, early), so it is set here, before any test module is collected."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

INTERPRETED_MODULES = ("test_kernels.py", "test_quantize_kernel.py")  # the tests that launch Triton kernels


def _version(text: str) -> tuple[int, int]:
    major, minor = text.split(".")[:2]
    return int(major), int(minor)


def interpreter_problem() -> str | None:
    """Why Triton's CPU interpreter cannot run the kernel tests in this environment, or None. Triton 3.6 (torch
    2.11's) fails in its interpreter with numpy 2.4 (numpy 2.3 is fine; Triton 3.9 is fine with 2.4)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return None
    try:
        import numpy
        import triton
    except ImportError:
        return None
    if _version(triton.__version__) <= (3, 6) and _version(numpy.__version__) >= (2, 4):
        return (f"Triton {triton.__version__}'s CPU interpreter fails with numpy {numpy.__version__} (\"only "
                "0-dimensional arrays can be converted to Python scalars\"); pip install 'numpy<2.4' to run the "
                "kernels under it")
    return None


def pytest_collection_modifyitems(config, items):
    problem = interpreter_problem()
    if problem is not None:
        skip = pytest.mark.skip(reason=problem)
        for item in items:
            if item.path.name in INTERPRETED_MODULES:
                item.add_marker(skip)
