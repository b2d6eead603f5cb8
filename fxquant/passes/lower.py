"""lower: fake-quantized linears become integer GEMMs on int8 codes (QuantConfig.execution="int").

Before (fake: float ops on the integer grid)        After (integer)
    h_q = fake_quant_static(h_t, act_scale, 127)        h_c = quantize_static_int8(h_t, act_scale, 127)
    q = linear(h_q, W_t)                                q = int8_linear(h_c, w_int8, act_scale * w_scale, bias)

Per-token activations return (codes, scale[, zero]) from one quantizer node, read through getitem
nodes. Exact: the codes are those the fake quantizer rounds to (same expressions), the GEMM sums
code products in int32 without rounding, and the scales multiply once at the end; only that float32
rescale differs from the fake graph, which multiplies before summing. Linears whose weight stays in
float (w_bits=16 in an override) keep the fake activation quantizer: nothing goes to float silently,
each site's kernel is in the plan.
"""

from __future__ import annotations

import operator

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .. import ops
from ..plan import QuantPlan
from ..quant import QuantizedWeight, pack_int4
from .common import META, fetch_attr, finish, get_constant, is_linear, set_constant, tag

# fake quantizer -> (integer quantizer, how many outputs it returns)
_INTEGER_QUANTIZER = {ops.fake_quant_static: (ops.quantize_static_int8, 1),
                      ops.fake_quant_per_token: (ops.quantize_per_token_int8, 2),
                      ops.fake_quant_per_token_asym: (ops.quantize_per_token_asym_int8, 3)}


def int_weight(qw: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The GEMM's int8 weight codes (out, in) and zero points (groups, out) or None.

    Asymmetric codes 0..2**bits-1 are shifted by 2**(bits-1) so that 8-bit ones fit int8; their
    zero points move the same way, so (code - zero) is unchanged."""
    if qw.zero is None:
        return qw.codes.to(torch.int8), None
    offset = 2 ** (qw.bits - 1)
    return (qw.codes.to(torch.int16) - offset).to(torch.int8), (qw.zero - offset).t().float()


def choose_kernel(qw: QuantizedWeight) -> str:
    """torch._int_mm where it is fast (CUDA, AVX512 CPUs) or where only it is exact (8-bit weights);
    on other x86 CPUs fbgemm's u8 x s8 GEMM, exact for weights of at most 7 bits. fbgemm packs its
    own copy of the codes once, so the graph keeps 4-bit ones two per byte ("x86_int4")."""
    device = qw.codes.device
    if ops.fast_int8_gemm(device) or not ops.x86_int8_kernel(device) or qw.bits > ops.X86_MAX_WEIGHT_BITS:
        return "int_mm"
    return "x86_int4" if qw.bits <= 4 and qw.codes.shape[1] % 2 == 0 else "x86"


def kernel_name(kernel: str, groups: int) -> str:
    name = {"int_mm": "int_mm", "x86": "fbgemm", "x86_int4": "fbgemm"}[kernel]
    return name if groups == 1 else f"{name} x{groups} groups"


class LowerToInteger(PassBase):
    def __init__(self, plan: QuantPlan, weights: dict[str, QuantizedWeight]) -> None:
        self.plan, self.weights = plan, weights

    def call(self, gm: fx.GraphModule) -> PassResult:
        integer_inputs: dict[fx.Node, tuple[fx.Node, ...]] = {}  # fake quantizer -> integer outputs
        modified = False
        for linear in list(gm.graph.nodes):
            info = linear.meta.get(META, {})
            fake = linear.args[0] if is_linear(linear) else None
            if (info.get("role") != "linear" or info.get("site") not in self.weights or fake is None
                    or fake.target not in _INTEGER_QUANTIZER):
                continue
            if fake not in integer_inputs:
                integer_inputs[fake] = _integer_quantizer(gm, fake)
            _replace_linear(gm, linear, integer_inputs[fake], self.weights[info["site"]], self.plan)
            if not fake.users:
                gm.graph.erase_node(fake)
            modified = True
        for outputs in integer_inputs.values():
            _share_gemm(gm, outputs[0])
        if modified:
            finish(gm)
        return PassResult(gm, modified)


def _integer_quantizer(gm: fx.GraphModule, fake: fx.Node) -> tuple[fx.Node, ...]:
    """The integer quantizer beside ``fake`` (same input and arguments); its outputs as nodes."""
    fn, outputs = _INTEGER_QUANTIZER[fake.target]
    info = {k: v for k, v in fake.meta[META].items() if k != "role"}
    with gm.graph.inserting_after(fake):
        quantized = gm.graph.create_node("call_function", fn, fake.args, name=f"{fake.args[0].name}_int")
    tag(quantized, role="quantize", **info)
    if outputs == 1:
        return (quantized,)
    parts = []
    for i, part in enumerate(("codes", "scale", "zero")[:outputs]):
        with gm.graph.inserting_after(parts[-1] if parts else quantized):
            node = gm.graph.create_node("call_function", operator.getitem, (quantized, i),
                                        name=f"{fake.args[0].name}_{part}")
        parts.append(tag(node, role="quantize", **info))
    return tuple(parts)


def _replace_linear(gm: fx.GraphModule, linear: fx.Node, x: tuple[fx.Node, ...], qw: QuantizedWeight,
                    plan: QuantPlan) -> None:
    site = plan.sites[linear.meta[META]["site"]]
    codes, w_zero = int_weight(qw)
    scale = qw.scale.t().double()  # (groups, out)
    static = len(x) == 1
    if static:  # a calibrated activation scale is a constant too: fold it into the rescale
        scale = scale * fetch_attr(gm, x[0].args[1].target).double()
    kernel = choose_kernel(qw)
    constant = {"w_int4": pack_int4(codes)} if kernel == "x86_int4" else {"w_int8": codes}
    constant["w_rescale"] = scale.float()
    if w_zero is not None:
        constant["w_zero"] = w_zero
    if len(x) == 3:  # asymmetric activations: the zero point times each group's weight code sum
        constant["w_colsum"] = codes.view(codes.shape[0], scale.shape[0], -1).sum(-1, dtype=torch.int32).t()
    nodes = {name: get_constant(gm, set_constant(gm, site.name, name, value)) for name, value in constant.items()}
    bias = linear.args[2] if len(linear.args) > 2 else None
    args = (x[0], nodes.get("w_int8", nodes.get("w_int4")), nodes["w_rescale"], bias, site.dtype,
            None if static else x[1], x[2] if len(x) == 3 else None, nodes.get("w_colsum"), nodes.get("w_zero"), kernel)
    with gm.graph.inserting_before(linear):
        integer = gm.graph.create_node("call_function", ops.int8_linear, args, name=f"{linear.name}_int")
    site.kernel = kernel_name(kernel, scale.shape[0])
    integer.meta = {k: v for k, v in linear.meta.items() if k != META}
    tag(integer, **linear.meta[META], w_bits=qw.bits, kernel=site.kernel)
    linear.replace_all_uses_with(integer)
    gm.graph.erase_node(linear)


def _share_gemm(gm: fx.GraphModule, codes: fx.Node) -> None:
    """The fbgemm linears that read the same activation codes (q/k/v, gate/up) get their sums from
    one fbgemm_int8_mm over all their weights: one GEMM, each linear reading its own columns. Each
    keeps its own node and constants, so the plan, dump and save still see one linear per layer."""
    by_layout: dict[tuple[int, str], list[fx.Node]] = {}  # (groups, kernel) -> linears
    for user in codes.users:
        if user.target is ops.int8_linear and user.args[0] is codes and user.args[9].startswith("x86"):
            by_layout.setdefault((fetch_attr(gm, user.args[2].target).shape[0], user.args[9]), []).append(user)
    for (groups, kernel), linears in by_layout.items():
        if len(linears) < 2:
            continue
        sites = [n.meta[META]["site"] for n in linears]
        with gm.graph.inserting_after(codes):  # the weights are get_attr nodes at the top of the graph
            matrix = tag(gm.graph.call_function(ops.gemm_input, (codes,)), role="gemm", sites=sites)
        with gm.graph.inserting_after(matrix):
            shared = gm.graph.call_function(torch.ops.fxquant.fbgemm_int8_mm.default,
                                            (matrix, [n.args[1] for n in linears], groups, kernel == "x86_int4"))
        tag(shared, role="gemm", sites=sites)
        start = 0
        for linear in linears:
            width = fetch_attr(gm, linear.args[1].target).shape[0]
            with gm.graph.inserting_before(linear):
                columns = gm.graph.call_function(torch.narrow, (shared, -1, start, width))
            tag(columns, role="gemm", site=linear.meta[META]["site"])
            linear.update_kwarg("sums", columns)
            start += width


UNPACK = torch.ops.fxquant.unpack_int4.default


def pack_weights(gm: fx.GraphModule) -> None:
    """At-rest form, for saving: each 4-bit int8 weight becomes unpack_int4(two codes per byte).

    Edits ``gm`` in place: call it on a copy (serialize.save does). 4-bit codes, shifted asymmetric
    ones too, lie in [-8, 7], so every one packs as a signed nibble."""
    for linear in list(gm.graph.nodes):
        if (linear.target is not ops.int8_linear or linear.meta[META].get("w_bits", 8) > 4
                or linear.args[9] == "x86_int4"):
            continue  # 8-bit codes, or already two per byte
        weight = linear.args[1]
        codes = fetch_attr(gm, weight.target)
        if codes.shape[1] % 2:
            continue  # an odd width has no whole byte for its last column: stored as int8
        owner, name = weight.target.rsplit(".", 1)
        # beside the codes, under the name unpack_weights strips again (so it keeps readable names)
        _register_new(fetch_attr(gm, owner), f"{name}_packed", pack_int4(codes))
        with gm.graph.inserting_after(weight):  # before every user: the linear and a shared GEMM
            packed = gm.graph.get_attr(f"{weight.target}_packed")
        with gm.graph.inserting_after(packed):
            unpacked = gm.graph.call_function(UNPACK, (packed,))
        tag(unpacked, site=linear.meta[META]["site"], role="unpack", bits=linear.meta[META]["w_bits"])
        weight.replace_all_uses_with(unpacked)  # the linear and a shared GEMM
        if not weight.users:
            gm.graph.erase_node(weight)
            delattr(fetch_attr(gm, owner), name)
    finish(gm)


def unpack_weights(gm: fx.GraphModule) -> None:
    """Run-time form, after loading: every unpack_int4 of a constant is computed once into an int8
    buffer, so no call unpacks (the inverse of pack_weights)."""
    for node in list(gm.graph.nodes):
        if node.target is not UNPACK or node.args[0].op != "get_attr":
            continue
        packed = node.args[0]
        owner, name = packed.target.rsplit(".", 1)
        container = fetch_attr(gm, owner)
        target = name.removesuffix("_packed")
        _register_new(container, target, ops.unpack_int4(fetch_attr(gm, packed.target), signed=True))
        with gm.graph.inserting_before(node):
            codes = gm.graph.get_attr(f"{owner}.{target}")
        codes.meta = {k: v for k, v in node.meta.items() if k in ("val", "tensor_meta")}
        node.replace_all_uses_with(codes)
        gm.graph.erase_node(node)
        if not packed.users:
            gm.graph.erase_node(packed)
            delattr(container, name)
    finish(gm)


def _register_new(container: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    """register_buffer that never overwrites: pack/unpack swap one constant for its other form
    under a name derived from it, which add_constant's renaming would make unreadable."""
    if hasattr(container, name):
        raise RuntimeError(f"cannot store {name!r}: the name is taken in {type(container).__name__}")
    container.register_buffer(name, value)
