"""Channel smoothing before calibration: move activation outliers into the weights, where GPTQ can handle them.

A normalization layer whose output feeds only linears (a Llama block's ``input_layernorm`` -> q/k/v,
``post_attention_layernorm`` -> gate/up) can take a per-channel factor: its weight (and bias) divided by ``s_j``
and column ``j`` of each of those linears' weights multiplied by it computes the same function (SmoothQuant,
Xiao et al. 2023). With ``s_j = amax(x_j)**alpha / amax(W[:, j])**(1 - alpha)``, channels whose activations run
large hand part of their range to the weights, and the activation's 16-element NVFP4 blocks lose less to one outlier.

In an fp32 model the factors are used as they are, and the smoothed model computes the same function up to fp32
rounding. In a lower-precision model each factor is rounded to a power of two, so that both sides of the fold are
exact and the model computes the same numbers, bit for bit; rounding costs some of the gain (tools/QUALITY.md).
``smooth`` checks the model's output on one sample of the data (equal up to rounding, or bit for bit) and undoes every
fold if it changed (a normalization output that also feeds something else).
"""

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

MIN_FACTOR_LOG2 = -20  # factors are clamped to 2**-20 .. 2**20
MAX_FACTOR_LOG2 = 20
AMAX_SAMPLES = 16  # samples the activation amax comes from (16 of 64 windows did better: tools/QUALITY.md)
FP32_TOLERANCE = 1e-4  # unrounded folds: largest output change allowed, relative to the output's largest magnitude


@dataclass
class SmoothReport:
    """What :func:`smooth` did: the normalizations folded (name -> the linears after it) and those left alone."""

    alpha: float
    power_of_two: bool = True  # whether the factors were rounded to powers of two (not every parameter fp32)
    folded: dict[str, list[str]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # normalization name -> why


def _is_norm(module: nn.Module) -> bool:
    """A normalization whose output is its normalized input times a per-channel ``weight`` (plus a ``bias``)."""
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return module.weight is not None
    weight = getattr(module, "weight", None)
    return (type(module).__name__.endswith("RMSNorm") and isinstance(weight, nn.Parameter) and weight.dim() == 1)


def _first_tensor(out) -> torch.Tensor:
    """The tensor a model output stands for: itself, ``.logits``, or the first tensor of a tuple or mapping."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    values = out.values() if isinstance(out, dict) else out
    return next(v for v in values if isinstance(v, torch.Tensor))


def _pairs(model: nn.Module, linears: dict[str, nn.Linear], run: Callable[[], object]
           ) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Normalizations whose output tensor is the input of some of ``linears`` in one forward (``run``): name ->
    those linears' names; and normalizations seen but not paired, with the reason."""
    norms = {n: m for n, m in model.named_modules() if _is_norm(m)}
    outputs: dict[int, tuple[str, torch.Tensor]] = {}  # the tensors are kept, so that no id is reused
    pairs: dict[str, list[str]] = {}

    def norm_hook(name):
        def hook(module, args, out):
            outputs[id(out)] = (name, out)
        return hook

    def linear_hook(name):
        def hook(module, args):
            norm, out = outputs.get(id(args[0]), (None, None))
            if out is args[0] and name not in pairs.get(norm, []):
                pairs.setdefault(norm, []).append(name)
        return hook

    _with_hooks(run, [m.register_forward_hook(norm_hook(n)) for n, m in norms.items()]
                + [m.register_forward_pre_hook(linear_hook(n)) for n, m in linears.items()])
    skipped = {n: "its output is not the input of a quantized linear" for n in norms if n not in pairs}
    return pairs, skipped


def _with_hooks(run: Callable[[], object], handles: list) -> None:
    try:
        run()
    finally:
        for h in handles:
            h.remove()


def _input_amax(model: nn.Module, linears: dict[str, nn.Linear], runs: Iterable[Callable[[], object]]
                ) -> dict[str, torch.Tensor]:
    """Per-channel max |x| of each linear's input over the runs."""
    amax: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, args):
            a = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0).float()
            amax[name] = torch.maximum(amax[name], a) if name in amax else a
        return record

    def run_all():
        for run in runs:
            run()

    _with_hooks(run_all, [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()])
    return amax


def check_alpha(alpha: float, name: str = "alpha") -> None:
    """Raise ValueError unless the smoothing strength ``alpha`` (given as ``name``) is in [0, 1]."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {alpha}")


def factors(x_amax: torch.Tensor, w_amax: torch.Tensor, alpha: float, power_of_two: bool) -> torch.Tensor:
    """Per-channel factors ``x_amax**alpha / w_amax**(1 - alpha)``, clamped to 2**-20 .. 2**20 and, with
    ``power_of_two``, rounded to powers of two (channels that are zero on either side get 1)."""
    live = (x_amax > 0) & (w_amax > 0)
    log2 = alpha * torch.log2(x_amax.clamp_min(1e-30)) - (1 - alpha) * torch.log2(w_amax.clamp_min(1e-30))
    log2 = log2.round() if power_of_two else log2
    log2 = torch.where(live, log2, torch.zeros_like(log2)).clamp(MIN_FACTOR_LOG2, MAX_FACTOR_LOG2)
    return torch.exp2(log2)


def _fold(norm: nn.Module, lins: list[nn.Linear], s: torch.Tensor) -> None:
    """Divide the normalization's weight (and bias) by ``s`` and multiply the linears' columns by it; ``1 / s``
    undoes it (exactly for powers of two, up to rounding otherwise)."""
    norm.weight.div_(s.to(norm.weight.dtype))
    if getattr(norm, "bias", None) is not None:
        norm.bias.div_(s.to(norm.bias.dtype))
    for lin in lins:
        lin.weight.mul_(s.to(lin.weight.dtype))


def _unchanged(before: torch.Tensor, after: torch.Tensor, exact: bool) -> bool:
    if exact:
        return torch.equal(before, after)
    scale = before.float().abs().max().clamp_min(1e-30)
    return bool((after.float() - before.float()).abs().max() <= FP32_TOLERANCE * scale)


@torch.no_grad()
def smooth(model: nn.Module, linears: dict[str, nn.Linear], runs: list[Callable[[], object]], alpha: float
           ) -> SmoothReport:
    """Fold channel factors into each normalization that feeds only some of ``linears`` and into those linears'
    weights, in place. ``runs`` are calls of the model on calibration samples: the first finds the pairs and checks
    the result, the first ``AMAX_SAMPLES`` give the activations' amax. Factors are exact powers of two unless every
    folded parameter is fp32. If the model's output on the first sample changed (beyond fp32 rounding, or at all
    with powers of two), every fold is undone (exactly for powers of two, up to fp32 rounding otherwise) and the
    report says so; nothing is folded if that output is not the same from one run to the next."""
    check_alpha(alpha)
    report = SmoothReport(alpha)
    if not runs:
        return report
    pairs, report.skipped = _pairs(model, linears, runs[0])
    if not pairs:
        return report
    modules = dict(model.named_modules())
    first_linears = {names[0]: linears[names[0]] for names in pairs.values()}  # the linears of a norm share one input
    x_amax = _input_amax(model, first_linears, runs[:AMAX_SAMPLES])
    before = _first_tensor(runs[0]()).clone()
    if not torch.equal(before, _first_tensor(runs[0]())):
        report.skipped.update({n: "the model's output differs between two runs of one sample, so the folds cannot "
                                  "be checked; nothing was smoothed" for n in pairs})
        return report
    report.power_of_two = any(p.dtype != torch.float32 for norm_name, names in pairs.items()
                              for p in (modules[norm_name].weight, *(linears[n].weight for n in names)))
    folds = []
    for norm_name, names in pairs.items():
        lins = [linears[n] for n in names]
        w_amax = torch.stack([lin.weight.detach().abs().amax(0).float() for lin in lins]).amax(0)
        s = factors(x_amax[names[0]], w_amax, alpha, report.power_of_two)
        _fold(modules[norm_name], lins, s)
        folds.append((modules[norm_name], lins, s))
        report.folded[norm_name] = names
    after = _first_tensor(runs[0]())
    if not _unchanged(before, after, report.power_of_two):
        for norm, lins, s in folds:
            _fold(norm, lins, 1 / s)
        changed = (after.float() - before.float()).abs().max().item()
        reason = (f"the folds changed the model's output (by up to {changed:.3g}): a normalization's output also "
                  "feeds something other than its linears; undone")
        report.skipped.update({n: reason for n in report.folded})
        report.folded = {}
    return report
