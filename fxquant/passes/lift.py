"""lift: graph inputs that always receive the same tensor become get_attr constants.

Inside a torch.compile backend, Dynamo hands a module's parameters and buffers to the graph as
inputs (placeholders whose source is ``L['self']._modules['fc']._parameters['weight']``), and
the example inputs are the real tensors. The other passes read weights as get_attr constants.

Before (Dynamo)                              After
    def forward(self, L_x_, L_self_..._weight_):    def forward(self, L_x_):
                                                      fc_weight = self.fc.weight
        y = linear(L_x_, L_self_..._weight_)          y = linear(L_x_, fc_weight)

Exact as long as the placeholder would have received this very tensor: the backend only lifts
parameters, buffers and other tensors that are not arguments of the call, and bakes them in
(quantization replaces the weights by constants anyway).
"""

from __future__ import annotations

import re

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .common import add_constant, finish

# One step of a Dynamo source name: ._modules['a'] / ._parameters['w'] / ._buffers['b'], .attr, ['key'] or [0]
_STEP = re.compile(r"\._(?:modules|parameters|buffers)\[(['\"])(.+?)\1\]|\.([A-Za-z_]\w*)|\[(['\"]?)(.+?)\4\]")


def target_from_source(name: str) -> str:
    """A dotted, readable constant name from a Dynamo source path.

    ``._modules['model']._modules['layers']._modules['0']._parameters['weight']`` ->
    ``model.layers.0.weight``: the module's own parameter name, so that QuantConfig's
    include/exclude/overrides match the same names as with quantize_graph.
    """
    atoms = []
    for match in _STEP.finditer(name):
        atom = match.group(2) or match.group(3) or match.group(5)
        atoms.append(re.sub(r"\W", "_", atom))
    return ".".join(atoms) or "constant"


class LiftConstants(PassBase):
    """Replace the named placeholders by get_attr nodes of registered buffers.

    ``constants`` maps a placeholder's name to (wanted dotted target, tensor). A target that is
    taken by something else gets a ``_`` suffix on the clashing atom (common.add_constant).
    """

    def __init__(self, constants: dict[str, tuple[str, torch.Tensor]]) -> None:
        self.constants = constants

    def call(self, gm: fx.GraphModule) -> PassResult:
        lifted = [n for n in gm.graph.nodes if n.op == "placeholder" and n.name in self.constants]
        if not lifted:
            return PassResult(gm, False)
        # constants go to the top of the graph, before the placeholders, where torch.export and
        # the other passes (common.get_constant) put theirs: defined before any use
        anchor = next(iter(gm.graph.nodes))
        for node in lifted:
            wanted, value = self.constants[node.name]
            with gm.graph.inserting_before(anchor):
                # detach: a graph constant, never a trainable parameter; shares storage with the model
                attr = gm.graph.get_attr(add_constant(gm, wanted.split("."), value.detach()))
            # keep what later consumers read (fake values, shapes); drop Dynamo's input bookkeeping
            attr.meta = {k: v for k, v in node.meta.items() if k in ("example_value", "val", "tensor_meta")}
            node.replace_all_uses_with(attr)
        for node in lifted:  # only now: the anchor may be one of them
            gm.graph.erase_node(node)
        finish(gm)
        return PassResult(gm, True)
