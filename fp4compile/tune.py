"""Block output tuning: after GPTQ has quantized a block, its e2m1 codes are chosen again by the error at the
block's output, as AutoRound does (sign gradient descent on rounding offsets through a straight-through rounding).

GPTQ picks each layer's codes by that layer's own output error. Tuning sees the whole block at once (attention,
MLP, normalizations and residuals) and measures the error where it matters to the next block: against the
unquantized model's block output, token by token relative to that output's size (the next normalization divides
every token by its size). Block scales and global scales stay as GPTQ set them, so the block still holds NVFP4
weights and runs as before; only codes move, and at most one step of the e2m1 grid from GPTQ's.

Each weight element gets a continuous position ``z`` on the signed code axis (-7..7, where integer ``i`` stands for
``sign(i) * E2M1_VALUES[|i|]``), starting at GPTQ's code plus the offset of the original weight from it (clipped to
under half a step, as AutoRound starts from the weight's own fractional position). The forward rounds ``z``; the
backward takes the slope of the grid between the codes around it. ``steps`` sign steps of a learning rate that
decays linearly from ``1 / steps`` move each ``z`` by at most half a step in all. The tuned codes are kept only if
the block's error on held samples went down.
"""

import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from . import format as nvfp4
from .modules import NVFP4Linear

CHECK_SAMPLES = 8  # samples on which the block's error is measured before and after tuning
_HALF_STEP = 0.499  # the furthest a starting position lies from GPTQ's code


def _signed_grid(device) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed code positions -7..7 and the e2m1 values they stand for."""
    magnitudes = torch.tensor(nvfp4.E2M1_VALUES, device=device)
    values = torch.cat((-magnitudes.flip(0)[:-1], magnitudes))
    return torch.arange(-7.0, 8.0, device=device), values


def _interp(x: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """The piecewise-linear function through ``(xs, ys)`` (``xs`` increasing) at ``x``, differentiable in ``x``;
    beyond the ends it continues the end segments."""
    i = torch.searchsorted(xs, x.detach().contiguous(), right=True).clamp(1, len(xs) - 1)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (x - x0) * ((y1 - y0) / (x1 - x0))


def signed_codes(codes: torch.Tensor) -> torch.Tensor:
    """uint8 e2m1 codes (0..15) as positions -7..7 (float); both zeros at 0."""
    magnitude = (codes & 7).float()
    return torch.where((codes & 8) != 0, -magnitude, magnitude)


def codes_of(positions: torch.Tensor) -> torch.Tensor:
    """Integer-valued positions -7..7 as uint8 e2m1 codes; 0 as the positive zero."""
    p = positions.round().clamp(-7, 7)
    return p.abs().to(torch.uint8) | ((p < 0).to(torch.uint8) << 3)


class _TunedLinear(nn.Module):
    """An ``NVFP4Linear`` whose codes are the rounded positions ``z`` (a parameter), with its scales."""

    def __init__(self, layer: NVFP4Linear, original: torch.Tensor):
        super().__init__()
        self.layer = layer
        q = layer.quantized_weight
        self.block_scale = q.scales.float().repeat_interleave(nvfp4.BLOCK_SIZE, dim=-1)
        self.global_scale = q.global_scale.float()
        self.positions, self.values = _signed_grid(self.block_scale.device)
        start = signed_codes(nvfp4.unpack(q.packed))
        offset = _interp(original.float() / (self.block_scale * self.global_scale), self.values, self.positions)
        offset = offset - start
        self.z = nn.Parameter(start + offset.nan_to_num(0.0).clamp(-_HALF_STEP, _HALF_STEP))

    def weight(self) -> torch.Tensor:
        smooth = _interp(self.z, self.positions, self.values)
        rounded = _interp(self.z.detach().round().clamp(-7, 7), self.positions, self.values)
        # the forward value is exactly the rounded one (dequantize's arithmetic); the gradient is the smooth one's
        return (rounded + (smooth - smooth.detach())) * self.block_scale * self.global_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layer.scheme == "nvfp4":  # the activation as the runtime quantizes it; gradients pass straight
            with torch.no_grad():
                quantized = nvfp4.fake_quantize(x, self.layer.input_global_scale).to(x.dtype)
            x = quantized + (x - x.detach())
        return nn.functional.linear(x, self.weight().to(x.dtype), self.layer.bias)

    def store(self) -> None:
        """Write the rounded positions back into the layer's packed codes."""
        self.layer.weight_packed.copy_(nvfp4.pack(codes_of(self.z.detach())))


@dataclass
class BlockTuning:
    """What tuning did to one block: its relative output error on the held samples before and after, whether the
    tuned codes were kept, the share of codes changed and the time."""

    block: str
    error_before: float
    error_after: float
    kept: bool
    changed: float
    seconds: float


def hidden_output(output) -> torch.Tensor:
    """The hidden state a block returns: the output itself, or the first element of a tuple (transformers layers)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def _error(block: nn.Module, sample: tuple[tuple, dict], target: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ``|y - target|^2 / |target|^2``, ``y`` the block's output on ``sample``."""
    args, kwargs = sample
    y = hidden_output(block(*args, **kwargs)).float()
    t = target.float()
    return (((y - t) ** 2).sum(-1) / (t**2).sum(-1).clamp_min(1e-12)).mean()


def tune_block(name: str, block: nn.Module, originals: dict[str, torch.Tensor], inputs: list[tuple[tuple, dict]],
               targets: list[torch.Tensor], steps: int, seed: int = 0) -> BlockTuning:
    """Tune the codes of ``block``'s ``NVFP4Linear`` layers named in ``originals`` (names relative to ``block``, each
    with the weight it had before quantization) so that ``block(*inputs[i])`` comes closer to ``targets[i]``."""
    t0 = time.perf_counter()
    layers = {n: block.get_submodule(n) for n in originals}
    tuned = {n: _TunedLinear(layer, originals[n]) for n, layer in layers.items()}
    starts = {n: t.z.detach().round() for n, t in tuned.items()}
    held = list(range(min(CHECK_SAMPLES, len(inputs))))
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    try:
        for n, t in tuned.items():
            block.set_submodule(n, t)
        with torch.no_grad():
            before = sum(float(_error(block, inputs[i], targets[i])) for i in held) / len(held)
        params = [t.z for t in tuned.values()]
        for step in range(steps):
            if not order:
                order = torch.randperm(len(inputs), generator=generator).tolist()
            i = order.pop()
            with torch.enable_grad():
                grads = torch.autograd.grad(_error(block, inputs[i], targets[i]), params, allow_unused=True)
            lr = (1.0 - step / steps) / steps
            with torch.no_grad():
                for z, g in zip(params, grads):
                    if g is not None:
                        z.sub_(lr * g.sign()).clamp_(-7.0, 7.0)
        with torch.no_grad():
            after = sum(float(_error(block, inputs[i], targets[i])) for i in held) / len(held)
    finally:
        for n, layer in layers.items():
            block.set_submodule(n, layer)
    kept = after < before and math.isfinite(after)
    changed = sum(int((t.z.detach().round() != starts[n]).sum()) for n, t in tuned.items())
    if kept:
        for t in tuned.values():
            t.store()
    total = sum(t.z.numel() for t in tuned.values())
    return BlockTuning(name, before, after, kept, changed / max(total, 1), time.perf_counter() - t0)
