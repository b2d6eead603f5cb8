"""quantize_graph: runs the stages of architecture.md in order, nothing else."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.infra.pass_manager import PassManager

from . import ops, solve
from .calibrate import (
    ActivationCache,
    GramBudget,
    GramStats,
    InputStats,
    LoaderPasses,
    RangeStats,
    observed_copy,
    run_loader,
)
from .capture import batch_to_call, capture, pin_thread_count
from .config import QuantConfig
from .duquant import apply_to_weight
from .passes.cleanup import DropUnusedConstants
from .passes.common import META, fetch_attr
from .passes.lower import LowerToInteger
from .passes.normalize import Normalize
from .passes.quantize import QuantizeActivations, QuantizeWeights
from .passes.transform import InsertTransforms, transform_chain
from .passes.verify import check_invariants
from .plan import QuantPlan, make_plan, warn_nothing_quantized

log = logging.getLogger(__name__)


def quantize_graph(model: nn.Module, calib_loader: Iterable[Any], config: QuantConfig | None = None, *,
                   example_inputs: Any = None, dry_run: bool = False) -> fx.GraphModule | QuantPlan:
    """Capture ``model``, calibrate on every batch of ``calib_loader``, return the rewritten graph.

    The result is called like the model is called with a loader batch, returns the same output
    structure, and is a pure function of its inputs and constants (ready for torch.compile).
    With ``dry_run=True`` returns the QuantPlan and rewrites nothing.
    """
    pin_thread_count()  # before any torch op of this call: see its docstring
    config = _checked_arguments(model, calib_loader, config)
    loader = _reiterable(calib_loader)
    first = example_inputs if example_inputs is not None else _first_batch(loader)
    gm = capture(model, *batch_to_call(first), method=config.capture)
    result = quantize_module(gm, loader, config, dry_run=dry_run)
    warn_nothing_quantized(result if dry_run else result.meta[META]["plan"], config)
    return result


def _checked_arguments(model: Any, calib_loader: Any, config: Any) -> QuantConfig:
    """quantize_graph's arguments, checked before capture: each error names the argument and the fix."""
    if config is None:
        config = QuantConfig()
    if not isinstance(config, QuantConfig):
        fix = ("QuantConfig() (an instance, not the class)" if config is QuantConfig
               else "QuantConfig(**config)" if isinstance(config, Mapping) else "QuantConfig(...)")
        got = "the class itself" if config is QuantConfig else type(config).__name__
        raise TypeError(f"config must be a fxquant.QuantConfig instance, got {got}; pass {fix}")
    if isinstance(model, nn.Module):
        meta = next((n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta), None)
        if meta is not None:
            raise ValueError(f"model has tensors on the meta device ({meta!r}, ...), which hold no values to "
                             "calibrate or quantize; load the real weights first (e.g. from_pretrained without "
                             "device_map='meta', or model.to_empty(device='cpu') then load_state_dict)")
    if isinstance(calib_loader, torch.Tensor):
        raise TypeError("calib_loader is a Tensor; iterating it would give single rows, not batches: pass a list "
                        "of batches, e.g. [x]")
    if not isinstance(calib_loader, Iterable) and not hasattr(calib_loader, "__getitem__"):
        raise TypeError(f"calib_loader must be an iterable of batches (a list or a DataLoader), got "
                        f"{type(calib_loader).__name__}: pass e.g. [batch] (a Tensor, tuple or dict each)")
    return config


@dataclass
class Solution:
    """What calibration and solving found for one graph: a recompile of the same graph (another
    shape, through the backend) applies it instead of calibrating and solving again."""

    transforms: dict[str, Any]
    scales: dict[str, torch.Tensor]
    quantized: dict[str, Any]
    site_stats: dict[str, dict]
    group_stats: dict[str, dict]


def solution_key(gm: fx.GraphModule, plan: QuantPlan, config: QuantConfig) -> tuple:
    """Equal for graphs that quantize the same way: the same groups of the same weight tensors (by
    storage, so the model's own weights), read the same number of times, under the same config.
    Sizes of activations do not enter: they are what differs between recompiles."""
    sites = tuple((s.name, s.skip, s.calls, fetch_attr(gm, s.weight).data_ptr(), s.in_features, s.out_features)
                  for s in plan.sites.values())
    groups = tuple((g.name, tuple(g.sites), len(g.inputs), g.dim) for g in plan.groups.values())
    return repr(config), sites, groups


def quantize_module(gm: fx.GraphModule, calib_loader: Iterable[Any], config: QuantConfig, *,
                    dry_run: bool = False, solutions: dict[tuple, Solution] | None = None
                    ) -> fx.GraphModule | QuantPlan:
    """The stages after capture, on a GraphModule whose weights are get_attr constants.

    ``calib_loader`` yields batches for ``gm`` itself (Tensor, tuple or dict, as for quantize_graph).
    ``solutions``: solved graphs by solution_key; a graph found there is not calibrated again (the
    loader is not read), one solved here is added.
    """
    pin_thread_count()
    loader = _reiterable(calib_loader)
    gm = _run([Normalize()], gm)
    plan = make_plan(gm, config)
    if dry_run:
        return plan
    seconds: dict[str, float] = {}
    key = solution_key(gm, plan, config) if solutions is not None else None
    solved = solutions.get(key) if solutions is not None else None
    if solved is None:
        gm, solved = _solve(gm, plan, loader, config, seconds)
        if solutions is not None:
            solutions[key] = solved
    else:  # the same graph at another shape: the same transforms, scales and weights
        for name, stats in solved.site_stats.items():
            plan.sites[name].stats = stats
        for name, stats in solved.group_stats.items():
            plan.groups[name].stats = stats
        gm = _insert_transforms(gm, plan, solved.transforms,
                                _transformed_weights(plan, solved.transforms, _float_weights(gm, plan)))
        log.info("fxquant: reused the calibration and solution of an earlier compile of this graph")

    with _timed(seconds, "rewrite"):
        lower = [LowerToInteger(plan, solved.quantized)] if config.execution == "int" else []
        gm = _run([QuantizeActivations(plan, solved.scales), *lower,
                   QuantizeWeights(plan, solved.quantized, config.weight_format), DropUnusedConstants()], gm)
        _warn_slow_integer_gemm(gm, plan)
    gm.meta[META] = {"config": config, "plan": plan, "seconds": seconds}
    log.info("fxquant: %s", ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))
    return gm


def _solve(gm: fx.GraphModule, plan: QuantPlan, loader: Iterable[Any], config: QuantConfig,
           seconds: dict[str, float]) -> tuple[fx.GraphModule, Solution]:
    """Calibrate, solve the transforms, quantize weights, insert the transforms into ``gm``, then
    measure static scales."""
    nodes = {n.name: n for n in gm.graph.nodes}
    groups = list(plan.groups.values())
    # Gram statistics (kept rows, or X^T X at D^2 x 8 bytes a group) are measured within a budget: in
    # the calibration pass for every group that fits, the rest in later passes of their own
    needs_gram = {g.name for g in groups if any(solve.needs_gram(plan.sites[s].config) for s in g.sites)}
    with _timed(seconds, "calibrate"):  # raw statistics of every group input, all calls of a weight together
        cache = ActivationCache(config.calib_cache_gb * 2**30)  # inputs of static-scale groups, for "scales"
        grams = GramBudget(config.calib_gram_gb * 2**30)
        inputs = {g.name: InputStats(", ".join(g.sites), g.dim, config.calib_tokens, config.seed,
                                     gram=grams if g.name in needs_gram else None,
                                     cache=cache if g.config.a_static else None)
                  for g in groups}
        run_loader(observed_copy(gm, [(nodes[x], inputs[g.name]) for g in groups for x in g.inputs]), loader,
                   desc="fxquant calibrate")

    with _timed(seconds, "transforms"):  # solved on the statistics; the graph is still the float one
        floats = _float_weights(gm, plan)
        transforms = solve.solve_transforms(groups, inputs, floats)
        weights = _transformed_weights(plan, transforms, floats)

    with _timed(seconds, "weights"):
        quantized = _quantize_weights(gm, plan, loader, inputs, transforms, weights, needs_gram, config)
        gm = _insert_transforms(gm, plan, transforms, weights)  # exact in float: activations x T, weights W T^-T

    with _timed(seconds, "scales"):  # static scales are measured on the transformed activations
        kept = {g: cache.inputs.get(inputs[g]) for g in plan.groups} if cache.complete else {}
        del cache  # the kept inputs go once the scales are measured
        scales = _calibrate_scales(gm, plan, loader, kept)
    return gm, Solution(transforms, scales, quantized, {n: s.stats for n, s in plan.sites.items()},
                        {n: g.stats for n, g in plan.groups.items()})


def _quantize_weights(gm: fx.GraphModule, plan: QuantPlan, loader: Iterable[Any], inputs: dict[str, InputStats],
                      transforms: dict[str, Any], weights: dict[str, torch.Tensor], needs_gram: set[str],
                      config: QuantConfig) -> dict[str, Any]:
    """Every group's quantized weights, solved a budget's worth of Gram matrices at a time (each made
    from its kept rows when first read, freed once solved). Groups the calibration pass had no room
    for are measured in passes of their own over the loader, on the same float graph ``gm``, planned
    by the sizes the first pass counted."""
    budget = config.calib_gram_gb * 2**30
    nodes = {n.name: n for n in gm.graph.nodes}
    groups = list(plan.groups.values())
    matrix_bytes = {name: GramStats.nbytes(plan.groups[name].dim) for name in needs_gram}
    waiting = [g for g in groups if g.name in needs_gram and inputs[g.name].gram_stats.dropped]
    ready, quantized = [g for g in groups if g not in waiting], {}
    while ready:
        for members in solve.gram_sets(ready, matrix_bytes, budget):
            quantized |= solve.solve_weights(plan, members, inputs, transforms, weights,
                                             keep_float=config.keep_float_weights)
        if not waiting:
            break
        held = {g.name: GramStats.expected_bytes(g.dim, inputs[g.name].tokens) for g in waiting}
        ready = solve.gram_sets(waiting, held, budget)[0]
        waiting = waiting[len(ready):]
        for g in ready:
            inputs[g.name].gram_stats = GramStats(inputs[g.name].layers, g.dim)
        run_loader(observed_copy(gm, [(nodes[x], inputs[g.name].gram_stats) for g in ready for x in g.inputs]),
                   loader, desc=f"fxquant Gram matrices ({len(waiting)} groups after these)")
    return quantized


def _float_weights(gm: fx.GraphModule, plan: QuantPlan) -> dict[str, torch.Tensor]:
    """Each quantized site's weight in float32 on the CPU: solving is CPU math next to the CPU
    statistics; constants go back to the model's device."""
    return {s.name: fetch_attr(gm, s.weight).detach().float().cpu() for s in plan.active_sites()}


def _transformed_weights(plan: QuantPlan, transforms: dict[str, Any], floats: dict[str, torch.Tensor]
                         ) -> dict[str, torch.Tensor]:
    return {s: apply_to_weight(floats[s], transforms[g.name]) for g in plan.groups.values() for s in g.sites}


def _insert_transforms(gm: fx.GraphModule, plan: QuantPlan, transforms: dict[str, Any],
                       weights: dict[str, torch.Tensor]) -> fx.GraphModule:
    """``gm`` with the transforms inserted and the transformed float weights in place (still exact)."""
    return _run([InsertTransforms(plan, transforms, weights)], gm)


@contextlib.contextmanager
def _timed(seconds: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    seconds[stage] = time.perf_counter() - start


def _calibrate_scales(gm: fx.GraphModule, plan: QuantPlan, loader: Iterable[Any],
                      kept: dict[str, list[torch.Tensor] | None]) -> dict[str, torch.Tensor]:
    """Static activation scales from the transformed group inputs: the graph's own transform ops
    replayed on the inputs kept from the first pass when every static group has them, else a
    second run of the loader through the transformed graph."""
    static = [g for g in plan.groups.values() if g.config.a_static]
    if not static:
        return {}
    ranges = {g.name: RangeStats(", ".join(g.sites), g.dim, g.config.a_granularity == "channel") for g in static}
    # each transformed group input once, however many linears read it
    ends = {n.args[0]: n.meta[META]["group"] for n in _transformed_linears(gm) if n.meta[META]["group"] in ranges}
    if all(kept.get(g.name) for g in static):
        for group, end in {group: end for end, group in ends.items()}.items():  # one call site per group
            chain = transform_chain(gm, end)
            while kept[group]:
                ranges[group].update(chain(kept[group].pop(0)))  # freed as it goes
    else:
        kept.clear()  # incomplete: not worth the memory while the loader runs again
        run_loader(observed_copy(gm, [(end, ranges[group]) for end, group in ends.items()]), loader,
                   desc="fxquant scales")
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


def _warn_slow_integer_gemm(gm: fx.GraphModule, plan: QuantPlan) -> None:
    device = next((t.device for t in gm.state_dict().values()), torch.device("cpu"))
    slow = [s.name for s in plan.sites.values() if s.kernel.startswith("int_mm")]
    if slow and not ops.fast_int8_gemm(device):
        log.warning("execution='int': %d layers (%s, ...) run torch._int_mm, which has no fast kernel on this CPU "
                    "(capability %s, no AVX512): exact but slower than execution='fake' here. fbgemm's kernel, "
                    "used for the other layers, sums exactly only weights of at most %d bits",
                    len(slow), slow[0], torch.backends.cpu.get_cpu_capability(), ops.X86_MAX_WEIGHT_BITS)


def _reiterable(loader: Iterable[Any]) -> Iterable[Any]:
    """Calibration reads the loader twice; a one-shot iterator (a generator) is kept in a list, and
    LoaderPasses says so when another one-shot iterable yields less the second time."""
    if isinstance(loader, LoaderPasses):
        return loader
    # Iterator, not iter(loader) is loader: calling iter() would use up a one-shot iterable
    return LoaderPasses(list(loader) if isinstance(loader, Iterator) else loader)


def _first_batch(loader: Iterable[Any]) -> Any:
    for batch in loader:
        return batch
    raise ValueError("calib_loader yielded no batches: give it at least one batch of representative inputs")
