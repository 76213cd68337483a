"""Rewrite each matched linear into an NVFP4 block-scaled GEMM over packed constants.

Before (``nn.Linear(64, 32)`` on ``x``):

    linear = torch._C._nn.linear(l_x_, l_fc_weight, l_fc_bias)

After, scheme ``nvfp4`` (``nvfp4a16`` calls ``fp4.gemm_a16(x, ...)``, which does not quantize ``x``):

    fc_packed = self.fc_packed;  fc_scales = self.fc_scales;  fc_pts = self.fc_pts      # uint8, uint8, fp32 []
    fc_gemm = torch.ops.fp4.gemm.default(l_x_, None, [fc_packed], [fc_scales], [fc_pts], [l_fc_bias])
    fc_out = fc_gemm[0]

``fp4.gemm`` quantizes its activation to NVFP4 (None: with a dynamic per-tensor scale; a calibrated layer passes
its static one) and multiplies; ``ops`` decides how the two run (on CUDA at one row, in one kernel). Where several
GEMM ops quantize one activation dynamically, its scale is computed once (``format.global_scale_of``) and passed
to each.

Linears that read the same activation (a layer's q/k/v or gate/up projections) become one GEMM op whose lists hold
all their weights (``..._self_attn_q_proj_k_proj_v_proj_gemm``), with one output each; the kernels run it as one launch.

Packed weights are attributes of the GraphModule read with get_attr; the weight placeholders stay (Dynamo builds
the call from them) and tell the backend at run time whether a parameter was replaced or changed in place.
"""

import operator
import weakref
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import fx
from torch._dynamo.source import ConstantSource

from fp4compile import format as nvfp4
from fp4compile.modules import matches_skip
from fp4compile.ops import SCHEMES

from fp4compile.kernels import GROUP_ALIGN, MAX_GROUP

from .match import ADDMM_TARGETS, Linear, find_linears, stored_tensor


@dataclass
class LayerDecision:
    """What the pass did with one layer: ``reason`` is None when it was rewritten."""

    name: str
    op: str
    shape: tuple[int, int] | None  # (N, K) of the weight
    scheme: str | None
    reason: str | None = None
    group: tuple[str, ...] = ()  # the layers (itself included) whose GEMMs run as one launch with it


@dataclass
class RewriteReport:
    layers: list[LayerDecision] = field(default_factory=list)

    @property
    def groups(self) -> list[tuple[str, ...]]:
        """The layers that run as one GEMM launch, one tuple of names per launch."""
        return list(dict.fromkeys(d.group for d in self.layers if d.group))

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
            if d.group:
                status += f", group of {len(d.group)}"
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
    packed_buffer: bool = False  # an NVFP4Linear's packed values or block scales, embedded as the buffer itself

    @property
    def aliased(self) -> bool:
        """The constant is the buffer itself, so a change in place is seen as it is and only a replaced buffer needs
        re-embedding. Not so for global scales, though embedded the same way: a GEMM may hold one as a host float
        (``refresh_host_alphas``)."""
        return self.packed_buffer and self.constants[0] is self.source

    def is_current(self, args) -> bool:
        if self.placeholder_index is not None and args[self.placeholder_index] is not self.source:
            return False
        return self.aliased or self.source._version == self.version

    def refresh(self, args, cache: "WeightCache") -> None:
        """Re-embed after the source tensor was replaced or changed in place."""
        if self.placeholder_index is not None:
            self.source = args[self.placeholder_index]
        if self.source.dtype == torch.uint8 or self.source.dim() == 0:  # an NVFP4Linear buffer, embedded as is
            if self.constants[0] is not self.source:  # a copy into the buffer itself would count as a change
                self.constants[0].copy_(self.source)
        else:
            q = cache.get(self.source, self.weight_kn)
            for const, new in zip(self.constants, (q.packed, q.scales.view(torch.uint8), q.global_scale)):
                const.copy_(new)
        self.version = self.source._version


class EmbeddedSet:
    """A compiled graph's embedded tensors, checked before every call: a decode step calls the graph once per token,
    and a 32-layer model embeds up to 672 tensors. The common case (nothing changed) runs as C loops over
    precomputed tuples (each input still the same object, each tracked tensor at its version); only when that fails
    are the tensors looked at one by one."""

    def __init__(self, embedded: list[Embedded]):
        self.embedded = embedded
        self._snapshot()

    def _snapshot(self) -> None:
        inputs = [e for e in self.embedded if e.placeholder_index is not None]
        indices = [e.placeholder_index for e in inputs]
        # One index more than needed makes itemgetter return a tuple even for one input; the comparison stops at
        # the shorter of the two.
        self._inputs_of = operator.itemgetter(*indices, indices[0]) if indices else (lambda args: ())
        self._inputs = tuple(e.source for e in inputs)
        tracked = [e for e in self.embedded if not e.aliased]
        self._tracked = tuple(e.source for e in tracked)
        self._versions = [e.version for e in tracked]

    def _current(self, args) -> bool:
        return (all(map(operator.is_, self._inputs_of(args), self._inputs))
                and list(map(_VERSION, self._tracked)) == self._versions)

    def refresh(self, args, cache: "WeightCache") -> bool:
        """Re-embed every tensor replaced or changed in place since the last call; True when one was."""
        if self._current(args):
            return False
        for e in self.embedded:
            if not e.is_current(args):
                e.refresh(args, cache)
        self._snapshot()
        return True


_VERSION = operator.attrgetter("_version")


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
        self.shared_scales: dict[fx.Node, fx.Node | None] = {}  # activation -> its dynamic scale, where ops share it

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
            embedded.append(Embedded(tensor, tensor._version, emit.index_of(arg), [tensor], False,
                                     packed_buffer=suffix != "pts"))
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


@dataclass
class _Layer:
    """A matched linear the pass rewrites: its match, its decision and the scheme it runs."""

    match: Linear
    decision: LayerDecision

    @property
    def scheme(self) -> str:
        return self.decision.scheme

    @property
    def dynamic_scale(self) -> bool:
        """Whether its activation is quantized with a dynamic per-tensor scale (``nvfp4`` without a static one)."""
        m = self.match
        return self.scheme == "nvfp4" and not (m.prepacked and m.node.args[5] is not None)

    def group_key(self):
        """Layers with equal keys may share one GEMM launch: same activation and scheme, same K, a bias on all or
        none (graph inputs, defined before any layer), and for ``nvfp4`` the same (dynamic) activation scale."""
        m = self.match
        if m.bias is not None and m.bias.op != "placeholder":
            return None
        if self.scheme == "nvfp4" and not self.dynamic_scale:  # its own static scale
            return None
        return (m.x, self.scheme, self.decision.shape[1], m.bias is None)


def _groups(layers: list[_Layer], group: bool) -> list[list[_Layer]]:
    """Layers in launch groups, in graph order: each group is up to ``MAX_GROUP`` layers of one key, where every
    layer but the last has a multiple of ``GROUP_ALIGN`` outputs (the kernels' tiles never straddle two)."""
    groups, open_groups = [], {}
    for layer in layers:
        key = layer.group_key() if group else None
        current = open_groups.get(key) if key is not None else None
        if current is None:
            current = []
            groups.append(current)
        current.append(layer)
        full = len(current) == MAX_GROUP or layer.decision.shape[0] % GROUP_ALIGN
        if key is not None:
            open_groups[key] = None if full else current
    return groups


def _group_name(layers: list[_Layer]) -> str:
    """``model.layers.0.self_attn.q_proj`` and ``...k_proj`` -> ``model_layers_0_self_attn_q_proj_k_proj``."""
    names = [layer.match.name.split(".") for layer in layers]
    common = 0
    while all(len(n) > common + 1 and n[common] == names[0][common] for n in names):
        common += 1
    return _safe(".".join(names[0][:common] + [".".join(n[common:]) for n in names]))


def rewrite_linears(
    gm: fx.GraphModule, *, scheme: str = "nvfp4", skip=("lm_head",), fake_mode=None, cache: WeightCache = WEIGHT_CACHE,
    group: bool = True,
) -> tuple[RewriteReport, list[Embedded]]:
    """Rewrite every quantizable linear of ``gm`` in place; return the report and the embedded constants.

    ``scheme`` applies to float weights; an NVFP4Linear keeps the scheme it was calibrated for. ``skip`` holds
    glob patterns matched against layer names (``lm_head``, ``*.attn.*``): those layers stay in high precision.
    With ``group``, linears that read the same activation (q/k/v, gate/up) become one GEMM op over their weights,
    which the kernels run as one launch.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; expected one of {SCHEMES}")
    report, embedded, emit = RewriteReport(), [], _Emitter(gm, fake_mode)
    layers = []
    for m in find_linears(gm):
        weight = stored_tensor(m.weight)
        shape = None if weight is None else tuple(weight.t().shape if m.weight_kn else weight.shape)
        if m.prepacked:
            layer_scheme = m.node.args[6]
            shape = (shape[0], shape[1] * 2) if shape else None
        else:
            layer_scheme = scheme
        reason = m.skip_reason or (f"matches skip pattern in {tuple(skip)}" if matches_skip(m.name, skip) else None)
        if reason is None and m.prepacked and any(stored_tensor(a) is None for a in m.node.args[1:4]):
            reason = "packed weight is computed at run time, not a buffer"
        decision = LayerDecision(m.name, _op_name(m.node), shape, layer_scheme, reason)
        report.layers.append(decision)
        if reason is None:
            layers.append(_Layer(m, decision))

    replaced: dict[fx.Node, fx.Node] = {}  # rewritten linear -> its output, for a layer that reads it directly
    groups = _groups(layers, group)
    readers = Counter(members[0].match.x for members in groups if members[0].dynamic_scale)
    emit.shared_scales = {x: None for x, count in readers.items() if count > 1}
    for members in groups:
        if len(members) > 1:
            for layer in members:
                layer.decision.group = tuple(member.match.name for member in members)
        _rewrite_group(gm, emit, members, replaced, cache, embedded)
    gm.graph.lint()
    gm.recompile()
    return report, embedded


def _host_alphas(gm: fx.GraphModule, w_pts: list[fx.Node], act_pts: fx.Node | None = None) -> list[float]:
    """The GEMM's alpha per weight as a host float (its ``alphas``): the weight's per-tensor scale, times the static
    activation scale if there is one, multiplied in fp32 as the epilogue does. Reads the get_attr constants."""
    weights = [getattr(gm, node.target).float() for node in w_pts]
    if act_pts is not None:
        weights = [w * getattr(gm, act_pts.target).float() for w in weights]
    return [float(w) for w in weights]


def _alphas_of(gm: fx.GraphModule, gemm: fx.Node) -> list[float]:
    if gemm.target is torch.ops.fp4.gemm_a16.default:
        return _host_alphas(gm, gemm.args[3])
    return _host_alphas(gm, gemm.args[4], gemm.args[1])


def refresh_host_alphas(gm: fx.GraphModule) -> bool:
    """Set every GEMM's ``alphas`` to its constants' current values (after ``Embedded.refresh`` rewrote them);
    True when one changed, so that the graph must be compiled again."""
    changed = False
    for target, index in ((torch.ops.fp4.gemm_a16.default, 5), (torch.ops.fp4.gemm.default, 6)):
        for node in gm.graph.find_nodes(op="call_function", target=target):
            if len(node.args) > index and node.args[index] is not None:
                alphas = _alphas_of(gm, node)
                if list(node.args[index]) != alphas:
                    node.update_arg(index, alphas)
                    changed = True
    if changed:
        gm.recompile()
    return changed


def _shared_dynamic_scale(g: fx.Graph, emit: _Emitter, m: Linear, x: fx.Node) -> fx.Node | None:
    """The dynamic per-tensor scale of ``m``'s activation as a node of its own, computed once, where more than one GEMM
    op quantizes that activation (``group=False``, or a group split by ``MAX_GROUP`` or ``GROUP_ALIGN``): each op then
    takes it as its ``act_pts`` instead of finding the same amax again. None where one op reads the activation."""
    if m.x not in emit.shared_scales:
        return None
    if emit.shared_scales[m.x] is None:
        name = f"{_safe(m.name)}_act_pts"
        emit.shared_scales[m.x] = g.create_node("call_function", nvfp4.global_scale_of, (x,), name=name)
    return emit.shared_scales[m.x]


def _rewrite_group(gm, emit: _Emitter, members: list[_Layer], replaced, cache, embedded) -> None:
    """One GEMM op for ``members`` (linears over one activation), inserted before the first of them; each
    member's uses then read its output of the op."""
    g, first = gm.graph, members[0].match
    x = replaced.get(first.x, first.x)
    prefix = _group_name(members)
    with g.inserting_before(first.node):
        weights = [_weight_constants(emit, layer.match, cache, embedded) for layer in members]
        w_packed, w_scales, w_pts = (list(part) for part in zip(*weights))
        biases = [layer.match.bias for layer in members]
        if members[0].scheme == "nvfp4a16":
            args = (x, w_packed, w_scales, w_pts, biases, _host_alphas(gm, w_pts))
            gemm = g.create_node("call_function", torch.ops.fp4.gemm_a16.default, args, name=f"{prefix}_gemm")
        else:
            act_pts = _static_act_scale(emit, first, embedded)
            if act_pts is None:
                act_pts = _shared_dynamic_scale(g, emit, first, x)
            args = (x, act_pts, w_packed, w_scales, w_pts, biases)
            if act_pts is not None and act_pts.op == "get_attr":  # alpha is known: the product of static scales
                args += (_host_alphas(gm, w_pts, act_pts),)
            gemm = g.create_node("call_function", torch.ops.fp4.gemm.default, args, name=f"{prefix}_gemm")
        outs = [g.create_node("call_function", operator.getitem, (gemm, i), name=f"{_safe(layer.match.name)}_out")
                for i, layer in enumerate(members)]
    gemm.meta.update({k: v for k, v in first.node.meta.items() if k in ("stack_trace", "nn_module_stack")})
    for layer, out in zip(members, outs):
        node = layer.match.node
        node.replace_all_uses_with(out)
        replaced[node] = out
        rhs = node.args[2] if node.target in ADDMM_TARGETS else node.args[1]
        g.erase_node(node)
        if rhs is not layer.match.weight and isinstance(rhs, fx.Node) and not rhs.users:  # the transpose only it used
            g.erase_node(rhs)
