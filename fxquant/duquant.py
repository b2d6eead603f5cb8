"""DuQuant transform math (tensors only, no FX): smoothing, zigzag, and the transform they make with the
greedy rotations (greedy.py).

For a group of linears y = x @ W.T reading one activation x (..., D), the transform is
    T = diag(1/s) . blockdiag(R1) . P . blockdiag(R2)
applied online as x -> x @ T and offline as W -> W @ T^-T = (W * s) @ blockdiag(R1) P blockdiag(R2),
so (x @ T) @ (W @ T^-T).T == x @ W.T exactly (up to float rounding).
Block rotation of x (..., D) with block size B: x.unflatten(-1, (D // B, B)) @ R, flattened back.
Permutation P: x @ P == x[..., perm]. Rotations are built in float64 and stored as float32.
See docs/duquant.md; the [fxquant] deviations are noted where they are implemented.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .greedy import greedy_rotations, seed_matrix

_MIN_BLOCK = 16  # below this a block rotation spreads outliers too little to be worth it
_MAX_DENSE = 1024  # largest dim for which a dense D x D fallback rotation is acceptable


@dataclass(frozen=True)
class Transform:
    """Online x -> x @ T, T = diag(1/smooth) . blockdiag(rot1) . P . blockdiag(rot2); weight W -> W @ T^-T."""

    dim: int
    smooth: Tensor | None  # (dim,) float32, > 0; None = no smoothing
    block_size: int | None  # B dividing dim; None = no rotation
    rot1: Tensor | None  # (B, B) float32 orthogonal; None = identity
    perm: Tensor | None  # (dim,) int64 permutation; None = identity
    rot2: Tensor | None  # (B, B) float32 orthogonal; None = identity
    note: str = ""  # why a step was skipped, for the plan table ("" when nothing skipped)


def block_size_for(dim: int, requested: int) -> tuple[int | None, str]:
    """Largest power of two <= requested that divides dim, with the [fxquant] fallbacks.

    If the search had to go below 16 (and below what was requested): one dense dim x dim
    rotation when dim <= 1024, else no rotation and the returned string says why.
    The string is "" whenever a rotation is possible (dense included).
    """
    if dim < 1 or requested < 1:
        raise ValueError(f"block_size_for: dim ({dim}) and block size ({requested}) must be >= 1")
    top = 1 << (min(requested, dim).bit_length() - 1)
    b = top
    while dim % b:
        b //= 2
    # A requested block below 16 that divides dim is honoured: the user asked for it.
    if b >= _MIN_BLOCK or b == top:
        return b, ""
    if dim <= _MAX_DENSE:
        return dim, ""
    return None, (
        f"rotation skipped: no power-of-two block >= {_MIN_BLOCK} and <= {requested} "
        f"divides dim {dim}, and dim > {_MAX_DENSE} is too large for a dense rotation"
    )


def smoothing_scales(act_absmax: Tensor, weight: Tensor, alpha: float) -> Tensor:
    """SmoothQuant scales s_j = max|X_j|^alpha / max_i|W_ij|^(1-alpha), clamped >= 1e-5.

    [fxquant] `weight` is every linear of the group concatenated on rows. A channel whose
    activation max or weight column is all zero gets s = 1: nothing to balance there, and
    it keeps s finite and the weight column unchanged.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smoothing alpha must be in [0, 1], got {alpha}")
    if weight.ndim != 2 or act_absmax.shape != (weight.shape[1],):
        raise ValueError(
            f"smoothing: act_absmax {tuple(act_absmax.shape)} must be (D,) with D = weight "
            f"columns, weight {tuple(weight.shape)}"
        )
    a = act_absmax.detach().to(torch.float64).abs()
    w = weight.detach().to(torch.float64).abs().amax(dim=0)
    if not (torch.isfinite(a).all() and torch.isfinite(w).all()):
        raise ValueError("smoothing: activation max or weight has inf/nan entries")
    dead = (a == 0) | (w == 0)
    s = a.pow(alpha) / torch.where(dead, 1.0, w).pow(1.0 - alpha)
    s = torch.where(dead, 1.0, s).clamp_min(1e-5)
    return s.to(torch.float32)


def zigzag_permutation(channel_absmax: Tensor, block_size: int) -> Tensor:
    """perm (D,) int64 such that x[..., perm] deals channels ranked by value to blocks in zigzag.

    Ranks go to blocks 0..K-1, K-1..0, 0..K-1, ... (ends repeat), so the K largest channels
    land in K different blocks; each block is then in descending order.
    """
    d = channel_absmax.numel()
    if channel_absmax.ndim != 1 or d % block_size:
        raise ValueError(f"zigzag: channel max {tuple(channel_absmax.shape)} must be (D,) with D % {block_size} == 0")
    k = d // block_size
    ranked = torch.sort(channel_absmax.detach(), descending=True, stable=True).indices
    rank = torch.arange(d)
    c = rank % (2 * k)
    block = torch.where(c < k, c, 2 * k - 1 - c)
    # Within a block the ranks arrive in increasing order, i.e. descending by value.
    return ranked[torch.argsort(block * d + rank)].to(torch.int64)


def _block_rotate(x: Tensor, r: Tensor, b: int) -> Tensor:
    return (x.unflatten(-1, (x.shape[-1] // b, b)) @ r.to(x.dtype)).flatten(-2)


@dataclass(frozen=True)
class GroupSample:
    """What build_transforms needs for one group: its calibration sample, channel maxima and weights.

    rows: bounded calibration sample (N, D) of the raw activation; act_absmax: exact per-channel
    max|x| over all calibration data; weight: the group's weights concatenated (out_total, D);
    seed: seeds the group's own generator (its seed matrices).
    """

    rows: Tensor
    act_absmax: Tensor
    weight: Tensor
    alpha: float | None
    block_size: int
    steps: int
    permute: bool
    seed: int


def build_transform(rows: Tensor, act_absmax: Tensor, weight: Tensor, *, alpha: float | None, block_size: int,
                    steps: int, permute: bool, seed: int, prune: bool = True) -> Transform:
    """Smoothing -> R1 on rows/s -> zigzag on max|.| after R1 -> R2 on the permuted sample.

    Same inputs and seed give a bit-identical Transform, pruned or not (prune=False runs the
    exhaustive search, for benchmarks and tests). See GroupSample for the inputs.
    """
    sample = GroupSample(rows, act_absmax, weight, alpha, block_size, steps, permute, seed)
    return build_transforms([sample], prune=prune)[0]


def build_transforms(samples: Sequence[GroupSample], *, prune: bool = True) -> list[Transform]:
    """build_transform of every group; groups whose searches have the same shape run in lockstep
    (greedy_rotations). The result of a group does not depend on the others given with it."""
    starts = [_start(s) for s in samples]
    found: list[Transform | None] = [s if isinstance(s, Transform) else None for s in starts]
    same_shape: dict[tuple, list[int]] = {}
    for i, s in enumerate(starts):
        if not isinstance(s, Transform):
            same_shape.setdefault((s.x.shape, s.block, s.steps), []).append(i)
    for (_, b, steps), members in same_shape.items():
        batch = [starts[i] for i in members]
        r1 = greedy_rotations([s.x.view(-1, b) for s in batch],
                              torch.stack([seed_matrix(b, s.generator) for s in batch]), steps, prune=prune)
        perms, xs = zip(*(_zigzag(_block_rotate(s.x, r, b), b, s.permute) for s, r in zip(batch, r1, strict=True)),
                        strict=True)
        r2 = greedy_rotations([x.view(-1, b) for x in xs],
                              torch.stack([seed_matrix(b, s.generator) for s in batch]), steps, prune=prune)
        for i, s, a, perm, c in zip(members, batch, r1, perms, r2, strict=True):
            found[i] = _finish(s, a, perm, c)
    return found


@dataclass
class _Search:
    """A group's transform between smoothing and the rotations."""

    dim: int
    smooth: Tensor | None
    block: int
    steps: int
    permute: bool
    x: Tensor  # the sample / smooth, float64 (N, D)
    generator: torch.Generator


def _start(s: GroupSample) -> Transform | _Search:
    """Validate and smooth; a finished Transform when there is nothing to search."""
    if s.rows.ndim != 2:
        raise ValueError(f"build_transform: rows must be (N, D), got {tuple(s.rows.shape)}")
    d = s.rows.shape[1]
    if s.act_absmax.shape != (d,) or s.weight.ndim != 2 or s.weight.shape[1] != d:
        raise ValueError(
            f"build_transform: rows {tuple(s.rows.shape)}, act_absmax {tuple(s.act_absmax.shape)} and "
            f"weight {tuple(s.weight.shape)} must agree on D = {d}"
        )
    gen = torch.Generator().manual_seed(s.seed)
    smooth = None if s.alpha is None else smoothing_scales(s.act_absmax, s.weight, s.alpha)
    if s.steps <= 0:
        return Transform(d, smooth, None, None, None, None, note="rotation off (steps = 0)")
    b, note = block_size_for(d, s.block_size)
    if b is None:
        return Transform(d, smooth, None, None, None, None, note=note)
    x = s.rows.detach().to(torch.float64)
    if smooth is not None:
        x = x / smooth.to(torch.float64)  # the stored float32 scales, so T is what runs
    return _Search(d, smooth, b, s.steps, s.permute, x.contiguous(), gen)


def _zigzag(x: Tensor, b: int, permute: bool) -> tuple[Tensor | None, Tensor]:
    """The zigzag permutation of x (None when off or identity) and x permuted."""
    if not permute or x.shape[1] // b == 1:  # one block: a permutation adds nothing R2 cannot do
        return None, x
    perm = zigzag_permutation(x.abs().amax(dim=0), b)
    if torch.equal(perm, torch.arange(x.shape[1])):
        return None, x
    return perm, x[..., perm].contiguous()


def _finish(s: _Search, r1: Tensor, perm: Tensor | None, r2: Tensor) -> Transform:
    notes, rots = [], []
    for name, r in (("R1", r1), ("R2", r2)):
        if torch.equal(r, torch.eye(s.block, dtype=torch.float64)):
            notes.append(f"{name} identity: no greedy step lowered the range")
            rots.append(None)
        else:
            rots.append(r.to(torch.float32))
    return Transform(s.dim, s.smooth, s.block, rots[0], perm, rots[1], note="; ".join(notes))


def _chain(x: Tensor, t: Transform, divide: bool, what: str) -> Tensor:
    """(x / smooth if divide else x * smooth) @ blockdiag(R1) P blockdiag(R2), in x.dtype."""
    if x.shape[-1] != t.dim:
        raise ValueError(f"{what}: last dim {x.shape[-1]} does not match the transform dim {t.dim}")
    # Half types would lose the transform's precision: compute in float32, cast back.
    y = x if x.dtype in (torch.float32, torch.float64) else x.float()
    if t.smooth is not None:
        y = y / t.smooth.to(y.dtype) if divide else y * t.smooth.to(y.dtype)
    if t.block_size is not None:
        if t.rot1 is not None:
            y = _block_rotate(y, t.rot1, t.block_size)
        if t.perm is not None:
            y = y[..., t.perm]
        if t.rot2 is not None:
            y = _block_rotate(y, t.rot2, t.block_size)
    return y.to(x.dtype)


def apply_to_activation(x: Tensor, t: Transform) -> Tensor:
    """x @ T along the last dim (any leading dims), returned in x.dtype."""
    return _chain(x, t, True, "apply_to_activation")


def apply_to_weight(w: Tensor, t: Transform) -> Tensor:
    """w (out, D) -> w @ T^-T = (w * smooth) @ blockdiag(R1) P blockdiag(R2), in w.dtype."""
    return _chain(w, t, False, "apply_to_weight")


def transform_gram(gram: Tensor, t: Transform) -> Tensor:
    """T^T H T in float64 for H = X^T X (D, D): the Gram of the transformed activation.

    Each factor of T acts on both sides of H in one or two passes over it, never through a
    transposed copy: a 16384-wide Gram is 2 GiB a copy (1.7x faster at 8192 wide than one-sided
    chains with a transpose between)."""
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1] or gram.shape[0] != t.dim:
        raise ValueError(f"transform_gram: gram must be square ({t.dim}, {t.dim}), got {tuple(gram.shape)}")
    h = gram.to(torch.float64)
    if t.smooth is not None:
        inverse = 1.0 / t.smooth.to(torch.float64)
        h = (h * inverse[:, None]).mul_(inverse)  # diag(1/s) H diag(1/s), a new matrix: gram is not touched
    for rotation, perm in ((t.rot1, t.perm), (t.rot2, None)):
        if rotation is not None:  # blockdiag(R)^T H blockdiag(R): R on the columns, then R^T on the rows
            r, (d, b) = rotation.to(torch.float64), (t.dim, t.block_size)
            h = torch.matmul(r.T, (h.view(d, d // b, b) @ r).view(d // b, b, d)).view(d, d)
        if perm is not None:
            h = h[perm[:, None], perm]  # P^T H P
    return h.clone() if h is gram else h  # never the caller's own matrix


def as_matrix(t: Transform) -> Tensor:
    """Dense T (D, D) float64, for tests and dumps."""
    return apply_to_activation(torch.eye(t.dim, dtype=torch.float64), t)
