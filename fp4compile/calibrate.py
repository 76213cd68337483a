"""``calibrate``: GPTQ every eligible ``nn.Linear`` of a model in place, leaving ``NVFP4Linear`` layers.

Sequential by default: the model's repeated blocks (an ``nn.ModuleList`` of one block class, e.g.
``model.model.layers``) are calibrated one after another, each on the outputs of the already-quantized blocks
before it; with ``true_sequential``, a block's linears are also quantized group by group (q/k/v, o, gate/up, down),
each group on the outputs of the already-quantized groups before it. A model without such blocks is calibrated all
at once. For ``nvfp4``, channel smoothing (``smooth``) first moves activation outliers into the weights, keeping the
model's function (up to fp32 rounding). With ``tune_steps``, each block's codes are then tuned by the block's output
error (``tune``).
"""

import contextlib
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from . import format as nvfp4
from . import gptq as G
from .modules import NVFP4Linear, matches_skip
from .ops import SCHEMES
from .smooth import SmoothReport, check_alpha, smooth as smooth_channels
from .tune import BlockTuning, hidden_output, tune_block

DEFAULT_SKIP = ("lm_head",)

# calibrate()'s ``asymmetric`` per scheme (tools/QUALITY.md). With the Hessian shrink (SHRINK_DEFAULT), nvfp4a16 was
# better on both evaluation texts at 0.5 than at 0.25, and nvfp4 at 0.25 than at 0; without the shrink, 0.25 was
# best for nvfp4a16, nvfp4 lost a little on the distant text at 0.25, and 1.0 was far worse (nvfp4a16).
ASYMMETRIC_DEFAULT = {"nvfp4a16": 0.5, "nvfp4": 0.25}
# calibrate()'s ``true_sequential`` per scheme (tools/QUALITY.md): better on both evaluation texts for nvfp4a16; for
# nvfp4 better on the text near the calibration data and a hair worse on the distant one.
TRUE_SEQUENTIAL_DEFAULT = {"nvfp4a16": True, "nvfp4": False}
# calibrate()'s ``shrink`` per scheme (tools/QUALITY.md): 0.5 gave better perplexity than plain GPTQ (0) on both
# evaluation texts; 0.8 helped the distant text more and the near one less.
SHRINK_DEFAULT = {"nvfp4a16": 0.5, "nvfp4": 0.5}
# calibrate()'s ``smooth`` per scheme (tools/QUALITY.md): for nvfp4, alpha 0.7 cut the perplexity gap on both
# evaluation texts (0.61 / 0.47 -> 0.50 / 0.40), 0.5 less on the distant one (0.55 / 0.39); for nvfp4a16 smoothing
# helps round-to-nearest but not GPTQ (0.35 / 0.28 -> 0.39 / 0.28 at alpha 0.7).
SMOOTH_DEFAULT = {"nvfp4a16": 0.0, "nvfp4": 0.7}


@dataclass
class LayerReport:
    """One calibrated linear. Errors are relative output errors on the calibration inputs (``gptq.output_error``):
    ``rtn_error`` for plain round-to-nearest (``format.quantize``), ``gptq_error`` for what the layer now holds."""

    name: str
    shape: tuple[int, int]  # (out_features, in_features)
    rtn_error: float
    gptq_error: float
    seconds: float
    percdamp: float  # the dampening that made H positive definite
    fallback: str | None = None  # why GPTQ was not used, if it was not
    input_global_scale: float | None = None  # static activation scale, when recorded


@dataclass
class SkippedLayer:
    name: str
    reason: str


@dataclass
class CalibrationReport:
    """What :func:`calibrate` did: per layer errors and times, skipped layers and weight memory."""

    scheme: str
    blocks: str | None  # the ModuleList calibrated block by block, None if all at once
    samples: int
    layers: list[LayerReport] = field(default_factory=list)
    skipped: list[SkippedLayer] = field(default_factory=list)
    seconds: float = 0.0
    weight_bytes_before: int = 0  # the calibrated layers' weights before ...
    weight_bytes_after: int = 0  # ... and after (packed values, block scales, global scale)
    smoothing: SmoothReport | None = None  # the channel smoothing done first, if any
    tuning: list[BlockTuning] = field(default_factory=list)  # block output tuning after GPTQ, per block

    @property
    def rtn_error(self) -> float:
        """Mean relative output error of round-to-nearest over the calibrated layers."""
        return sum(r.rtn_error for r in self.layers) / max(len(self.layers), 1)

    @property
    def gptq_error(self) -> float:
        """Mean relative output error of the calibrated layers."""
        return sum(r.gptq_error for r in self.layers) / max(len(self.layers), 1)

    @property
    def memory_ratio(self) -> float:
        return self.weight_bytes_before / max(self.weight_bytes_after, 1)

    def summary(self) -> str:
        mode = f"block by block over {self.blocks}" if self.blocks else "all at once"
        if self.smoothing is not None:
            mode += f", {len(self.smoothing.folded)} normalizations smoothed (alpha {self.smoothing.alpha})"
        if self.tuning:
            kept = [t for t in self.tuning if t.kept]
            before = sum(t.error_before for t in self.tuning) / len(self.tuning)
            after = sum(t.error_after if t.kept else t.error_before for t in self.tuning) / len(self.tuning)
            mode += (f", {len(kept)} of {len(self.tuning)} blocks tuned (block output error {before:.4g} -> "
                     f"{after:.4g})")
        return (f"{len(self.layers)} layers calibrated ({self.scheme}, {mode}, {self.samples} samples) in "
                f"{self.seconds:.1f} s; {len(self.skipped)} skipped; mean relative output error "
                f"RTN {self.rtn_error:.4g} -> GPTQ {self.gptq_error:.4g}; weights "
                f"{self.weight_bytes_before / 2**20:.1f} MiB -> {self.weight_bytes_after / 2**20:.1f} MiB "
                f"({self.memory_ratio:.2f}x)")


def eligible_linears(model: nn.Module, skip: Iterable[str] = DEFAULT_SKIP
                     ) -> tuple[dict[str, nn.Linear], list[SkippedLayer]]:
    """The ``nn.Linear`` layers ``calibrate`` quantizes, and those it leaves alone with the reason.

    A skip pattern (fnmatch) matches a module's full name or its last component.
    """
    chosen, skipped = {}, []
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        if matches_skip(name, skip):
            skipped.append(SkippedLayer(name, "in skip"))
        elif m.in_features % nvfp4.BLOCK_SIZE:
            skipped.append(SkippedLayer(name, f"in_features={m.in_features} is not a multiple of "
                                              f"{nvfp4.BLOCK_SIZE}"))
        elif m.weight.dtype not in nvfp4.SUPPORTED_DTYPES:
            skipped.append(SkippedLayer(name, f"weight dtype {m.weight.dtype} is not supported"))
        else:
            chosen[name] = m
    return chosen, skipped


def _inside(module: nn.Module, linears: dict[str, nn.Linear]) -> dict[str, nn.Linear]:
    """Those of ``linears`` that are submodules of ``module``."""
    ids = {id(m) for m in module.modules()}
    return {n: m for n, m in linears.items() if id(m) in ids}


def find_blocks(model: nn.Module, linears: dict[str, nn.Linear]) -> tuple[str, nn.ModuleList] | None:
    """The ``nn.ModuleList`` of two or more blocks of one class holding the most of ``linears``, if any."""
    best, best_count = None, 0
    for name, m in model.named_modules():
        if not isinstance(m, nn.ModuleList) or len(m) < 2 or len({type(b) for b in m}) != 1:
            continue
        count = len(_inside(m, linears))
        if count > best_count:
            best, best_count = (name, m), count
    return best


class _Stop(Exception):
    pass


class _Collector:
    """Forward pre-hooks that accumulate each linear's input Hessian (and amax) while registered.

    Linears that receive the same input tensor in one forward (q/k/v, gate/up) share one Hessian. With
    ``fake_quant``, inputs are first fake-quantized as the ``nvfp4`` runtime quantizes them (dynamic global scale).
    With ``asymmetric``, the Hessians also keep the cross term with ``refs``, each linear's input in the unquantized
    model for the sample being run (set it before each sample, see :func:`_reference_inputs`). With ``stop_after``,
    that linear's hook raises ``_Stop`` once it has collected: the rest of the forward is not needed.
    """

    def __init__(self, linears: dict[str, nn.Linear], fake_quant: bool, asymmetric: bool = False,
                 stop_after: str | None = None):
        self.fake_quant = fake_quant
        self.asymmetric = asymmetric
        self.stop_after = stop_after
        self.refs: dict[str, torch.Tensor] = {}
        self.hessians: dict[str, G.Hessian] = {}
        self.amax: dict[str, torch.Tensor] = {}
        self._shared: dict[str, str] = {}  # name -> the name whose Hessian it shares
        self._last: tuple[torch.Tensor, str] | None = None
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in linears.items()]

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0]
            if self._last is not None and self._last[0] is x and self._last[1] != name:
                self._shared[name] = self._last[1]
            else:
                self._last = (x, name)
                h = self.hessians.get(name)
                if h is None:
                    h = self.hessians[name] = G.Hessian(x.shape[-1], x.device, self.asymmetric)
                amax = x.detach().abs().amax().float()
                self.amax[name] = torch.maximum(self.amax[name], amax) if name in self.amax else amax
                h.add(nvfp4.fake_quantize(x) if self.fake_quant else x, self.refs.get(name))
            if name == self.stop_after:
                raise _Stop
        return hook

    def hessian(self, name: str) -> G.Hessian | None:
        return self.hessians.get(self._shared.get(name, name))

    def amax_of(self, name: str) -> torch.Tensor | None:
        return self.amax.get(self._shared.get(name, name))

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._last = None


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _run(model: nn.Module, item, device):
    """Call ``model`` on one data item: a tensor, a tuple/list of positional inputs, or a dict of keyword inputs."""
    item = _to(item, device)
    if isinstance(item, dict):
        return model(**item)
    if isinstance(item, (tuple, list)):
        return model(*item)
    return model(item)


def _capture_inputs(model: nn.Module, block: nn.Module, data: Iterable, device) -> list[tuple[tuple, dict]]:
    """The (args, kwargs) ``block`` is called with for each data item; the model stops right there."""
    inputs = []

    def hook(module, args, kwargs):
        inputs.append((args, kwargs))
        raise _Stop

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for item in data:
            with contextlib.suppress(_Stop):
                _run(model, item, device)
    finally:
        handle.remove()
    return inputs


def _next_inputs(block: nn.Module, inputs: list[tuple[tuple, dict]]) -> list[tuple[tuple, dict]]:
    """Run ``block`` on each captured input; its output (first element of a tuple) becomes the next input."""
    out = []
    for args, kwargs in inputs:
        y = hidden_output(block(*args, **kwargs))
        if args:
            out.append(((y, *args[1:]), kwargs))
        elif "hidden_states" in kwargs:
            out.append(((), {**kwargs, "hidden_states": y}))
        else:
            raise ValueError(f"cannot tell which input of {type(block).__name__} is the hidden state: it got no "
                             "positional argument and no 'hidden_states' keyword")
    return out


def _hidden_state(sample: tuple[tuple, dict]) -> torch.Tensor:
    """The hidden state in a block input as ``_next_inputs`` builds it."""
    args, kwargs = sample
    return args[0] if args else kwargs["hidden_states"]


def _groups(block: nn.Module, linears: dict[str, nn.Linear], sample: tuple[tuple, dict]
            ) -> list[tuple[dict[str, nn.Linear], str | None]]:
    """``linears`` (those of ``block``) in groups that read the same input tensor, in the order one forward of
    ``block`` on ``sample`` calls them (in a Llama block: q/k/v, o, gate/up, down), each with the last of its
    linears called, where a forward that collects the group's Hessians can stop. Linears the forward does not call
    come last, in one group with no stop.
    """
    group_inputs: list[torch.Tensor] = []
    groups: list[dict[str, nn.Linear]] = []

    def hook(name: str):
        def record(module, args):
            if any(name in g for g in groups):
                return  # called again: it stays in the group of its first call
            same = [g for x, g in zip(group_inputs, groups) if x is args[0]]
            if not same:
                group_inputs.append(args[0])
                groups.append({})
            (same or groups)[-1][name] = linears[name]
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    try:
        args, kwargs = sample
        block(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    found = [(g, list(g)[-1]) for g in groups]
    rest = {n: m for n, m in linears.items() if not any(n in g for g in groups)}
    return found + [(rest, None)] if rest else found


def _reference_inputs(block: nn.Module, linears: dict[str, nn.Linear], fp_inputs: list[tuple[tuple, dict]]
                      ) -> tuple[list[dict[str, torch.Tensor]], list[tuple[tuple, dict]]]:
    """Run the unquantized ``block`` on the unquantized model's inputs ``fp_inputs``: per sample, the input of each
    of ``linears`` (the ``refs`` of the asymmetric target), and the block's outputs (the next block's inputs)."""
    refs: list[dict[str, torch.Tensor]] = []

    def hook(name: str):
        def record(module, args):
            refs[-1][name] = args[0]
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    outputs = []
    try:
        for sample in fp_inputs:
            refs.append({})
            outputs += _next_inputs(block, [sample])
    finally:
        for h in handles:
            h.remove()
    return refs, outputs


@contextlib.contextmanager
def _no_cache(model: nn.Module):
    """Turn off a transformers model's KV cache: blocks are re-run on the same inputs, which must not append."""
    config = getattr(model, "config", None)
    old = getattr(config, "use_cache", None)
    if old is not None:
        config.use_cache = False
    try:
        yield
    finally:
        if old is not None:
            config.use_cache = old


@dataclass
class _Settings:
    scheme: str
    fmt: G.Format
    percdamp: float
    blocksize: int
    act_order: bool
    scale_timing: G.ScaleTiming
    static_activation_scale: bool
    asymmetric: float
    true_sequential: bool
    shrink: float
    refit_rounds: int
    tune_steps: int
    tune_alpha: float


def _quantize_layers(model: nn.Module, linears: dict[str, nn.Linear], collector: _Collector, s: _Settings,
                     report: CalibrationReport, bar) -> None:
    """GPTQ each of ``linears`` from the collected Hessians and swap it for an ``NVFP4Linear`` in ``model``."""
    for name, lin in linears.items():
        hess = collector.hessian(name)
        if hess is None:
            report.skipped.append(SkippedLayer(name, "never called on the calibration data"))
            bar.update(1)
            continue
        t0 = time.perf_counter()
        bar.set_postfix_str(name)
        w = lin.weight.detach()
        target = w if hess.cross is None else G.asymmetric_target(w, hess.h, hess.cross, s.asymmetric, s.percdamp)
        res = G.gptq(target, hess.h, s.fmt, percdamp=s.percdamp, blocksize=s.blocksize, act_order=s.act_order,
                     scale_timing=s.scale_timing, shrink=s.shrink, refit_rounds=s.refit_rounds)
        rtn_q = nvfp4.dequantize(nvfp4.quantize(w))
        act_scale = nvfp4.global_scale_from_amax(collector.amax_of(name)) if s.static_activation_scale else None
        model.set_submodule(name, NVFP4Linear.from_linear(lin, res.quantized, scheme=s.scheme,
                                                          input_global_scale=act_scale))
        report.weight_bytes_before += w.numel() * w.element_size()
        report.weight_bytes_after += sum(t.numel() * t.element_size() for t in
                                         (res.quantized.packed, res.quantized.scales, res.quantized.global_scale))
        report.layers.append(LayerReport(
            name, tuple(w.shape), G.output_error(w, rtn_q, hess.h), G.output_error(w, res.dequantized, hess.h),
            time.perf_counter() - t0, res.percdamp, res.fallback,
            None if act_scale is None else float(act_scale)))
        bar.update(1)


def _calibrate_blocks(model, blocks: nn.ModuleList, linears, data, device, fake_quant: bool, s: _Settings,
                      report: CalibrationReport, bar) -> dict[str, nn.Linear]:
    """Block by block: each block's Hessians come from the outputs of the already-quantized blocks before it.

    Linears outside the blocks that run before the first block are calibrated first; returns those that remain.
    With ``s.true_sequential``, a block's linears are quantized group by group (``_groups``), each group's Hessians
    collected with the groups before it in the block already quantized. With ``s.asymmetric``, each block first runs
    unquantized on the unquantized model's inputs, for the cross terms.
    """
    outside = {n: m for n, m in linears.items() if n not in _inside(blocks, linears)}
    collector = _Collector(outside, fake_quant)
    try:
        inputs = _capture_inputs(model, blocks[0], data, device)
    finally:
        collector.close()
    fp_inputs = inputs if s.asymmetric or s.tune_steps else None
    before = {n: m for n, m in outside.items() if collector.hessian(n) is not None}
    if before:
        _quantize_layers(model, before, collector, s, report, bar)
        inputs = _capture_inputs(model, blocks[0], data, device)
    report.samples = len(inputs)
    for i, block in enumerate(blocks):
        mine = _inside(block, linears)
        groups = _groups(block, mine, inputs[0]) if s.true_sequential else [(mine, None)]
        refs = [{} for _ in inputs]
        if fp_inputs is not None:
            refs, fp_inputs = _reference_inputs(block, mine if s.asymmetric else {}, fp_inputs)
        if s.tune_steps:
            # the weights before quantization, by name inside the block (tuning starts from them), and where the
            # block's output should be: a blend of the unquantized block's on either input
            ids = {id(lin) for lin in mine.values()}
            originals = {n: m.weight.detach() for n, m in block.named_modules() if id(m) in ids}
            own = [_hidden_state(sample) for sample in _next_inputs(block, inputs)] if s.tune_alpha < 1 else None
            targets = [_hidden_state(sample) for sample in fp_inputs]
            if own is not None:
                targets = [torch.lerp(o, t, s.tune_alpha) for o, t in zip(own, targets)]
        for group, stop_after in groups:
            collector = _Collector(group, fake_quant, asymmetric=bool(s.asymmetric), stop_after=stop_after)
            try:
                for (args, kwargs), sample_refs in zip(inputs, refs):
                    collector.refs = sample_refs
                    with contextlib.suppress(_Stop):
                        block(*args, **kwargs)
            finally:
                collector.close()
            _quantize_layers(model, group, collector, s, report, bar)
        if s.tune_steps:
            bar.set_postfix_str(f"tuning block {i}")
            quantized = {n: w for n, w in originals.items() if isinstance(block.get_submodule(n), NVFP4Linear)}
            report.tuning.append(tune_block(f"{report.blocks}.{i}", block, quantized, inputs, targets,
                                            s.tune_steps, seed=i))
        inputs = _next_inputs(block, inputs) if i + 1 < len(blocks) else []
    return {n: m for n, m in outside.items() if n not in before}


def _calibrate_all_at_once(model, linears, data, device, fake_quant: bool, s: _Settings,
                           report: CalibrationReport, bar) -> None:
    """One pass of the whole model over ``data`` gathers every Hessian; then all layers are quantized."""
    collector = _Collector(linears, fake_quant)
    try:
        report.samples = 0
        for item in data:
            _run(model, item, device)
            report.samples += 1
    finally:
        collector.close()
    _quantize_layers(model, linears, collector, s, report, bar)


@torch.no_grad()
def calibrate(model: nn.Module, data: Iterable, *, scheme: str = "nvfp4", percdamp: float = 0.01,
              blocksize: int = 128, act_order: bool = True, scale_search: G.ScaleSearch = "mse",
              scale_timing: G.ScaleTiming = "upfront", sequential: bool = True, fake_quant_inputs: bool = True,
              static_activation_scale: bool = False, asymmetric: float | None = None,
              true_sequential: bool | None = None, shrink: float | None = None, refit_rounds: int = 0,
              smooth: float | None = None, tune_steps: int = 0, tune_alpha: float = 1.0,
              skip: Iterable[str] = DEFAULT_SKIP, progress: bool = True
              ) -> CalibrationReport:
    """Quantize ``model``'s eligible linears with GPTQ on ``data`` and replace them, in place, by ``NVFP4Linear``.

    data: an iterable of model inputs (a tensor, a tuple of positional inputs or a dict of keyword inputs), as a
        DataLoader yields them. Sequential calibration keeps every sample's block inputs in memory.
    scheme: "nvfp4" (weights and activations) or "nvfp4a16" (weights only); the layers run with it.
    fake_quant_inputs: for "nvfp4", gather Hessians from the activations fake-quantized as the runtime does.
    static_activation_scale: record each layer's activation amax; ``input_global_scale = amax / 2688``.
    scale_search: how each block scale is chosen (``gptq.SCALE_TARGETS``); "mse" measured best with act-order,
        then "four_over_six" (tools/QUALITY.md).
    scale_timing: see ``gptq.gptq``; "upfront" measured better than "sweep" (and act_order needs it).
    act_order: quantize columns in order of decreasing Hessian diagonal; measured better on both evaluation
        texts (tools/QUALITY.md), so on by default.
    asymmetric: alpha of ``gptq.asymmetric_target`` (QEP / GPTAQ); above 0, each layer aims at the unquantized
        model's output rather than at its own weight on the quantized inputs, which also undoes part of the error
        of the layers before it. Block-by-block calibration only; each block then runs once more per sample.
        None: ``ASYMMETRIC_DEFAULT[scheme]``. Keeps every sample's unquantized inputs of each block's linears in
        memory while the block is calibrated.
    true_sequential: within each block, quantize the linears group by group (linears reading the same input form a
        group, in the order a forward calls them: q/k/v, o, gate/up, down), each group's Hessians collected with the
        earlier groups of the block already quantized, so later layers correct their error ("true sequential" of
        the reference GPTQ code). Block-by-block calibration only; each block then runs once more per group
        (up to the group's input) per sample. None: ``TRUE_SEQUENTIAL_DEFAULT[scheme]`` (on for "nvfp4a16").
    shrink: how far each layer's Hessian is pulled towards its diagonal (``gptq.gptq``), so that a column's error
        is carried less onto the columns it correlates with in the calibration data; 0.5 measured better than plain
        GPTQ on text unlike the calibration data and on text like it (tools/QUALITY.md). 0 is plain GPTQ, 1 no
        error feedback at all. None: ``SHRINK_DEFAULT[scheme]``.
    refit_rounds: after GPTQ, set each block scale anew for the codes GPTQ chose, by the layer's output error on
        the calibration inputs (``gptq.refit_block_scales``); each further round runs GPTQ again with those scales
        and refits again. Off by default: one round changed perplexity by less than the choice of calibration
        windows does, better with one seed and worse with another for nvfp4a16 (tools/QUALITY.md).
    smooth: alpha of the channel smoothing done before anything else (``smooth.smooth``): each normalization
        whose output feeds only quantized linears (a Llama block's two RMSNorms) and those linears' weights take
        per-channel factors that keep the model's function (up to fp32 rounding; powers of two, bit for bit, in
        lower precision), moving activation outliers into the weights. 0 turns it off. None:
        ``SMOOTH_DEFAULT[scheme]`` (0.7 for "nvfp4", where it cut the perplexity gap on both evaluation texts; off
        for "nvfp4a16", where GPTQ did better without it). The model keeps the changed normalization weights,
        which checkpoints save with the rest.
    tune_steps: after GPTQ has quantized a block, tune its codes by the block's output error against the
        unquantized model for this many sign-gradient steps of one sample each (``tune.tune_block``, as AutoRound
        does; block-by-block calibration only). 0 (the default) turns it off.
    tune_alpha: the output tuning aims at, per sample, ``lerp(B(x_q), B(x), tune_alpha)``: ``B`` the unquantized
        block, ``x_q`` its input in the model quantized so far, ``x`` in the unquantized model. 1 (the default) aims
        at the unquantized model's own output, which also undoes part of the error of the blocks before; 0 at what
        the unquantized block makes of the input it actually gets. On SmolLM2-135M (nvfp4a16) 1 and 0.5 (the
        ``asymmetric`` default) gained about alike, on different texts (tools/QUALITY.md).
    skip: fnmatch patterns of module names (full or last component) left in high precision.
    Linears with ``in_features % 16 != 0`` are skipped too; the report says which and why.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; expected one of {SCHEMES}")
    if shrink is not None:
        G.check_shrink(shrink)  # before any calibration work
    G.check_refit_rounds(refit_rounds)
    if tune_steps < 0:
        raise ValueError(f"tune_steps must be 0 or more, got {tune_steps}")
    check_alpha(tune_alpha, "tune_alpha")
    if static_activation_scale and scheme != "nvfp4":
        raise ValueError("static_activation_scale needs scheme='nvfp4' (nvfp4a16 does not quantize activations)")
    alpha = SMOOTH_DEFAULT[scheme] if smooth is None else smooth
    check_alpha(alpha, "smooth")
    t0 = time.perf_counter()
    asymmetric = ASYMMETRIC_DEFAULT[scheme] if asymmetric is None else asymmetric
    s = _Settings(scheme, G.nvfp4_format(scale_search), percdamp, blocksize, act_order,
                  scale_timing, static_activation_scale, asymmetric,
                  TRUE_SEQUENTIAL_DEFAULT[scheme] if true_sequential is None else true_sequential,
                  SHRINK_DEFAULT[scheme] if shrink is None else shrink, refit_rounds, tune_steps, tune_alpha)
    fake_quant = fake_quant_inputs and scheme == "nvfp4"
    linears, skipped = eligible_linears(model, skip)
    found = find_blocks(model, linears) if sequential else None
    if tune_steps and found is None:
        warnings.warn("tune_steps is ignored: output tuning runs block by block, and this calibration runs all at "
                      "once (sequential=False, or no repeated blocks found)", stacklevel=2)
    device = next(model.parameters()).device
    data = data if found is None and not alpha else list(data)
    report = CalibrationReport(scheme, found[0] if found else None, 0, skipped=skipped)
    was_training = model.training
    model.eval()
    try:
        with _no_cache(model), tqdm(total=len(linears), desc="calibrate", disable=not progress) as bar:
            if alpha:
                bar.set_postfix_str("smoothing")
                report.smoothing = smooth_channels(model, linears, [lambda item=item: _run(model, item, device)
                                                                    for item in data], alpha)
            rest = linears
            if found is not None:
                rest = _calibrate_blocks(model, found[1], linears, data, device, fake_quant, s, report, bar)
            if rest:
                _calibrate_all_at_once(model, rest, data, device, fake_quant, s, report, bar)
    finally:
        model.train(was_training)
    report.seconds = time.perf_counter() - t0
    return report


def quantize_model(model: nn.Module, *, scheme: str = "nvfp4", skip: Iterable[str] = DEFAULT_SKIP) -> list[str]:
    """Replace ``model``'s eligible linears, in place, by ``NVFP4Linear`` with round-to-nearest weights, no data.

    The numbers are those the fp4 backend computes for the unconverted model; the model then holds only packed
    weights (about 3.5x less weight memory than bf16). Returns the names of the replaced layers.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; expected one of {SCHEMES}")
    linears, _ = eligible_linears(model, skip)
    for name, lin in linears.items():
        model.set_submodule(name, NVFP4Linear.from_linear(lin, nvfp4.quantize(lin.weight.detach()), scheme=scheme))
    return list(linears)
