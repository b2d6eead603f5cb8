"""Every private torch / Dynamo API fxquant relies on, one function each.

Each docstring says what fxquant needs and why no public API gives it. They are checked against
the torch that pyproject requires (``torch>=2.13``, the version the test suite runs on): a torch
release that moves one of them breaks here, in one place, and ``tests/test_package.py`` calls each.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import fx


def compiling_frame() -> Any | None:
    """Dynamo's InstructionTranslator for the frame being compiled (None outside torch.compile).

    The backend maps calibration batches onto graph inputs through the compiled frame's locals
    (``L['self']``, ``L['x']``). A backend receives only the graph and example inputs; the frame
    is reachable only through this translator."""
    from torch._dynamo.symbolic_convert import InstructionTranslator

    try:
        return InstructionTranslator.current_tx()
    except AttributeError:
        return None


def inside_compiled_frame() -> bool:
    """Whether code Dynamo generated runs further up the stack (its functions are named
    ``__compiled_fn...``): the frame being compiled then follows a graph break, and reads values
    eager code computed, which a calibration loader cannot reach. No API reports this."""
    frame = sys._getframe(1)
    while frame is not None:
        if any(name.startswith("__compiled_fn") for name in frame.f_code.co_names):
            return True
        frame = frame.f_back
    return False


def input_source(node: fx.Node) -> str | None:
    """Dynamo's source name of a graph input (``L['self']._modules['fc']._parameters['weight']``),
    from ``node.meta["grapharg"]``: it tells parameters from call arguments; the graph a backend
    receives records it nowhere else."""
    grapharg = node.meta.get("grapharg")
    return grapharg.source.name if grapharg is not None and grapharg.source is not None else None


def fake_value(node: fx.Node, default: Any = None) -> Any:
    """The fake tensor Dynamo traced a node with (``meta["example_value"]``; export uses "val"):
    its sizes say which dims Dynamo made symbolic."""
    return node.meta.get("example_value", default)


def size_hint(value: torch.SymInt | torch.SymFloat) -> int | float:
    """The concrete value behind a symbolic size (``SymInt.node.hint``): calibration runs the
    graph with real tensors, whose sizes Dynamo passes as symbols."""
    return value.node.hint


@contextmanager
def fresh_tracing_context() -> Iterator[None]:
    """A tracing context of its own (``torch._guards.tracing(None)``), so that tracing a graph
    inside a backend leaves no shape guards in Dynamo's context (without it Dynamo fails with
    "Guard failed on the same frame it was created")."""
    from torch._guards import tracing

    with tracing(None):
        yield


def compile_with_inductor(gm: fx.GraphModule, inputs: list[Any], mode: str | None) -> Callable[..., Any]:
    """Inductor on an FX graph inside a backend, with ``mode``'s options: the public entry is
    torch.compile, which would trace the graph with Dynamo again."""
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, inputs, config_patches=list_mode_options(mode) if mode else None)


def backend(name: str) -> Callable[..., Any]:
    """A registered torch.compile backend by name (the registry has no public lookup)."""
    from torch._dynamo.backends.registry import lookup_backend

    return lookup_backend(name)


def register_backend_once(fn: Callable[..., Any], name: str) -> None:
    """Register ``fn`` as torch.compile backend ``name`` unless it is registered already
    (register_backend raises on a duplicate; the entry point registers it on lookup)."""
    from torch._dynamo.backends.registry import list_backends, register_backend

    if name not in list_backends(exclude_tags=()):
        register_backend(fn, name=name)


def copy_codegen(destination: fx.Graph, source: fx.Graph) -> None:
    """Give ``destination`` the calling convention of ``source`` (``Graph._codegen``: the pytree
    in/out specs of an exported graph), so a copy is called like the original."""
    destination._codegen = source._codegen


def pytree_children(spec: Any) -> list[Any]:
    """The child specs of a pytree TreeSpec (``children_specs`` before ``children()`` existed)."""
    return list(spec.children()) if hasattr(spec, "children") else list(spec.children_specs)


def op_mutates(target: Any) -> bool | None:
    """Whether an aten OpOverload writes to an argument (its schema says so); None when ``target``
    is no OpOverload (``torch._ops`` holds the type)."""
    return target._schema.is_mutable if isinstance(target, torch._ops.OpOverload) else None


# torch.utils._pytree: flatten and map nested call arguments (no public pytree module in torch 2.13)
tree_map = torch.utils._pytree.tree_map
tree_leaves = torch.utils._pytree.tree_leaves

# what F.linear resolves to when a graph records the C binding itself (Dynamo graphs do)
C_LINEAR = torch._C._nn.linear


def drawer_with_colours(gm: fx.GraphModule, name: str, colour: Callable[[fx.Node], str | None]) -> Any:
    """torch's FxGraphDrawer whose nodes are filled by ``colour`` (its ``_get_node_style`` hook:
    the drawer has no public styling option). Needs pydot."""
    from torch.fx.passes import graph_drawer

    class Drawer(graph_drawer.FxGraphDrawer):
        def _get_node_style(self, node: fx.Node) -> dict[str, str]:
            fill = colour(node)
            return super()._get_node_style(node) | ({"fillcolor": fill} if fill else {})

    return Drawer(gm, name)


def mark_unbacked(tensor: torch.Tensor, dim: int, shape_id: str) -> None:
    """Dynamo's mark_unbacked, with a shape_id shared by every input of the same batch.

    A dim Dynamo sees with size >= 2 is specialised against 1 (a later size-1 call compiles again);
    an unbacked dim is never assumed 0 or 1. shape_id makes the inputs' batch dims one symbol, so
    the graph's own equalities (noise and observation batch) hold without a data-dependent guard.
    It lives in torch._dynamo.decorators in 2.13 (not exported as torch._dynamo.mark_unbacked)."""
    from torch._dynamo.decorators import mark_unbacked as mark

    mark(tensor, dim, shape_id=shape_id)
