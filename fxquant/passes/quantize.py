"""rewrite, part 2: quantize/dequantize nodes on each group input, quantized weight constants.

Activations (once per group input, after its transform):
    h_t = block_rotate(h_p, R2)              h_t = block_rotate(h_p, R2)
    q = linear(h_t, W_t)              ->     h_q = fake_quant_static(h_t, act_scale, 127)   (or per token)
                                             q = linear(h_q, W_t)
Weights: "fake" replaces the transformed float weight by its dequantized values (a constant on
the integer grid); "packed" stores integer codes (two int4 codes per byte) and scales and
dequantizes them in the graph, so the module holds 4-bit weights.
"""

from __future__ import annotations

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .. import ops
from ..plan import QuantPlan
from ..quant import QuantizedWeight, dequantize_weight, pack_int4
from .common import META, finish, get_constant, is_linear, set_constant, tag


def _group_linears(gm: fx.GraphModule, group: str, flag: str) -> dict[fx.Node, list[fx.Node]]:
    """Transformed linears of ``group`` not yet carrying ``flag``, keyed by the node they read."""
    by_input: dict[fx.Node, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        info = node.meta.get(META, {})
        if is_linear(node) and info.get("group") == group and not info.get(flag):
            by_input.setdefault(node.args[0], []).append(node)
    return by_input


class QuantizeActivations(PassBase):
    def __init__(self, plan: QuantPlan, scales: dict[str, torch.Tensor | None]) -> None:
        self.plan, self.scales = plan, scales

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for group in self.plan.groups.values():
            c = group.config
            if not c.a_quantized:
                continue
            pending = _group_linears(gm, group.name, "a_bits")
            if not pending:
                continue  # already quantized: a second run changes nothing
            qmax = 2 ** (c.a_bits - 1) - 1
            scale = None
            if c.a_granularity != "token":
                scale = get_constant(gm, set_constant(gm, group.name, "act_scale", self.scales[group.name],
                                                      dtype=group.dtype))
            if scale is not None:
                fn, args = ops.fake_quant_static, (scale, qmax)
            elif c.a_zero_point:
                fn, args = ops.fake_quant_per_token_asym, (2**c.a_bits - 1, c.a_clip)
            else:
                fn, args = ops.fake_quant_per_token, (qmax, c.a_clip)
            for x_t, linears in pending.items():
                with gm.graph.inserting_after(x_t):
                    q = gm.graph.create_node("call_function", fn, (x_t, *args), name=f"{x_t.name}_q")
                tag(q, group=group.name, role="quantize", bits=c.a_bits, granularity=c.a_granularity, stats=group.stats)
                for linear in linears:
                    linear.replace_input_with(x_t, q)
                    linear.meta[META]["a_bits"] = c.a_bits
                modified = True
        if modified:
            finish(gm)
        return PassResult(gm, modified)


class QuantizeWeights(PassBase):
    def __init__(self, plan: QuantPlan, weights: dict[str, QuantizedWeight], weight_format: str) -> None:
        self.plan, self.weights, self.weight_format = plan, weights, weight_format

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for name, qw in self.weights.items():
            dtype = self.plan.sites[name].dtype
            linears = [n for nodes in _group_linears(gm, self.plan.sites[name].group, "w_bits").values()
                       for n in nodes if n.meta[META]["site"] == name]
            if not linears:
                continue
            if self.weight_format == "fake":
                weight = get_constant(gm, set_constant(gm, name, "weight", dequantize_weight(qw), dtype=dtype))
            else:
                weight = _packed_weight(gm, name, qw, dtype, before=linears[0])
            for linear in linears:
                linear.args = (linear.args[0], weight, *linear.args[2:])
                linear.meta[META]["w_bits"] = qw.bits
            modified = True
        if modified:
            finish(gm)
        return PassResult(gm, modified)


def _packed_weight(gm: fx.GraphModule, name: str, qw: QuantizedWeight, dtype: torch.dtype,
                   before: fx.Node) -> fx.Node:
    signed = qw.zero is None
    packed = qw.bits <= 4 and qw.codes.shape[1] % 2 == 0
    codes = get_constant(gm, set_constant(gm, name, "w_packed" if packed else "w_codes",
                                          pack_int4(qw.codes) if packed else qw.codes))
    # dequantize_weight returns the scale's dtype: the model's, so the linear sees one dtype
    scale = get_constant(gm, set_constant(gm, name, "w_scale", qw.scale, dtype=dtype))
    zero = None if signed else get_constant(gm, set_constant(gm, name, "w_zero", qw.zero, dtype=dtype))
    with gm.graph.inserting_before(before):
        if packed:
            codes = gm.graph.create_node("call_function", ops.unpack_int4, (codes, signed), name=f"{name}_codes")
            tag(codes, site=name, role="unpack", bits=qw.bits)
        weight = gm.graph.create_node("call_function", ops.dequantize_weight,
                                      (codes, scale, zero, qw.group_size), name=f"{name}_w")
    tag(weight, site=name, role="dequantize", bits=qw.bits, group_size=qw.group_size)
    return weight
