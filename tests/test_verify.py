"""verify.check_invariants: every graph fxquant returns passes it, and each broken graph fails it."""

import pytest
import torch
from models import mlp, tensor_batches
from torch import fx, nn

from fxquant import QuantConfig, ops, quantize_graph
from fxquant.calibrate import InputStats, observed_copy
from fxquant.passes.common import META
from fxquant.passes.verify import check_invariants


def _graph_module(build) -> fx.GraphModule:
    """A GraphModule holding buffer ``b`` (4 values), whose graph ``build(graph, x, b)`` fills."""
    root = nn.Module()
    root.register_buffer("b", torch.ones(4))
    graph = fx.Graph()
    x = graph.placeholder("x")
    b = graph.get_attr("b")
    graph.output(build(graph, x, b))
    return fx.GraphModule(root, graph)


def test_a_rewritten_graph_passes():
    check_invariants(quantize_graph(mlp(), tensor_batches(1, (8, 64)), QuantConfig(rotation_steps=4, block_size=16)))


def test_an_observer_left_in_the_graph_fails():
    gm = fx.symbolic_trace(mlp())
    first = next(n for n in gm.graph.nodes if n.op == "placeholder")
    with pytest.raises(RuntimeError, match="observer left in the graph"):
        check_invariants(observed_copy(gm, [(first, InputStats("0", 64, 16, 0, gram=None))]))


@pytest.mark.parametrize("mutate", [
    lambda g, x, b: g.call_function(torch.ops.aten.add_.Tensor, (b, x)),  # an in-place aten op
    lambda g, x, b: g.call_method("mul_", (b, x)),  # an in-place Tensor method
])
def test_a_node_that_mutates_a_constant_fails(mutate):
    with pytest.raises(RuntimeError, match="mutates a parameter or buffer at run time"):
        check_invariants(_graph_module(mutate))


def test_reading_a_constant_without_changing_it_passes():
    check_invariants(_graph_module(lambda g, x, b: g.call_function(torch.ops.aten.add.Tensor, (b, x))))


@pytest.mark.parametrize("role", ["smooth", "rotate", "quantize"])
def test_a_quantization_parameter_computed_at_run_time_fails(role):
    def build(g, x, b):
        scale = g.call_function(torch.ops.aten.mul.Tensor, (b, 2.0))  # not a get_attr constant
        node = g.call_function(ops.fake_quant_static, (x, scale, 127))
        node.meta[META] = {"role": role}
        return node

    with pytest.raises(RuntimeError, match="quantization parameter is not a get_attr constant"):
        check_invariants(_graph_module(build))


def test_a_node_used_before_it_is_defined_fails():
    def build(g, x, b):
        first = g.call_function(torch.ops.aten.neg.default, (x,))
        second = g.call_function(torch.ops.aten.add.Tensor, (x, b))
        first.args = (second,)  # first now reads second, which comes after it
        return first

    with pytest.raises(RuntimeError, match="used before it has been defined"):
        check_invariants(_graph_module(build))
