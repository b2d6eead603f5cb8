"""solve: calibration statistics -> transforms, quantized weights and activation scales.

Pure math over tensors (the FX graph is not touched here): the stage between calibration and
rewrite, one function per kind of constant.
"""

from __future__ import annotations

import torch

from .calibrate import InputStats, RangeStats
from .config import QuantConfig
from .duquant import Transform, apply_to_activation, apply_to_weight, build_transform, transform_gram
from .plan import Group
from .quant import QuantizedWeight, dequantize_weight, quantize_weight


def needs_gram(config: QuantConfig) -> bool:
    return config.w_quantized and (config.w_clip == "mse" or config.w_method == "gptq")


def solve_transform(group: Group, stats: InputStats, weights: list[torch.Tensor], index: int) -> Transform:
    """The group's DuQuant transform; each group draws its own seeded random matrices."""
    c = group.config
    t = build_transform(stats.rows, stats.absmax, torch.cat(weights).float(), alpha=c.smooth_alpha,
                        block_size=c.block_size, steps=c.rotation_steps, permute=c.permute,
                        seed=c.seed * 1_000_003 + index)
    # before and after on the same sampled rows, so the two are comparable
    before, after = stats.rows.abs(), apply_to_activation(stats.rows, t).abs()
    group.stats.update(tokens=stats.tokens, sampled_rows=before.shape[0], absmax_all=stats.absmax.clone(),
                       absmax_before=before.amax(0), absmax_after=after.amax(0),
                       mean_abs_before=float(before.mean()), mean_abs_after=float(after.mean()))
    return t


def solve_weight(config: QuantConfig, weight: torch.Tensor, gram: torch.Tensor | None) -> QuantizedWeight:
    """Quantize one transformed weight (gram: X^T X of the transformed input, or None)."""
    return quantize_weight(weight, config.w_bits, group_size=config.w_group_size,
                           symmetric=config.w_symmetric, clip=config.w_clip, method=config.w_method, gram=gram)


def transformed_gram(stats: InputStats, t: Transform) -> torch.Tensor | None:
    return None if stats.gram is None else transform_gram(stats.gram, t)


def weight_error(weight: torch.Tensor, qw: QuantizedWeight) -> float:
    """Relative Frobenius error of the quantized weight, for the plan and the dump."""
    return float((dequantize_weight(qw) - weight).norm() / weight.norm().clamp(min=1e-12))


def activation_scale(config: QuantConfig, stats: RangeStats) -> torch.Tensor:
    """Static symmetric scale: the configured percentile of |x| over all calibration tokens / qmax."""
    qmax = 2 ** (config.a_bits - 1) - 1
    return (stats.percentile(config.a_percentile) / qmax).clamp(min=1e-8)


__all__ = ["activation_scale", "apply_to_weight", "needs_gram", "solve_transform", "solve_weight",
           "transformed_gram", "weight_error"]
