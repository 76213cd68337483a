"""Run Dynamo and the fp4 pass on a model (no Inductor) and keep what the pass wrote, for graph tests."""

from typing import NamedTuple

import torch
from torch import fx
from torch._dynamo.testing import normalize_gm

from fp4compile.passes import RewriteReport, rewrite_linears


class Rewritten(NamedTuple):
    text: str  # the rewritten graph, normalized for expecttest snapshots
    report: RewriteReport
    gm: fx.GraphModule


def rewrite(model, *inputs, **options) -> Rewritten:
    """The first graph Dynamo captures from ``model(*inputs)``, rewritten by the fp4 pass with ``options``."""
    found = []

    def capture(gm, example_inputs):
        report, _ = rewrite_linears(gm, fake_mode=torch._guards.detect_fake_mode(example_inputs), **options)
        found.append(Rewritten(normalize_gm(gm.print_readable(print_output=False)), report, gm))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=capture, fullgraph=True)(*inputs)
    return found[0]
