"""solve: calibration statistics -> transforms, quantized weights and activation scales.

Pure math over tensors (the FX graph is not touched here): the stage between calibration and
rewrite, one function per kind of constant.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from .calibrate import InputStats, RangeStats, progress
from .capture import TORCH_LOCK
from .config import QuantConfig
from .duquant import GroupSample, Transform, apply_to_activation, build_transforms, transform_gram
from .plan import Group, QuantPlan
from .quant import QuantizedWeight, dequantize_weight, quantize_weights


def needs_gram(config: QuantConfig) -> bool:
    return config.w_quantized and (config.w_clip == "mse" or config.w_method == "gptq")


def group_sample(group: Group, stats: InputStats, weights: list[torch.Tensor], index: int) -> GroupSample:
    """What the transform search reads for a group; each group (its index in the plan) draws its own
    seeded matrices."""
    c = group.config
    return GroupSample(stats.rows, stats.absmax, torch.cat(weights), alpha=c.smooth_alpha, block_size=c.block_size,
                       steps=c.rotation_steps, permute=c.permute, seed=c.seed * 1_000_003 + index)


def solve_transforms(groups: list[Group], inputs: dict[str, InputStats],
                     weights: dict[str, torch.Tensor]) -> dict[str, Transform]:
    """Every group's transform, plus the before/after statistics the plan table and dump show.

    Groups of the same shape are searched in lockstep batches (one call per step for the batch),
    the batches side by side on as many worker threads as torch has, each running its tensor ops
    on one thread: a step is many small ops, so batches side by side use the cores better than
    threads inside one op. Results do not depend on batching or scheduling (each group has its own
    seeded generator, and every float64 product the search decides on runs on one thread).
    """
    samples = [group_sample(g, inputs[g.name], [weights[s] for s in g.sites], i) for i, g in enumerate(groups)]
    # torch.set_num_threads sets the calling thread's count and the one every new thread starts
    # with, process-wide. The workers set their own; the process-wide count is put back from a
    # thread of its own (this one's count is never touched), all under the lock, so no other
    # fxquant call starts a thread while it is 1.
    with TORCH_LOCK:
        start = _on_new_thread(torch.get_num_threads)  # what a new thread starts with
        threads = torch.get_num_threads()
        batches = _lockstep_batches(samples, threads)
        try:
            with ThreadPoolExecutor(threads, initializer=torch.set_num_threads, initargs=(1,)) as pool:
                done = list(progress(pool.map(lambda batch: build_transforms([samples[i] for i in batch]), batches),
                                     "fxquant solve", unit="batch", total=len(batches)))
                found = {groups[i].name: t for batch, ts in zip(batches, done, strict=True)
                         for i, t in zip(batch, ts, strict=True)}
                list(pool.map(lambda g: _record_effect(g, inputs[g.name], found[g.name]), groups))
        finally:
            _on_new_thread(lambda: torch.set_num_threads(start))
    return found


def _on_new_thread(fn: Callable[[], Any]) -> Any:
    with ThreadPoolExecutor(1) as one:
        return one.submit(fn).result()


_LOCKSTEP_BYTES = 1 << 28  # float64 sample rows per lockstep batch (a batch holds ~3x this in all)


def _lockstep_batches(samples: list[GroupSample], workers: int) -> list[list[int]]:
    """Indices of samples, cut into batches of one shape: at least `workers` batches per shape
    when there are enough groups, each under _LOCKSTEP_BYTES of float64 rows."""
    by_shape: dict[tuple, list[int]] = {}
    for i, s in enumerate(samples):
        by_shape.setdefault((tuple(s.rows.shape), s.block_size, s.steps), []).append(i)
    batches = []
    for members in by_shape.values():
        size = max(1, min(-(-len(members) // workers), _LOCKSTEP_BYTES // (8 * samples[members[0]].rows.numel())))
        batches += [members[i:i + size] for i in range(0, len(members), size)]
    # longest first (a step costs about rows x block size per group), so the last ones even out the workers
    return sorted(batches, key=lambda b: -samples[b[0]].rows.numel() * samples[b[0]].block_size * len(b))


def _record_effect(group: Group, stats: InputStats, t: Transform) -> None:
    # before and after on the same sampled rows, so the two are comparable
    before, after = stats.rows.abs(), apply_to_activation(stats.rows, t).abs()
    group.stats.update(tokens=stats.tokens, sampled_rows=before.shape[0], absmax_all=stats.absmax.clone(),
                       absmax_before=before.amax(0), absmax_after=after.amax(0),
                       mean_abs_before=float(before.mean()), mean_abs_after=float(after.mean()))


def solve_weights(plan: QuantPlan, groups: list[Group], inputs: dict[str, InputStats],
                  transforms: dict[str, Transform], weights: dict[str, torch.Tensor],
                  keep_float: bool = False) -> dict[str, QuantizedWeight]:
    """Quantize the transformed weights of ``groups`` with their group's transformed Gram matrix
    (consuming the raw Gram matrices of ``inputs``).

    Sites of a group with the same weight settings are quantized as one matrix (their rows
    stacked): every quantizer here works row by row, so this is exact. Those matrices are then
    quantized together wherever settings and shape agree (the layers of a transformer), so
    GPTQ's column loop runs once per shape instead of once per layer.
    """
    jobs: dict[tuple, list[tuple[list[str], torch.Tensor, torch.Tensor | None]]] = {}
    for group in groups:
        gram = transformed_gram(inputs[group.name], transforms[group.name])
        # the raw Gram is consumed here: the groups' transformed Grams are held at once (for
        # batching), in the memory the raw ones free
        inputs[group.name].drop_gram()
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


def gram_sets(groups: list[Group], sizes: dict[str, int], budget_bytes: float) -> list[list[Group]]:
    """``groups`` split, in order, into sets whose Gram statistics (``sizes`` bytes by group name)
    together fit ``budget_bytes`` (a group larger than the budget alone in its set; groups without
    a size go with their neighbours)."""
    sets: list[list[Group]] = [[]]
    used = 0
    for group in groups:
        size = sizes.get(group.name, 0)
        if size and used and used + size > budget_bytes:
            sets.append([])
            used = 0
        sets[-1].append(group)
        used += size
    return sets


def transformed_gram(stats: InputStats, t: Transform) -> torch.Tensor | None:
    """The Gram matrix of the transformed input X T: from the transformed rows while those are kept
    (float32, as the graph transforms them), else T^T H T of the raw matrix (float64)."""
    if stats.gram_stats is None:
        return None
    made = stats.gram_stats.transformed(lambda x: apply_to_activation(x, t))
    return made if made is not None else transform_gram(stats.gram, t)


def weight_error(weight: torch.Tensor, qw: QuantizedWeight) -> float:
    """Relative Frobenius error of the quantized weight, for the plan and the dump."""
    return float((dequantize_weight(qw) - weight).norm() / weight.norm().clamp(min=1e-12))


def activation_scale(config: QuantConfig, stats: RangeStats) -> torch.Tensor:
    """Static symmetric scale: the configured percentile of |x| over all calibration tokens / qmax."""
    qmax = 2 ** (config.a_bits - 1) - 1
    return (stats.percentile(config.a_percentile) / qmax).clamp(min=1e-8)
