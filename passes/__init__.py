"""FX graph passes of the fp4 backend: find linear layers, rewrite them into NVFP4 ops, report what was skipped."""

from .match import Linear, find_linears
from .rewrite import (WEIGHT_CACHE, Embedded, EmbeddedSet, LayerDecision, RewriteReport, WeightCache,
                      refresh_host_alphas, rewrite_linears)

__all__ = [
    "WEIGHT_CACHE",
    "Embedded",
    "EmbeddedSet",
    "LayerDecision",
    "Linear",
    "RewriteReport",
    "WeightCache",
    "find_linears",
    "refresh_host_alphas",
    "rewrite_linears",
]
