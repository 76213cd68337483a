"""``NVFP4Linear``: a linear layer that holds its weight packed, as ``calibrate`` and ``load`` leave a model.

Eagerly it runs the exact reference (slowly, by dequantizing); under ``torch.compile(backend="fp4")`` the graph
pass turns its ``fp4::linear`` call into activation-quantize + GEMM over its buffers embedded as constants.
"""

import fnmatch
from collections.abc import Iterable

import torch
from torch import nn

from . import format as nvfp4
from .ops import SCHEMES


def matches_skip(name: str, patterns: Iterable[str]) -> bool:
    """Whether a layer named ``name`` (dotted module path) matches a ``skip`` glob pattern, in full or by its last
    component: ``"lm_head"`` matches ``lm_head`` and ``model.lm_head``; ``"layers.0.*"`` a whole block."""
    last = name.rsplit(".", 1)[-1]
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(last, p) for p in patterns)


class NVFP4Linear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` stored as NVFP4.

    Buffers: ``weight_packed`` uint8 ``[N, K/2]``, ``weight_scales`` uint8 ``[N, K/16]`` (e4m3 bit patterns),
    ``weight_global_scale`` fp32 ``[]`` (decode direction), ``input_global_scale`` fp32 ``[]`` or None (a static
    activation scale for the ``nvfp4`` scheme; None means dynamic). ``bias`` stays in high precision.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, scheme: str = "nvfp4",
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        if scheme not in SCHEMES:
            raise ValueError(f"unknown scheme {scheme!r}; expected one of {SCHEMES}")
        if in_features % nvfp4.BLOCK_SIZE:
            raise ValueError(f"NVFP4Linear needs in_features % {nvfp4.BLOCK_SIZE} == 0, got {in_features}")
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        u8 = dict(dtype=torch.uint8, device=device)
        self.register_buffer("weight_packed", torch.zeros(out_features, in_features // 2, **u8))
        self.register_buffer("weight_scales", torch.zeros(out_features, in_features // nvfp4.BLOCK_SIZE, **u8))
        self.register_buffer("weight_global_scale", torch.ones((), dtype=torch.float32, device=device))
        self.register_buffer("input_global_scale", None)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, q: nvfp4.NVFP4Tensor, *, scheme: str = "nvfp4",
                    input_global_scale: torch.Tensor | None = None) -> "NVFP4Linear":
        """Wrap the quantized weight ``q`` (``[N, K]``) of ``linear``, keeping its bias."""
        w = linear.weight
        if tuple(q.shape) != tuple(w.shape):
            raise ValueError(f"quantized weight has shape {tuple(q.shape)}, the layer's weight {tuple(w.shape)}")
        if q.global_scale is None:
            raise ValueError("NVFP4Linear needs a two-level quantized weight (global_scale is None)")
        m = cls(w.shape[1], w.shape[0], linear.bias is not None, scheme=scheme, dtype=w.dtype, device=w.device)
        m.set_weight(q)
        if linear.bias is not None:
            m.bias.data.copy_(linear.bias.detach())
        if input_global_scale is not None:
            m.input_global_scale = input_global_scale.detach().float().reshape(()).to(w.device)
        return m

    def set_weight(self, q: nvfp4.NVFP4Tensor) -> None:
        self.weight_packed.copy_(q.packed)
        self.weight_scales.copy_(q.scales.view(torch.uint8))
        self.weight_global_scale.copy_(q.global_scale)

    @property
    def quantized_weight(self) -> nvfp4.NVFP4Tensor:
        return nvfp4.NVFP4Tensor(self.weight_packed, self.weight_scales.view(torch.float8_e4m3fn),
                                 self.weight_global_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.fp4.linear(x, self.weight_packed, self.weight_scales, self.weight_global_scale,
                                    self.bias, self.input_global_scale, self.scheme)

    def extra_repr(self) -> str:
        static = "static" if self.input_global_scale is not None else "dynamic"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, scheme={self.scheme}, activation_scale={static}")
