"""Graph plumbing shared by the passes: the canonical linear form, constants, the meta key."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn

from .. import torch_private

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


def set_constant(gm: fx.GraphModule, owner: str, name: str, value: torch.Tensor,
                 dtype: torch.dtype | None = None) -> str:
    """Register a copy of ``value`` as constant ``name`` of ``owner`` (a layer or group name) and
    return its get_attr target, ``fxquant.<owner made attribute-safe>.<name>`` unless taken.

    Every constant the passes add goes through here and add_constant, so two layers whose names
    read the same once made safe (``a.b_c`` and ``a_b.c``) get two containers and nothing is
    overwritten. The buffer goes on the device of the module's other tensors; a float value is
    cast to ``dtype`` when given (the model's dtype; rotations stay float32, see ops.block_rotate).
    """
    like = next(iter(gm.state_dict().values()), None)
    value = value.to(device=like.device if like is not None else None)
    if dtype is not None and value.is_floating_point():
        value = value.to(dtype)
    return add_constant(gm, [ROOT, owner, name], value.detach().clone().contiguous())


def add_constant(module: nn.Module, path: list[str], value: torch.Tensor) -> str:
    """Register ``value`` as a buffer at ``path`` under ``module``, making containers as needed,
    and return the dotted target: the one place fxquant adds a tensor to a module.

    Each atom is made attribute-safe (``a.b-c`` -> ``a_b_c``). A container made here for the same
    atom is reused; any other name already taken (a layer of the model, an nn.Module attribute, a
    container made for an atom that reads the same once safe, an earlier constant) gets ``_``
    appended until free, so nothing is ever overwritten.
    """
    names = []
    for atom in path[:-1]:
        name = _free_name(module, atom, reuse=lambda obj, atom=atom: getattr(obj, _MADE_FOR, None) == atom)
        if not hasattr(module, name):
            container = nn.Module()
            setattr(container, _MADE_FOR, atom)
            module.add_module(name, container)
        module = getattr(module, name)
        names.append(name)
    leaf = _free_name(module, path[-1])
    module.register_buffer(leaf, value)
    return ".".join(names + [leaf])


_MADE_FOR = "_fxquant_atom"  # on containers add_constant made: the atom it made them for


def _free_name(module: nn.Module, atom: str, reuse: Callable[[Any], bool] = lambda obj: False) -> str:
    name = re.sub(r"\W", "_", atom)
    while hasattr(module, name) and not reuse(getattr(module, name)):
        name += "_"
    return name


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
    # the layer or group the constant belongs to, from the container set_constant made for it
    owner = getattr(fetch_attr(gm, target.rpartition(".")[0]) if "." in target else gm, _MADE_FOR, None)
    node.meta[META] = {"role": "constant", "target": target, **({"owner": owner} if owner else {})}
    return node


def copy_graph_module(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict[fx.Node, fx.Node]]:
    """A GraphModule with a copy of gm's graph (same calling convention) sharing gm's tensors;
    also returns the map from gm's nodes to the copy's."""
    mapping: dict[fx.Node, fx.Node] = {}
    graph = fx.Graph()
    torch_private.copy_codegen(graph, gm.graph)
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
