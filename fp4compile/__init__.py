"""fp4compile: NVFP4 for PyTorch through ``torch.compile(model, backend="fp4")``."""

from . import ops
from .backend import explain
from .format import NVFP4Tensor, dequantize, quantize
from .modules import NVFP4Linear

__all__ = ["NVFP4Linear", "NVFP4Tensor", "dequantize", "explain", "ops", "quantize"]
