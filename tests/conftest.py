"""Without a GPU, Triton kernels run under Triton's CPU interpreter. TRITON_INTERPRET must be set before anything
imports triton (torch's Inductor does, early), so it is set here, before any test module is collected."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
