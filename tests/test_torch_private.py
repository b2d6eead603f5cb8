"""Each private torch API fxquant relies on (fxquant/torch_private.py) still does what fxquant needs."""

import pytest
import torch
import torch.nn.functional as F
from torch import fx

from fxquant import torch_private


def test_frame_inputs_and_sizes_as_a_backend_sees_them():
    seen = {}

    def backend(gm, example_inputs):
        seen["frame"] = torch_private.compiling_frame()
        seen["after_break"] = torch_private.inside_compiled_frame()
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        seen["sources"] = [torch_private.input_source(n) for n in placeholders]
        seen["fakes"] = [torch_private.fake_value(n) for n in placeholders]
        seen["hints"] = [torch_private.size_hint(v) for v in example_inputs if isinstance(v, torch.SymInt)]
        return gm.forward

    def f(x):
        return x * 2

    torch._dynamo.reset()
    torch.compile(f, backend=backend, dynamic=True)(torch.ones(5, 3))
    assert seen["frame"] is not None and seen["frame"].f_code.co_name == "f"
    assert seen["after_break"] is False
    assert "L['x']" in seen["sources"]
    assert any(isinstance(v, torch.Tensor) and v.dim() == 2 for v in seen["fakes"])
    assert seen["hints"] and set(seen["hints"]) <= {3, 5}, "dynamic=True passes the real sizes as SymInts"
    assert torch_private.compiling_frame() is None  # outside torch.compile


def test_fresh_tracing_context_and_backend_registry():
    with torch_private.fresh_tracing_context():
        pass
    assert callable(torch_private.backend("eager"))
    torch_private.register_backend_once(lambda gm, inputs: gm.forward, "fxquant")  # already there: no error
    assert callable(torch_private.backend("fxquant"))


def test_graph_and_pytree_helpers():
    gm = torch.export.export(torch.nn.Linear(4, 2), (torch.ones(2, 4),)).module()
    graph = fx.Graph()
    torch_private.copy_codegen(graph, gm.graph)
    assert graph._codegen is gm.graph._codegen
    _, spec = torch.utils._pytree.tree_flatten(((1, 2), {"a": 3}))
    assert len(torch_private.pytree_children(spec)) == 2
    assert torch_private.tree_leaves({"a": [1, (2, 3)]}) == [1, 2, 3]
    assert torch_private.tree_map(lambda v: v + 1, [1, (2,)]) == [2, (3,)]
    assert torch_private.op_mutates(torch.ops.aten.add_.Tensor) is True
    assert torch_private.op_mutates(torch.ops.aten.add.Tensor) is False
    assert torch_private.op_mutates(torch.add) is None
    assert torch_private.C_LINEAR(torch.ones(1, 4), torch.ones(2, 4)).tolist() == F.linear(
        torch.ones(1, 4), torch.ones(2, 4)).tolist()


def test_coloured_drawer():
    pytest.importorskip("pydot")
    gm = fx.symbolic_trace(torch.nn.Linear(4, 2))
    dot = torch_private.drawer_with_colours(gm, "g", lambda n: "orange" if n.op == "call_module" else None)
    assert "orange" in dot.get_dot_graph().to_string()


def test_mark_unbacked_makes_batch_one_share_the_graph():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    f = torch.compile(lambda x, y: x @ y.T + y.sum(), backend=counter, fullgraph=True, dynamic=True)
    x, y = torch.randn(2, 4), torch.randn(3, 4)
    torch_private.mark_unbacked(x, 0, shape_id="rows")
    f(x, y)
    f(torch.randn(1, 4), y)
    assert counter.frame_count == 1
