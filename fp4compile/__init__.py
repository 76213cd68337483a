"""fp4compile: NVFP4 for PyTorch through ``torch.compile(model, backend="fp4")``."""

from . import ops
from .backend import explain
from .calibrate import CalibrationReport, calibrate, quantize_model
from .checkpoint import CheckpointError, load, save
from .format import NVFP4Tensor, dequantize, quantize
from .modules import NVFP4Linear

__all__ = [
    "CalibrationReport",
    "CheckpointError",
    "NVFP4Linear",
    "NVFP4Tensor",
    "calibrate",
    "dequantize",
    "explain",
    "load",
    "ops",
    "quantize",
    "quantize_model",
    "save",
]
