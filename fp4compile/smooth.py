"""Channel smoothing before calibration: move activation outliers into the weights, where GPTQ can handle them.

A normalization layer whose output feeds only linears (a Llama block's ``input_layernorm`` -> q/k/v,
``post_attention_layernorm`` -> gate/up) can take a per-channel factor: its weight (and bias) divided by ``s_j``
and column ``j`` of each of those linears' weights multiplied by it computes the same function (SmoothQuant,
Xiao et al. 2023). With ``s_j = amax(x_j)**alpha / amax(W[:, j])**(1 - alpha)``, channels whose activations run
large hand part of their range to the weights, and the activation's 16-element NVFP4 blocks lose less to one outlier.

Each factor is rounded to a power of two, so both sides of the fold are exact in floating point: the smoothed
model computes the same numbers as before, bit for bit. ``smooth`` checks exactly that on one sample of the data
and undoes every fold if the output changed (a normalization output that also feeds something else).
"""

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

MIN_FACTOR_LOG2 = -20  # factors are clamped to 2**-20 .. 2**20
MAX_FACTOR_LOG2 = 20


@dataclass
class SmoothReport:
    """What :func:`smooth` did: the normalizations folded (name -> the linears after it) and those left alone."""

    alpha: float
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

    handles = [m.register_forward_hook(norm_hook(n)) for n, m in norms.items()]
    handles += [m.register_forward_pre_hook(linear_hook(n)) for n, m in linears.items()]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    skipped = {n: "its output is not the input of a quantized linear" for n in norms if n not in pairs}
    return pairs, skipped


def _input_amax(model: nn.Module, linears: dict[str, nn.Linear], runs: Iterable[Callable[[], object]]
                ) -> dict[str, torch.Tensor]:
    """Per-channel max |x| of each linear's input over the runs."""
    amax: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, args):
            a = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0).float()
            amax[name] = torch.maximum(amax[name], a) if name in amax else a
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    try:
        for run in runs:
            run()
    finally:
        for h in handles:
            h.remove()
    return amax


def factors(x_amax: torch.Tensor, w_amax: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-channel factors ``x_amax**alpha / w_amax**(1 - alpha)``, rounded to powers of two (channels that are
    zero on either side get 1)."""
    live = (x_amax > 0) & (w_amax > 0)
    log2 = alpha * torch.log2(x_amax.clamp_min(1e-30)) - (1 - alpha) * torch.log2(w_amax.clamp_min(1e-30))
    log2 = torch.where(live, log2.round(), torch.zeros_like(log2)).clamp(MIN_FACTOR_LOG2, MAX_FACTOR_LOG2)
    return torch.exp2(log2)


def _fold(norm: nn.Module, lins: list[nn.Linear], s: torch.Tensor, inverse: bool = False) -> None:
    if inverse:
        s = 1 / s  # exact: a power of two
    norm.weight.div_(s.to(norm.weight.dtype))
    if getattr(norm, "bias", None) is not None:
        norm.bias.div_(s.to(norm.bias.dtype))
    for lin in lins:
        lin.weight.mul_(s.to(lin.weight.dtype))


@torch.no_grad()
def smooth(model: nn.Module, linears: dict[str, nn.Linear], runs: list[Callable[[], object]], alpha: float
           ) -> SmoothReport:
    """Fold power-of-two channel factors into each normalization that feeds only some of ``linears`` and into
    those linears' weights, in place. ``runs`` are calls of the model on calibration samples (the first one also
    finds the pairs and checks the result). If the model's output on the first sample is not bit-identical after
    the folds, they are all undone and the report says so; nothing is folded if that output is not the same from
    one run to the next."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    report = SmoothReport(alpha)
    if not runs:
        return report
    pairs, report.skipped = _pairs(model, linears, runs[0])
    if not pairs:
        return report
    modules = dict(model.named_modules())
    x_amax = _input_amax(model, {names[0]: linears[names[0]] for names in pairs.values()}, runs)  # one input each
    before = _first_tensor(runs[0]()).clone()
    if not torch.equal(before, _first_tensor(runs[0]())):
        report.skipped.update({n: "the model's output differs between two runs of one sample, so the folds cannot "
                                  "be checked; nothing was smoothed" for n in pairs})
        return report
    folds = []
    for norm_name, names in pairs.items():
        lins = [linears[n] for n in names]
        w_amax = torch.stack([lin.weight.detach().abs().amax(0).float() for lin in lins]).amax(0)
        s = factors(x_amax[names[0]], w_amax, alpha)
        _fold(modules[norm_name], lins, s)
        folds.append((modules[norm_name], lins, s))
        report.folded[norm_name] = names
    after = _first_tensor(runs[0]())
    if not torch.equal(before, after):
        for norm, lins, s in folds:
            _fold(norm, lins, s, inverse=True)
        changed = (after.float() - before.float()).abs().max().item()
        reason = (f"the folds changed the model's output (by up to {changed:.3g}): a normalization's output also "
                  "feeds something other than its linears; nothing was smoothed")
        report.skipped.update({n: reason for n in report.folded})
        report.folded = {}
    return report
