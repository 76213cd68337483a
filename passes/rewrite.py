"""Rewrite each matched linear into NVFP4 activation-quantize + block-scaled GEMM over packed constants.

Before (``nn.Linear(64, 32)`` on ``x``):

    linear = torch._C._nn.linear(l_x_, l_fc_weight, l_fc_bias)

After, scheme ``nvfp4`` (``nvfp4a16`` drops the quantize and calls ``fp4.gemm_a16(x, ...)``):

    fc_packed = self.fc_packed;  fc_scales = self.fc_scales;  fc_pts = self.fc_pts      # uint8, uint8, fp32 []
    quantize_act = torch.ops.fp4.quantize_act.default(l_x_, None)                         # dynamic per-tensor scale
    gemm = torch.ops.fp4.gemm.default(quantize_act[0], quantize_act[1], quantize_act[2],
                                      fc_packed, fc_scales, fc_pts, l_fc_bias, torch.float32)

Packed weights are attributes of the GraphModule read with get_attr; the weight placeholders stay (Dynamo builds
the call from them) and tell the backend at run time whether a parameter was replaced or changed in place.
"""

import operator
import weakref
from dataclasses import dataclass, field, replace

import torch
from torch import fx
from torch._dynamo.source import ConstantSource

from fp4compile import format as nvfp4
from fp4compile.modules import matches_skip
from fp4compile.ops import SCHEMES

from .match import ADDMM_TARGETS, Linear, find_linears, stored_tensor


@dataclass
class LayerDecision:
    """What the pass did with one layer: ``reason`` is None when it was rewritten."""

    name: str
    op: str
    shape: tuple[int, int] | None  # (N, K) of the weight
    scheme: str | None
    reason: str | None = None


@dataclass
class RewriteReport:
    layers: list[LayerDecision] = field(default_factory=list)

    @property
    def rewritten(self) -> list[LayerDecision]:
        return [d for d in self.layers if d.reason is None]

    @property
    def skipped(self) -> list[LayerDecision]:
        return [d for d in self.layers if d.reason is not None]

    def __str__(self) -> str:
        lines = [f"fp4: {len(self.rewritten)} layer(s) rewritten, {len(self.skipped)} left in high precision"]
        for d in self.layers:
            shape = "x".join(map(str, d.shape)) if d.shape else "-"
            status = d.scheme if d.reason is None else f"skipped: {d.reason}"
            lines.append(f"  {d.name:<40} {d.op:<12} {shape:<12} {status}")
        return "\n".join(lines)


@dataclass
class Embedded:
    """A stored tensor (weight, or an NVFP4Linear buffer) whose packed form sits in the graph as constants."""

    source: torch.Tensor
    version: int
    placeholder_index: int | None  # its position among the graph's inputs; None for a get_attr weight
    constants: list[torch.Tensor]
    weight_kn: bool

    def is_current(self, args) -> bool:
        if self.placeholder_index is None:
            return self.source._version == self.version
        current = args[self.placeholder_index]
        return current is self.source and current._version == self.version

    def refresh(self, args, cache: "WeightCache") -> None:
        """Re-embed after the source tensor was replaced or changed in place."""
        if self.placeholder_index is not None:
            self.source = args[self.placeholder_index]
        self.version = self.source._version
        if self.source.dtype == torch.uint8 or self.source.dim() == 0:  # an NVFP4Linear buffer, embedded as is
            self.constants[0].copy_(self.source)
            return
        q = cache.get(self.source, self.weight_kn)
        for const, new in zip(self.constants, (q.packed, q.scales.view(torch.uint8), q.global_scale)):
            const.copy_(new)


class WeightCache:
    """Packed NVFP4 weights per stored tensor and version, so recompiles (new shapes) do not quantize again."""

    def __init__(self):
        self._entries: dict[tuple[int, bool], tuple[weakref.ref, int, nvfp4.NVFP4Tensor]] = {}
        self.quantized = 0  # how many times a weight was actually quantized

    def get(self, weight: torch.Tensor, weight_kn: bool) -> nvfp4.NVFP4Tensor:
        key = (id(weight), weight_kn)
        entry = self._entries.get(key)
        if entry is not None and entry[0]() is weight and entry[1] == weight._version:
            return entry[2]
        w = weight.detach()
        q = nvfp4.quantize(w.t() if weight_kn else w)

        def forget(ref, key=key):
            if key in self._entries and self._entries[key][0] is ref:
                del self._entries[key]

        self._entries[key] = (weakref.ref(weight, forget), weight._version, q)
        self.quantized += 1
        return q


WEIGHT_CACHE = WeightCache()


def _op_name(node: fx.Node) -> str:
    target = node.target
    if target is operator.matmul or target == "__matmul__":
        return "matmul"
    if isinstance(target, str):
        return target
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(getattr(target, "overloadpacket", target)).replace("fp4.", "fp4::")
    return getattr(target, "__name__", str(target))


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


class _Emitter:
    """Adds constants (get_attr) and op calls to one graph."""

    def __init__(self, gm: fx.GraphModule, fake_mode):
        self.gm, self.fake_mode = gm, fake_mode
        self.placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.weights: dict[tuple[fx.Node, bool], list[fx.Node]] = {}  # one set of constants per stored weight
        self.activations: dict[fx.Node, list[fx.Node]] = {}  # one dynamic quantize per activation (q, k, v)

    def constant(self, name: str, tensor: torch.Tensor) -> fx.Node:
        attr = "fp4_" + _safe(name)
        # A buffer of the graph module: AOTAutograd passes it to the compiled graph as a static input, so the FX
        # graph cache keys on its shape only and never stores weights, and CUDA graphs do not copy it.
        self.gm.register_buffer(attr, tensor, persistent=False)
        if hasattr(self.gm, "_param_name_to_source"):  # a Dynamo graph: AOTAutograd wants a source per buffer
            self.gm._param_name_to_source[attr] = ConstantSource(attr)
        node = self.gm.graph.get_attr(attr)
        if self.fake_mode is not None:
            node.meta["val"] = self.fake_mode.from_tensor(tensor, static_shapes=True)
        return node

    def index_of(self, node: fx.Node) -> int | None:
        return self.placeholders.index(node) if node.op == "placeholder" else None


def _weight_constants(emit: _Emitter, m: Linear, cache: WeightCache, embedded: list[Embedded]):
    """get_attr nodes for (packed, scales, pts) of ``m``'s weight, and the record that keeps them current."""
    key = (m.weight, m.weight_kn)
    if key not in emit.weights:
        emit.weights[key] = _new_weight_constants(emit, m, cache, embedded)
    return emit.weights[key]


def _new_weight_constants(emit: _Emitter, m: Linear, cache: WeightCache, embedded: list[Embedded]):
    if m.prepacked:
        nodes = []
        for suffix, arg in zip(("packed", "scales", "pts"), m.node.args[1:4]):
            tensor = stored_tensor(arg)
            nodes.append(emit.constant(f"{m.name}_{suffix}", tensor))
            embedded.append(Embedded(tensor, tensor._version, emit.index_of(arg), [tensor], False))
        return nodes
    weight = stored_tensor(m.weight)
    q = cache.get(weight, m.weight_kn)
    tensors = [q.packed.clone(), q.scales.view(torch.uint8).clone(), q.global_scale.clone()]
    embedded.append(Embedded(weight, weight._version, emit.index_of(m.weight), tensors, m.weight_kn))
    return [emit.constant(f"{m.name}_{s}", t) for s, t in zip(("packed", "scales", "pts"), tensors)]


def _static_act_scale(emit: _Emitter, m: Linear, embedded: list[Embedded]):
    arg = m.node.args[5] if m.prepacked else None
    if arg is None:
        return None
    tensor = stored_tensor(arg)
    embedded.append(Embedded(tensor, tensor._version, emit.index_of(arg), [tensor], False))
    return emit.constant(f"{m.name}_act_pts", tensor)


def _quantized_activation(g: fx.Graph, emit: _Emitter, m: Linear, embedded: list[Embedded], prefix: str):
    """(packed, scales, pts) nodes of ``m``'s activation; layers that share an input share a dynamic quantize."""
    act_pts = _static_act_scale(emit, m, embedded)
    if act_pts is None and m.x in emit.activations:
        return emit.activations[m.x]
    q = g.create_node("call_function", torch.ops.fp4.quantize_act.default, (m.x, act_pts), name=f"{prefix}_act")
    parts = [g.create_node("call_function", operator.getitem, (q, i), name=f"{prefix}_act_{part}")
             for i, part in enumerate(("packed", "scales", "pts"))]
    if act_pts is None:
        emit.activations[m.x] = parts
    return parts


def _out_dtype(x: fx.Node) -> torch.dtype:
    return x.meta.get("val", x.meta.get("example_value")).dtype


def rewrite_linears(
    gm: fx.GraphModule, *, scheme: str = "nvfp4", skip=("lm_head",), fake_mode=None, cache: WeightCache = WEIGHT_CACHE
) -> tuple[RewriteReport, list[Embedded]]:
    """Rewrite every quantizable linear of ``gm`` in place; return the report and the embedded constants.

    ``scheme`` applies to float weights; an NVFP4Linear keeps the scheme it was calibrated for. ``skip`` holds
    glob patterns matched against layer names (``lm_head``, ``*.attn.*``): those layers stay in high precision.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; expected one of {SCHEMES}")
    report, embedded, emit = RewriteReport(), [], _Emitter(gm, fake_mode)
    replaced: dict[fx.Node, fx.Node] = {}  # rewritten linear -> its GEMM, for a layer that reads it directly
    for m in find_linears(gm):
        linear_input = m.x  # the GEMM that replaces a linear carries no fake value; the linear did
        if m.x in replaced:
            m = replace(m, x=replaced[m.x])
        node = m.node
        weight = stored_tensor(m.weight)
        shape = None if weight is None else tuple(weight.t().shape if m.weight_kn else weight.shape)
        if m.prepacked:
            layer_scheme = node.args[6]
            shape = (shape[0], shape[1] * 2) if shape else None
        else:
            layer_scheme = scheme
        reason = m.skip_reason or (f"matches skip pattern in {tuple(skip)}" if matches_skip(m.name, skip) else None)
        if reason is None and m.prepacked and any(stored_tensor(a) is None for a in node.args[1:4]):
            reason = "packed weight is computed at run time, not a buffer"
        report.layers.append(LayerDecision(m.name, _op_name(node), shape, layer_scheme, reason))
        if reason is not None:
            continue
        g, prefix = gm.graph, _safe(m.name)
        with g.inserting_before(node):
            w_packed, w_scales, w_pts = _weight_constants(emit, m, cache, embedded)
            if layer_scheme == "nvfp4a16":
                args = (m.x, w_packed, w_scales, w_pts, m.bias)
                out = g.create_node("call_function", torch.ops.fp4.gemm_a16.default, args, name=f"{prefix}_gemm")
            else:
                a = _quantized_activation(g, emit, m, embedded, prefix)
                args = (*a, w_packed, w_scales, w_pts, m.bias, _out_dtype(linear_input))
                out = g.create_node("call_function", torch.ops.fp4.gemm.default, args, name=f"{prefix}_gemm")
        out.meta.update({k: v for k, v in node.meta.items() if k in ("stack_trace", "nn_module_stack")})
        node.replace_all_uses_with(out)
        replaced[node] = out
        rhs = node.args[2] if node.target in ADDMM_TARGETS else node.args[1]
        gm.graph.erase_node(node)
        if rhs is not m.weight and isinstance(rhs, fx.Node) and not rhs.users:  # the transpose only it used
            gm.graph.erase_node(rhs)
    gm.graph.lint()
    gm.recompile()
    return report, embedded
