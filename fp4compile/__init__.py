"""fp4compile: NVFP4 for PyTorch through ``torch.compile(model, backend="fp4")``."""

from . import ops
from .format import NVFP4Tensor, dequantize, quantize

__all__ = ["NVFP4Tensor", "dequantize", "ops", "quantize"]
