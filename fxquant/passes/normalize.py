"""normalize: every linear becomes ``aten.linear(x, get_attr weight, bias)``.

Before (symbolic_trace)              After
    y = self.fc(x)                       w = self.fc.weight; b = self.fc.bias
                                         y = aten.linear(x, w, b)
Before (hand-written / Dynamo)
    y = torch.nn.functional.linear(x, self.w)   ->   y = aten.linear(x, self.w)

Exact: the three forms compute the same function. Linears whose weight is not a constant
(computed at run time) keep their form and are reported by the plan as not quantizable.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .. import torch_private
from .common import LINEAR, fetch_attr, finish

_FUNCTIONAL = (F.linear, torch_private.C_LINEAR)


class Normalize(PassBase):
    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for node in list(gm.graph.nodes):
            if node.op == "call_module" and isinstance(fetch_attr(gm, node.target), nn.Linear):
                _module_to_linear(gm, node)
                modified = True
            elif node.op == "call_function" and node.target in _FUNCTIONAL:
                args = list(node.args) + [None] * (3 - len(node.args))
                x, weight, bias = args[0], node.kwargs.get("weight", args[1]), node.kwargs.get("bias", args[2])
                node.target, node.args, node.kwargs = LINEAR, (x, weight, bias), {}
                modified = True
        if modified:
            gm.delete_all_unused_submodules()
            finish(gm)
        return PassResult(gm, modified)


def _module_to_linear(gm: fx.GraphModule, node: fx.Node) -> None:
    module = fetch_attr(gm, node.target)
    with gm.graph.inserting_before(node):
        weight = gm.graph.get_attr(f"{node.target}.weight")
        bias = gm.graph.get_attr(f"{node.target}.bias") if module.bias is not None else None
        linear = gm.graph.call_function(LINEAR, (node.args[0], weight, bias))
    linear.meta = dict(node.meta)
    node.replace_all_uses_with(linear)
    gm.graph.erase_node(node)
