"""Graph plumbing shared by the passes: the canonical linear form, constants, the meta key."""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

LINEAR = torch.ops.aten.linear.default
META = "fxquant"  # the one node.meta key fxquant writes
ROOT = "fxquant"  # the submodule that holds every constant fxquant adds


def is_linear(node: fx.Node) -> bool:
    """The canonical linear after normalize: aten.linear(x, get_attr weight, bias=None)."""
    return node.op == "call_function" and node.target is LINEAR and node.args[1].op == "get_attr"


def fetch_attr(gm: fx.GraphModule, target: str) -> Any:
    value: Any = gm
    for atom in target.split("."):
        value = getattr(value, atom)
    return value


def site_key(name: str) -> str:
    """A readable, attribute-safe key for a layer name (dots become underscores)."""
    return name.replace(".", "_")


def set_constant(gm: fx.GraphModule, owner: str, name: str, value: torch.Tensor,
                 dtype: torch.dtype | None = None) -> str:
    """Register ``value`` as buffer ``fxquant.<owner>.<name>`` and return that get_attr target.

    The buffer goes on the device of the module's other tensors; a float value is cast to
    ``dtype`` when given (the model's dtype; rotations stay float32, see ops.block_rotate).
    """
    like = next(iter(gm.state_dict().values()), None)
    value = value.to(device=like.device if like is not None else None)
    if dtype is not None and value.is_floating_point():
        value = value.to(dtype)
    if not hasattr(gm, ROOT):
        gm.add_submodule(ROOT, nn.Module())
    root = getattr(gm, ROOT)
    if not hasattr(root, owner):
        root.add_module(owner, nn.Module())
    getattr(root, owner).register_buffer(name, value.detach().clone().contiguous())
    return f"{ROOT}.{owner}.{name}"


def get_constant(gm: fx.GraphModule, target: str) -> fx.Node:
    """A get_attr node for ``target``, reusing one that already exists in the graph.

    New ones go at the very top of the graph, so they are defined before any use, including
    uses right after a placeholder.
    """
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target == target:
            return node
    with gm.graph.inserting_before(next(iter(gm.graph.nodes))):
        node = gm.graph.get_attr(target)
    node.meta[META] = {"role": "constant", "target": target}
    return node


def copy_graph_module(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict[fx.Node, fx.Node]]:
    """A GraphModule with a copy of gm's graph (same calling convention) sharing gm's tensors;
    also returns the map from gm's nodes to the copy's."""
    mapping: dict[fx.Node, fx.Node] = {}
    graph = fx.Graph()
    graph._codegen = gm.graph._codegen
    output = graph.graph_copy(gm.graph, mapping, return_output_node=True)
    graph.output(output[0] if isinstance(output, tuple) else output)
    copy = fx.GraphModule(gm, graph)
    copy.meta.update(gm.meta)
    return copy, mapping


def tag(node: fx.Node, **info: Any) -> fx.Node:
    node.meta[META] = info
    return node


def finish(gm: fx.GraphModule) -> None:
    gm.graph.lint()
    gm.recompile()
