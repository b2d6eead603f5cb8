"""solve: calibration statistics -> transforms, quantized weights and activation scales.

Pure math over tensors (the FX graph is not touched here): the stage between calibration and
rewrite, one function per kind of constant.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor

import torch

from .calibrate import InputStats, RangeStats, progress
from .config import QuantConfig
from .duquant import Transform, apply_to_activation, build_transform, transform_gram
from .plan import Group, QuantPlan
from .quant import QuantizedWeight, dequantize_weight, quantize_weights


def needs_gram(config: QuantConfig) -> bool:
    return config.w_quantized and (config.w_clip == "mse" or config.w_method == "gptq")


def build_group_transform(group: Group, stats: InputStats, weights: list[torch.Tensor], index: int,
                          prune: bool = True) -> Transform:
    """The group's DuQuant transform; each group (its index in the plan) draws its own seeded matrices."""
    c = group.config
    return build_transform(stats.rows, stats.absmax, torch.cat(weights), alpha=c.smooth_alpha,
                           block_size=c.block_size, steps=c.rotation_steps, permute=c.permute,
                           seed=c.seed * 1_000_003 + index, prune=prune)


def solve_transform(group: Group, stats: InputStats, weights: list[torch.Tensor], index: int) -> Transform:
    """build_group_transform, plus the before/after statistics the plan table and dump show."""
    t = build_group_transform(group, stats, weights, index)
    # before and after on the same sampled rows, so the two are comparable
    before, after = stats.rows.abs(), apply_to_activation(stats.rows, t).abs()
    group.stats.update(tokens=stats.tokens, sampled_rows=before.shape[0], absmax_all=stats.absmax.clone(),
                       absmax_before=before.amax(0), absmax_after=after.amax(0),
                       mean_abs_before=float(before.mean()), mean_abs_after=float(after.mean()))
    return t


def solve_transforms(groups: list[Group], inputs: dict[str, InputStats],
                     weights: dict[str, torch.Tensor]) -> dict[str, Transform]:
    """Every group's transform, searched on as many worker threads as torch has, each running its
    tensor ops on one thread: the greedy search is many small steps, so groups side by side use
    the cores better than threads inside one step (and stay fast when other processes load the
    machine). Results do not depend on scheduling: each group has its own seeded generator."""
    threads = torch.get_num_threads()

    def one(index: int) -> Transform:
        g = groups[index]
        return solve_transform(g, inputs[g.name], [weights[s] for s in g.sites], index)

    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            found = list(progress(pool.map(one, range(len(groups))), "fxquant solve", unit="group",
                                  total=len(groups)))
    finally:
        torch.set_num_threads(threads)
    return {g.name: t for g, t in zip(groups, found, strict=True)}


def solve_weights(plan: QuantPlan, inputs: dict[str, InputStats], transforms: dict[str, Transform],
                  weights: dict[str, torch.Tensor], keep_float: bool = False) -> dict[str, QuantizedWeight]:
    """Quantize every transformed weight with its group's transformed Gram matrix (consuming the
    raw Gram matrices of ``inputs``).

    Sites of a group with the same weight settings are quantized as one matrix (their rows
    stacked): every quantizer here works row by row, so this is exact. Those matrices are then
    quantized together wherever settings and shape agree (the layers of a transformer), so
    GPTQ's column loop runs once per shape instead of once per layer.
    """
    jobs: dict[tuple, list[tuple[list[str], torch.Tensor, torch.Tensor | None]]] = {}
    for group in plan.groups.values():
        gram = transformed_gram(inputs[group.name], transforms[group.name])
        # the raw Gram is consumed here: all groups' transformed Grams are held at once (for
        # batching), in the memory the raw ones free
        inputs[group.name].gram = None
        same: dict[tuple, list[str]] = {}
        for name in group.sites:
            if plan.sites[name].config.w_quantized:
                same.setdefault(_weight_settings(plan.sites[name].config), []).append(name)
        for settings, names in same.items():
            stacked = torch.cat([weights[n] for n in names])
            jobs.setdefault((settings, tuple(stacked.shape)), []).append((names, stacked, gram))
    quantized = {}
    for (settings, _), batch in jobs.items():
        bits, group_size, clip, method, symmetric = settings
        # a group's Gram exists when any of its sites needs one: pass it only where these settings do
        grams = [gram for _, _, gram in batch] if method == "gptq" or clip == "mse" else None
        results = quantize_weights([w for _, w, _ in batch], bits, group_size=group_size, symmetric=symmetric,
                                   clip=clip, method=method, grams=grams)
        for (names, _, _), stacked in zip(batch, results, strict=True):
            quantized.update(_split_rows(stacked, names, weights))
    for name, qw in quantized.items():
        plan.sites[name].stats["weight_error"] = weight_error(weights[name], qw)
        if keep_float:
            plan.sites[name].stats["weight_float"] = weights[name]
    return quantized


def _split_rows(stacked: QuantizedWeight, names: list[str], weights: dict[str, torch.Tensor]
                ) -> dict[str, QuantizedWeight]:
    """The quantized rows of each site, back out of its group's stacked matrix."""
    out, start = {}, 0
    for name in names:
        rows = slice(start, start + weights[name].shape[0])
        start = rows.stop
        out[name] = dataclasses.replace(stacked, codes=stacked.codes[rows], scale=stacked.scale[rows],
                                        zero=None if stacked.zero is None else stacked.zero[rows])
    return out


def _weight_settings(c: QuantConfig) -> tuple:
    return c.w_bits, c.w_group_size, c.w_clip, c.w_method, c.w_symmetric


def transformed_gram(stats: InputStats, t: Transform) -> torch.Tensor | None:
    return None if stats.gram is None else transform_gram(stats.gram, t)


def weight_error(weight: torch.Tensor, qw: QuantizedWeight) -> float:
    """Relative Frobenius error of the quantized weight, for the plan and the dump."""
    return float((dequantize_weight(qw) - weight).norm() / weight.norm().clamp(min=1e-12))


def activation_scale(config: QuantConfig, stats: RangeStats) -> torch.Tensor:
    """Static symmetric scale: the configured percentile of |x| over all calibration tokens / qmax."""
    qmax = 2 ** (config.a_bits - 1) - 1
    return (stats.percentile(config.a_percentile) / qmax).clamp(min=1e-8)
