"""Find the linear layers in a Dynamo graph: the matmuls whose weight is a parameter, buffer or constant.

Forms matched (``W`` a stored weight, ``t(W)`` any 2-D transpose of it: ``.t()``, ``.T``, ``transpose``, ``permute``):

    linear(x, W, b)                     nn.Linear, F.linear           W: [N, K]
    mm(x, t(W)) / matmul(x, t(W)) / x @ t(W)                          W: [N, K]
    addmm(b, x, t(W))                                                 W: [N, K]
    mm(x, W) / matmul(x, W) / x @ W / addmm(b, x, W)   GPT-2 Conv1D   W: [K, N]
    fp4::linear(x, packed, scales, pts, b, act_pts, scheme)   an NVFP4Linear (weights already NVFP4)

``find_linears`` returns one ``Linear`` per match, with ``skip_reason`` set when the layer cannot be quantized.
"""

import operator
import re
from dataclasses import dataclass

import torch
from torch import fx

from fp4compile import format as nvfp4

LINEAR_TARGETS = (torch._C._nn.linear, torch.nn.functional.linear)
MATMUL_TARGETS = (torch.mm, torch.matmul, operator.matmul, torch.Tensor.mm, torch.Tensor.matmul)
MATMUL_METHODS = ("mm", "matmul", "__matmul__")
ADDMM_TARGETS = (torch.addmm, torch.Tensor.addmm)
PACKED_LINEAR = (torch.ops.fp4.linear, torch.ops.fp4.linear.default)  # Dynamo records the packet


@dataclass
class Linear:
    """One matched layer. ``weight`` is the node holding the stored weight (a placeholder or get_attr)."""

    node: fx.Node
    x: fx.Node
    weight: fx.Node
    bias: fx.Node | None
    weight_kn: bool  # the weight is stored [K, N] (x @ W) rather than [N, K]
    name: str
    skip_reason: str | None = None

    @property
    def prepacked(self) -> bool:
        return self.node.target in PACKED_LINEAR


def _val(node) -> torch.Tensor | None:
    if not isinstance(node, fx.Node):
        return None
    return node.meta.get("val", node.meta.get("example_value"))


def stored_tensor(node: fx.Node) -> torch.Tensor | None:
    """The real tensor behind a parameter / buffer placeholder or a get_attr constant; None for computed values."""
    if node.op == "get_attr":
        return getattr(node.graph.owning_module, node.target)
    grapharg = node.meta.get("grapharg") if node.op == "placeholder" else None
    if grapharg is None:
        return None
    example = grapharg.example
    if isinstance(example, torch.nn.Parameter) or "_buffers[" in grapharg.source.name:
        return example
    return None


def source_name(node: fx.Node) -> str:
    """A dotted module path for a parameter placeholder: ``L['self']._modules['fc']._parameters['weight']``
    becomes ``fc.weight``."""
    if node.op == "get_attr":
        return str(node.target)
    grapharg = node.meta.get("grapharg")
    text = grapharg.source.name if grapharg is not None else node.name
    parts = re.findall(r"\.(\w+)|\['([^']+)'\]", text)
    names = [a or b for a, b in parts]
    return ".".join(n for n in names[1:] if n not in ("_modules", "_parameters", "_buffers")) or node.name


def _transposed_source(node) -> fx.Node | None:
    """If ``node`` is a 2-D transpose of another node, that node."""
    if not isinstance(node, fx.Node) or node.op not in ("call_method", "call_function"):
        return None
    target, args = node.target, node.args
    if target in ("t", torch.t) or (target is getattr and args[1:] == ("T",)):
        return args[0]
    if target in ("transpose", torch.transpose) and sorted(a % 2 for a in args[1:3]) == [0, 1]:
        return args[0]
    if target in ("permute", torch.permute):
        dims = args[1] if len(args) == 2 else args[1:]
        return args[0] if tuple(dims) == (1, 0) else None
    return None


def _operands(node: fx.Node):
    """(x, rhs, bias) of a linear-shaped call, or None when ``node`` is not one."""
    t, a, kw = node.target, node.args, node.kwargs
    if node.op == "call_function" and t in LINEAR_TARGETS:
        return a[0], ("weight", a[1]), a[2] if len(a) > 2 else kw.get("bias")
    if (node.op == "call_function" and t in MATMUL_TARGETS) or (node.op == "call_method" and t in MATMUL_METHODS):
        return a[0], ("rhs", a[1]), None
    if node.op == "call_function" and t in ADDMM_TARGETS:
        scaled = kw.get("beta", 1) != 1 or kw.get("alpha", 1) != 1
        return a[1], ("scaled_addmm" if scaled else "rhs", a[2]), a[0]
    return None


EMBEDDING_TARGETS = (torch.nn.functional.embedding, torch.embedding, torch.ops.aten.embedding.default)


def _reads_as_embedding(weight_node: fx.Node) -> bool:
    return any(u.op == "call_function" and u.target in EMBEDDING_TARGETS and u.args[1] is weight_node
               for u in weight_node.users)


def _skip_reason(x, weight_node: fx.Node, weight: torch.Tensor, weight_kn: bool) -> str | None:
    if _reads_as_embedding(weight_node):
        return "weight is shared with an embedding (a tied lm_head): kept in high precision"
    xv = _val(x)
    if weight.dim() != 2:
        return f"weight is {weight.dim()}-D, not 2-D"
    k = weight.shape[0] if weight_kn else weight.shape[1]
    if k % nvfp4.BLOCK_SIZE:
        return f"K={k} is not a multiple of {nvfp4.BLOCK_SIZE}"
    if weight.dtype not in nvfp4.SUPPORTED_DTYPES:
        return f"weight dtype {weight.dtype} is not float32, bfloat16 or float16"
    if xv is None or xv.dim() < 2:
        return "activation is not a tensor of 2 or more dimensions"
    if xv.dtype != weight.dtype:
        return f"activation dtype {xv.dtype} differs from weight dtype {weight.dtype}"
    if weight.device != xv.device:
        return f"weight on {weight.device}, activation on {xv.device}"
    return None


def _match(node: fx.Node) -> Linear | None:
    if node.op == "call_function" and node.target in PACKED_LINEAR:
        x, packed, _, _, bias = node.args[:5]
        return Linear(node, x, packed, bias, False, source_name(packed).removesuffix(".weight_packed"))
    operands = _operands(node)
    if operands is None:
        return None
    x, (kind, rhs), bias = operands
    if kind == "weight":
        weight_node, weight_kn = rhs, False
    else:
        source = _transposed_source(rhs)
        weight_node, weight_kn = (source, False) if source is not None else (rhs, True)
    if not isinstance(weight_node, fx.Node):
        return None
    weight = stored_tensor(weight_node)
    name = source_name(weight_node).removesuffix(".weight") if weight is not None else node.name
    if weight is None:
        reason = "weight is computed at run time, not a parameter"
    elif kind == "scaled_addmm":
        reason = "addmm with alpha or beta other than 1"
    else:
        reason = _skip_reason(x, weight_node, weight, weight_kn)
    return Linear(node, x, weight_node, bias, weight_kn, name, reason)


def find_linears(gm: fx.GraphModule) -> list[Linear]:
    """Every linear-shaped call in ``gm`` whose weight operand is 2-D (stored or computed), in graph order."""
    found = []
    for node in gm.graph.nodes:
        match = _match(node)
        if match is None:
            continue
        rhs = _val(match.weight) if match.weight.op != "get_attr" else stored_tensor(match.weight)
        if match.prepacked or (rhs is not None and rhs.dim() == 2):
            found.append(match)
    return found
