"""plan: which linears are quantized, which share a transform, and with which settings.

A *site* is one weight (one layer), however many times the graph calls it: the flow-matching
loop of a VLA policy calls its action expert ten times with the same weights, and those calls
must share one quantized weight and one calibration. A *group* is a set of sites joined by
reading the same activation (q/k/v; gate/up) or by being the same weight: it gets one transform,
applied once per activation node in the graph.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import torch
from torch import fx

from .config import GROUP_FIELDS, QuantConfig
from .duquant import block_size_for
from .passes.common import fetch_attr, is_linear

log = logging.getLogger(__name__)


@dataclass
class Site:
    name: str
    weight: str  # get_attr target of the float weight
    in_features: int
    out_features: int
    config: QuantConfig  # the config with this layer's overrides applied
    dtype: torch.dtype = torch.float32  # the float weight's dtype: constants are stored in it
    calls: int = 0
    group: str = ""
    skip: str = ""  # why it stays in float ("" = quantized)
    kernel: str = ""  # the integer GEMM that runs it (execution="int"); "" = float ops ("fake" when quantized)
    stats: dict = field(default_factory=dict)


@dataclass
class Group:
    name: str
    sites: list[str]
    inputs: list[str]  # names of the activation nodes the calls read; the transform goes on each
    dim: int
    config: QuantConfig
    dtype: torch.dtype = torch.float32  # activation dtype (that of the group's weights)
    block_size: int | None = None
    note: str = ""
    stats: dict = field(default_factory=dict)  # calibration summary, for the plan and the dump


@dataclass
class QuantPlan:
    sites: dict[str, Site] = field(default_factory=dict)
    groups: dict[str, Group] = field(default_factory=dict)

    def active_sites(self) -> list[Site]:
        return [s for s in self.sites.values() if not s.skip]

    def table(self) -> str:
        from .dump import plan_table  # here because dump imports plan

        return plan_table(self)

    __str__ = table


def make_plan(gm: fx.GraphModule, config: QuantConfig) -> QuantPlan:
    plan = QuantPlan()
    calls: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if not is_linear(node):
            continue
        target = node.args[1].target
        name = target.removesuffix(".weight")
        if name not in plan.sites:
            weight = fetch_attr(gm, target)
            plan.sites[name] = Site(name, target, weight.shape[1], weight.shape[0], config.for_layer(name),
                                    dtype=weight.dtype, skip=_skip_reason(name, weight, config))
        plan.sites[name].calls += 1
        calls.setdefault(name, []).append(node)
    _warn_unmatched_overrides(config, list(plan.sites))
    _check_group_sizes(plan)
    for members in _connected_groups(plan, calls):
        _add_group(plan, members, calls)
    return plan


def _skip_reason(name: str, weight: torch.Tensor, config: QuantConfig) -> str:
    if not config.selects(name):
        return "excluded by config.include/exclude"
    if config.for_layer(name).skip:
        return "skip=True in config.overrides"
    if weight.dim() != 2 or not weight.is_floating_point():
        return f"weight {tuple(weight.shape)} {weight.dtype} is not a 2-D float matrix"
    return ""


def _warn_unmatched_overrides(config: QuantConfig, names: list[str]) -> None:
    for pattern in config.overrides:
        if not any(re.search(pattern, n) for n in names):
            log.warning("QuantConfig.overrides[%r] matches no linear layer; layer names look like %s",
                        pattern, ", ".join(names[:3]) or "(none found)")


def warn_nothing_quantized(plan: QuantPlan, config: QuantConfig) -> None:
    """For a whole model (quantize_graph), not per torch.compile subgraph, where most have no linear."""
    names = list(plan.sites)
    for pattern in config.include:
        if not any(re.search(pattern, n) for n in names):
            log.warning("QuantConfig.include %r matches no linear layer; layer names look like %s",
                        pattern, ", ".join(names[:3]) or "(none found)")
    if not names:
        log.warning("fxquant: the model has no linear layer (nn.Linear or F.linear), so nothing is quantized; "
                    "the graph returned computes what the model does")
    elif not plan.active_sites():
        log.warning("fxquant: nothing is quantized: every linear layer is skipped (%s); check "
                    "QuantConfig.include / exclude / overrides. Layer names look like %s",
                    next(iter(plan.sites.values())).skip, ", ".join(names[:3]))


def _check_group_sizes(plan: QuantPlan) -> None:
    """Weight groups split each row into whole groups: checked here, before calibration runs."""
    for site in plan.active_sites():
        size = site.config.w_group_size
        if site.config.w_quantized and size is not None and site.in_features % size:
            divisors = [str(d) for d in range(2, min(site.in_features, 128) + 1) if site.in_features % d == 0][-3:]
            raise ValueError(f"QuantConfig.w_group_size={size} does not divide the {site.in_features} input "
                             f"features of layer {site.name!r}: use a divisor of {site.in_features} (e.g. "
                             f"{', '.join(divisors)}), or set it for this layer with "
                             f"overrides={{{site.name!r}: {{'w_group_size': None}}}}")


def _connected_groups(plan: QuantPlan, calls: dict[str, list[fx.Node]]) -> list[list[str]]:
    """Union-find over sites: two sites join when any of their calls read the same node."""
    parent = {name: name for name in plan.sites if not plan.sites[name].skip}

    def find(a: str) -> str:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    reader: dict[fx.Node, str] = {}
    for name in parent:
        for node in calls[name]:
            x = node.args[0]
            if x in reader:
                parent[find(name)] = find(reader[x])
            reader.setdefault(x, name)
    groups: dict[str, list[str]] = {}
    for name in parent:
        groups.setdefault(find(name), []).append(name)
    return list(groups.values())


def _add_group(plan: QuantPlan, members: list[str], calls: dict[str, list[fx.Node]]) -> None:
    name = _group_name(members)
    configs = {m: plan.sites[m].config for m in members}
    first = configs[members[0]]
    for f in GROUP_FIELDS:
        values = {m: getattr(c, f) for m, c in configs.items()}
        if len(set(map(repr, values.values()))) > 1:
            raise ValueError(f"layers {members} read the same activation and share one transform, but "
                             f"config.overrides gives them different {f}: {values}; give them the same value")
    inputs = list(dict.fromkeys(node.args[0].name for m in members for node in calls[m]))
    group = Group(name, members, inputs, plan.sites[members[0]].in_features, first, plan.sites[members[0]].dtype)
    if first.rotation_steps > 0:
        group.block_size, group.note = block_size_for(group.dim, first.block_size)
    plan.groups[name] = group
    for m in members:
        plan.sites[m].group = name


def _group_name(members: list[str]) -> str:
    if len(members) == 1:
        return members[0]
    parts = [m.split(".") for m in members]
    prefix: list[str] = []
    for atoms in zip(*parts, strict=False):
        if len(set(atoms)) > 1:
            break
        prefix.append(atoms[0])
    rest = ",".join(".".join(p[len(prefix):]) for p in parts)
    return ".".join(prefix + [f"{{{rest}}}"])
