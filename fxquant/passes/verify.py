"""verify: the invariants every rewritten graph keeps; run after each pass."""

from __future__ import annotations

from torch import fx

from .. import torch_private
from ..calibrate import Observer
from .common import META, fetch_attr

# The tensors a quantization node reads besides its data input must be graph constants.
_DATA_ROLES = ("smooth", "rotate", "permute", "rotate2", "quantize", "unpack", "dequantize")


def check_invariants(gm: fx.GraphModule) -> None:
    gm.graph.lint()
    constants = {name for name, _ in gm.named_parameters()} | {name for name, _ in gm.named_buffers()}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(fetch_attr(gm, node.target), Observer):
            raise RuntimeError(f"observer left in the graph: {node.format_node()}")
        if _mutates_constant(node, constants):
            raise RuntimeError(f"node mutates a parameter or buffer at run time: {node.format_node()}")
        info = node.meta.get(META, {})
        if info.get("role") in _DATA_ROLES:
            for arg in node.all_input_nodes[1:]:
                if arg.op != "get_attr" and info["role"] != "dequantize":
                    raise RuntimeError(f"quantization parameter is not a get_attr constant: {node.format_node()}")


def _mutates_constant(node: fx.Node, constants: set[str]) -> bool:
    targets = [a for a in node.all_input_nodes if a.op == "get_attr" and a.target in constants]
    if not targets:
        return False
    if (mutates := torch_private.op_mutates(node.target)) is not None:
        return mutates
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("__")
    return False
