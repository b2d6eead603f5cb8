"""cleanup: drop constants nobody reads, so the module holds only what its forward uses."""

from __future__ import annotations

from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .common import finish


class DropUnusedConstants(PassBase):
    """Erase unread get_attr nodes, then rebuild the module from the graph.

    Rebuilding (``GraphModule(gm, graph)``) copies only the attributes the graph references
    into fresh containers, so the replaced float weights are gone and nothing is deleted from
    modules the user's model may share.
    """

    def call(self, gm: fx.GraphModule) -> PassResult:
        for node in list(gm.graph.nodes):
            if node.op == "get_attr" and not node.users:
                gm.graph.erase_node(node)
        read = {n.target for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}
        stale = [k for k in gm.state_dict() if not any(k == t or k.startswith(f"{t}.") for t in read)]
        if not stale:
            return PassResult(gm, False)
        rebuilt = fx.GraphModule(gm, gm.graph, class_name=type(gm).__name__)
        rebuilt.meta.update(gm.meta)
        finish(rebuilt)
        return PassResult(rebuilt, True)
