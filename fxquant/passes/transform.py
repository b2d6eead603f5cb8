"""rewrite, part 1: the DuQuant transform, once per group input, and the transformed weights.

Before                                   After
    h = rms_norm(...)                        h = rms_norm(...)
    q = linear(h, W_q)                       h_s = h * inv_smooth              (smooth)
    k = linear(h, W_k)                       h_r = block_rotate(h_s, R1)       (rotate)
                                             h_p = permute_channels(h_r, P)    (permute)
                                             h_t = block_rotate(h_p, R2)       (rotate2)
                                             q = linear(h_t, W_q @ T^-T)
                                             k = linear(h_t, W_k @ T^-T)

Exact: (x T)(W T^-T)^T = x W^T for any invertible T, and here T^-T is computed offline.
Other readers of h (residuals, skipped layers) keep reading h. Every call of a weight reads the
same transformed constant, so a loop that calls a layer ten times stores its weight once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .. import ops
from ..duquant import Transform
from ..plan import Group, QuantPlan
from .common import META, fetch_attr, finish, get_constant, is_linear, set_constant, tag


class InsertTransforms(PassBase):
    def __init__(self, plan: QuantPlan, transforms: dict[str, Transform],
                 weights: dict[str, torch.Tensor]) -> None:
        self.plan, self.transforms, self.weights = plan, transforms, weights

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        nodes = {n.name: n for n in gm.graph.nodes}
        for group in self.plan.groups.values():
            pending = {x: readers for x in map(nodes.get, group.inputs)
                       if (readers := [n for n in x.users if is_linear(n) and _site(n) in group.sites
                                       and META not in n.meta])}
            if not pending:
                continue  # already rewritten: a second run changes nothing
            constants = _register_transform(gm, group, self.transforms[group.name])
            # one transformed weight per site, however many calls (readers) it has
            targets = {name: set_constant(gm, name, "w_float", self.weights[name],
                                          dtype=self.plan.sites[name].dtype)
                       for name in {_site(n) for readers in pending.values() for n in readers}}
            for x, readers in pending.items():
                x_t = _insert_chain(gm, x, group, constants)
                for linear in readers:
                    name = _site(linear)
                    linear.args = (x_t, get_constant(gm, targets[name]), *linear.args[2:])
                    tag(linear, site=name, group=group.name, role="linear", stats=self.plan.sites[name].stats)
            modified = True
        if modified:
            finish(gm)
        return PassResult(gm, modified)


def _site(linear: fx.Node) -> str:
    return linear.args[1].target.removesuffix(".weight")


def _register_transform(gm: fx.GraphModule, group: Group, t: Transform) -> dict[str, str]:
    """Constants of one group's transform: rotations in float32 whatever the model dtype
    (orthogonal to ~1e-7; bf16 would give ~1e-2), the smoothing scales in the model dtype."""
    values = {"inv_smooth": (None if t.smooth is None else 1.0 / t.smooth.double(), group.dtype),
              "rot1": (t.rot1, torch.float32), "perm": (t.perm, None), "rot2": (t.rot2, torch.float32)}
    return {name: set_constant(gm, group.name, name, value, dtype=dtype)
            for name, (value, dtype) in values.items() if value is not None}


_CHAIN = (("inv_smooth", torch.mul, "smooth"), ("rot1", ops.block_rotate, "rotate"),
          ("perm", ops.permute_channels, "permute"), ("rot2", ops.block_rotate, "rotate2"))
_ROLES = tuple(role for _, _, role in _CHAIN)  # what the nodes of a transform chain are tagged


def _insert_chain(gm: fx.GraphModule, x: fx.Node, group: Group, constants: dict[str, str]) -> fx.Node:
    current = x
    for constant, fn, role in _CHAIN:
        if constant not in constants:
            continue
        value = get_constant(gm, constants[constant])  # constants sit at the top of the graph
        with gm.graph.inserting_after(current):
            current = gm.graph.create_node("call_function", fn, (current, value), name=f"{x.name}_{role}")
        tag(current, group=group.name, role=role, constant=constants[constant], stats=group.stats)
    return current


def transform_chain(gm: fx.GraphModule, end: fx.Node) -> Callable[[torch.Tensor], torch.Tensor]:
    """The transform ops _insert_chain put up to ``end`` (inclusive), as a function of their input:
    the same ops on the same constants, to replay the graph's transform on kept activations."""
    chain = []
    while end.op == "call_function" and end.meta.get(META, {}).get("role") in _ROLES:
        chain.append((end.target, fetch_attr(gm, end.args[1].target)))
        end = end.args[0]

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            for fn, constant in reversed(chain):
                x = fn(x, constant.to(x.device))
        return x
    return run
