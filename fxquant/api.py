"""quantize_graph: runs the stages of architecture.md in order, nothing else."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.infra.pass_manager import PassManager

from . import solve
from .calibrate import InputStats, RangeStats, observed_copy, run_loader
from .capture import batch_to_call, capture
from .config import QuantConfig
from .passes.cleanup import DropUnusedConstants
from .passes.common import META, fetch_attr
from .passes.normalize import Normalize
from .passes.quantize import QuantizeActivations, QuantizeWeights
from .passes.transform import InsertTransforms
from .passes.verify import check_invariants
from .plan import QuantPlan, make_plan

log = logging.getLogger(__name__)


def quantize_graph(model: nn.Module, calib_loader: Iterable[Any], config: QuantConfig | None = None, *,
                   example_inputs: Any = None, dry_run: bool = False) -> fx.GraphModule | QuantPlan:
    """Capture ``model``, calibrate on every batch of ``calib_loader``, return the rewritten graph.

    The result is called like the model is called with a loader batch, returns the same output
    structure, and is a pure function of its inputs and constants (ready for torch.compile).
    With ``dry_run=True`` returns the QuantPlan and rewrites nothing.
    """
    config = config or QuantConfig()
    loader = _reiterable(calib_loader)
    first = example_inputs if example_inputs is not None else _first_batch(loader)
    gm = capture(model, *batch_to_call(first), method=config.capture)
    return quantize_module(gm, loader, config, dry_run=dry_run)


def quantize_module(gm: fx.GraphModule, calib_loader: Iterable[Any], config: QuantConfig, *,
                    dry_run: bool = False) -> fx.GraphModule | QuantPlan:
    """The stages after capture, on a GraphModule whose weights are get_attr constants.

    ``calib_loader`` yields batches for ``gm`` itself (Tensor, tuple or dict, as for quantize_graph).
    """
    loader = _reiterable(calib_loader)
    gm = _run([Normalize()], gm)
    plan = make_plan(gm, config)
    if dry_run:
        return plan
    nodes = {n.name: n for n in gm.graph.nodes}

    # observe + calibrate: raw statistics of every group input (all calls of a weight together)
    inputs = {g.name: InputStats(", ".join(g.sites), g.dim, config.calib_tokens, config.seed,
                                 gram=any(solve.needs_gram(plan.sites[s].config) for s in g.sites))
              for g in plan.groups.values()}
    run_loader(observed_copy(gm, [(nodes[x], inputs[g.name]) for g in plan.groups.values() for x in g.inputs]),
               loader, desc="fxquant calibrate")

    # solve the transforms, rewrite activations and weights with them (still exact in float)
    floats = {s.name: fetch_attr(gm, s.weight).detach().float() for s in plan.active_sites()}
    transforms = solve.solve_transforms(list(plan.groups.values()), inputs, floats)
    weights = {s: solve.apply_to_weight(floats[s], transforms[g.name]) for g in plan.groups.values() for s in g.sites}
    gm = _run([InsertTransforms(plan, transforms, weights)], gm)

    # static activation scales are measured on the transformed activations: a second pass
    scales = _calibrate_scales(gm, plan, loader)
    quantized = {}
    for group in plan.groups.values():
        gram = solve.transformed_gram(inputs[group.name], transforms[group.name])
        for s in group.sites:
            if plan.sites[s].config.w_quantized:
                quantized[s] = solve.solve_weight(plan.sites[s].config, weights[s], gram)
                plan.sites[s].stats["weight_error"] = solve.weight_error(weights[s], quantized[s])
                if config.keep_float_weights:
                    plan.sites[s].stats["weight_float"] = weights[s]
    gm = _run([QuantizeActivations(plan, scales), QuantizeWeights(plan, quantized, config.weight_format),
               DropUnusedConstants()], gm)
    gm.meta[META] = {"config": config, "plan": plan}
    return gm


def _calibrate_scales(gm: fx.GraphModule, plan: QuantPlan, loader: Iterable[Any]) -> dict[str, torch.Tensor]:
    static = [g for g in plan.groups.values() if g.config.a_quantized and g.config.a_granularity != "token"]
    if not static:
        return {}
    ranges = {g.name: RangeStats(", ".join(g.sites), g.dim, g.config.a_granularity == "channel") for g in static}
    # observe each transformed group input once, however many linears read it
    watch = {n.args[0]: ranges[n.meta[META]["group"]] for n in _transformed_linears(gm)
             if n.meta[META]["group"] in ranges}
    run_loader(observed_copy(gm, list(watch.items())), loader, desc="fxquant scales")
    scales = {}
    for g in static:
        scales[g.name] = solve.activation_scale(g.config, ranges[g.name])
        g.stats["act_scale"] = scales[g.name]
    return scales


def _transformed_linears(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.meta.get(META, {}).get("role") == "linear"]


def _run(passes: list, gm: fx.GraphModule) -> fx.GraphModule:
    manager = PassManager(passes, run_checks_after_each_pass=True)
    manager.add_checks(check_invariants)
    return manager(gm).graph_module


def _reiterable(loader: Iterable[Any]) -> Iterable[Any]:
    """Calibration reads the loader twice; a one-shot iterator (a generator) is kept in a list."""
    if iter(loader) is loader:
        return list(loader)
    return loader


def _first_batch(loader: Iterable[Any]) -> Any:
    for batch in loader:
        return batch
    raise ValueError("calib_loader yielded no batches: give it at least one batch of representative inputs")
