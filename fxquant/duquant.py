"""DuQuant transform math (tensors only, no FX): smoothing, greedy block rotation, zigzag.

For a group of linears y = x @ W.T reading one activation x (..., D), the transform is
    T = diag(1/s) . blockdiag(R1) . P . blockdiag(R2)
applied online as x -> x @ T and offline as W -> W @ T^-T = (W * s) @ blockdiag(R1) P blockdiag(R2),
so (x @ T) @ (W @ T^-T).T == x @ W.T exactly (up to float rounding).
Block rotation of x (..., D) with block size B: x.unflatten(-1, (D // B, B)) @ R, flattened back.
Permutation P: x @ P == x[..., perm]. Rotations are built in float64 and stored as float32.
See docs/duquant.md; the [fxquant] deviations are noted where they are implemented.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor

_MIN_BLOCK = 16  # below this a block rotation spreads outliers too little to be worth it
_MAX_DENSE = 1024  # largest dim for which a dense D x D fallback rotation is acceptable
_CHUNK = 64  # rows per screening reduction and per exact float64 GEMM in the greedy search
_BF16_FAST: bool | None = None  # measured once by _screen_dtype
_NORM_SLACK = 1e-6  # relative margin: a computed |x @ R| may exceed ||x|| by rounding (~1e-13)


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


def _givens_uniform_first_row(b: int) -> Tensor:
    """Orthogonal (b, b) float64 whose row 0 is all 1/sqrt(b) (docs/duquant.md construction)."""
    g = torch.eye(b, dtype=torch.float64)
    for i in range(b - 1):
        c, s = 1.0 / math.sqrt(i + 2), math.sqrt(i + 1) / math.sqrt(i + 2)
        # g = G_i @ g, G_i = [[c, -s], [s, c]] on (i, i+1): only rows i and i+1 change.
        gi, gj = g[i].clone(), g[i + 1].clone()
        g[i], g[i + 1] = c * gi - s * gj, s * gi + c * gj
    # G_{b-2} ... G_0 has a uniform last row (checked numerically); swap it to row 0.
    swap = list(range(b))
    swap[0], swap[-1] = b - 1, 0
    return g[swap][:, swap]


def seed_matrix(block_size: int, generator: torch.Generator) -> Tensor:
    """Float64 (B, B) orthogonal with row 0 all 1/sqrt(B): diag(1, Q) @ Givens, Q random orthogonal.

    Q multiplies from the left: it mixes rows 1..B-1 only, so row 0 (what x @ S_e uses to
    spread channel e evenly) stays uniform; from the right it would not.
    """
    b = block_size
    s = _givens_uniform_first_row(b)
    if b > 1:
        a = torch.randn(b - 1, b - 1, generator=generator, dtype=torch.float64)
        q, r = torch.linalg.qr(a)
        q = q * torch.where(r.diagonal() < 0, -1.0, 1.0)  # sign fix: Haar-distributed Q
        s[1:] = q @ s[1:]
    return s


def _screen_dtype() -> torch.dtype:
    """Cheapest dtype whose GEMM error is bounded, for the first pass of the pruned search.

    bfloat16 (float32 accumulation) where it is fast (AVX512-BF16, AMX: timed once), float32
    where float32 GEMMs are plain IEEE (checked each call), else float64. Only speed depends
    on the choice: the margins make every decision exact.
    """
    global _BF16_FAST
    if _BF16_FAST is None:
        a = torch.rand(4096, 128, generator=torch.Generator().manual_seed(0))  # not the global RNG
        best = {torch.bfloat16: math.inf, torch.float32: math.inf}
        for dt in best:
            ad = a.to(dt)
            for _ in range(3):  # min over calls: the first one may build the kernel
                t0 = time.perf_counter()
                ad @ ad[:128]
                best[dt] = min(best[dt], time.perf_counter() - t0)
        _BF16_FAST = best[torch.bfloat16] < 0.6 * best[torch.float32]
    if _BF16_FAST:
        return torch.bfloat16
    try:
        ieee = torch.backends.mkldnn.matmul.fp32_precision in ("none", "ieee")
    except (AttributeError, RuntimeError):
        ieee = False
    return torch.float32 if ieee else torch.float64


def greedy_rotation(
    rows: Tensor, block_size: int, steps: int, generator: torch.Generator, *, prune: bool = True
) -> Tensor:
    """Greedy DuQuant rotation for rows (N, D) viewed as (-1, B); returns float64 (B, B).

    Each step spreads the channel of the largest |entry| with S_e (the seed with rows and
    cols 0, e swapped); the prefix of steps with the smallest global range (max - min) wins.
    Rows are sorted by norm (stable) and cut in chunks of _CHUNK; ties of |entry| go to the
    first in that order. Each step screens chunks with one cheap GEMM, then recomputes in
    float64 only the chunks that can hold the max or min (the screen's error is bounded by
    a margin from the row norms), so every decision is exact. prune=False screens every chunk in
    float64. prune=True gives the same matrix, but screens in bfloat16/float32 and skips
    chunks by norm: an orthogonal map keeps row norms, so rows whose norm is below both
    |max| and |min| of the screened rows cannot matter.
    """
    b, c = block_size, _CHUNK
    if rows.ndim != 2 or rows.shape[1] % b:
        raise ValueError(f"greedy_rotation: rows {tuple(rows.shape)} must be (N, D) with D % {b} == 0")
    x = rows.detach().to(torch.float64).reshape(-1, b)
    if not torch.isfinite(x).all():
        raise ValueError("greedy_rotation: calibration rows contain inf/nan")
    seed = seed_matrix(b, generator)
    r = torch.eye(b, dtype=torch.float64)
    norms = torch.linalg.vector_norm(x, dim=1)
    if x.shape[0] == 0 or steps <= 0 or norms.max() == 0:
        return r
    order = torch.sort(norms, descending=True, stable=True).indices
    k = -(-x.shape[0] // c)  # chunks; padding repeats the last row, changing no max or min
    order = torch.cat([order, order[-1:].expand(k * c - x.shape[0])])
    ns = norms[order]
    xs, top = x[order], ns[::c]  # top: the largest row norm of each chunk
    # Screening segments: the rows of chunk 0 one by one (norms vary most at the top, and a
    # margin sized for the largest row would swamp the others), then whole chunks.
    seg_chunk = torch.cat([torch.zeros(c, dtype=torch.long), torch.arange(1, k)])
    sd = _screen_dtype() if prune and top[0] < 1e30 else torch.float64
    u_in, u_acc, u64 = (torch.finfo(t).eps / 2 for t in (sd, torch.promote_types(sd, torch.float32), torch.float64))
    # |screened - exact| <= (rounding of x, R, output + accumulation + float64's own) * ||x||
    margin = torch.cat([ns[:c], top[1:]]) * 1.5 * (3 * u_in + (b + 2) * (u_acc + u64)) + 1e-30
    bound = torch.cat([top * (1 + _NORM_SLACK), top.new_zeros(1)])  # >= |entry| in chunks i..
    xsd = xs.to(sd)
    # Screening outputs reuse two buffers: a fresh 12 MB tensor per step costs more in page
    # faults than the GEMM itself.
    screen = torch.empty(k * c, b, dtype=sd)
    screen32 = torch.empty(k * c, b) if sd == torch.bfloat16 else screen
    best_range, best_r, spread = math.inf, r, {}
    n = 1 if prune else k  # screened prefix of chunks: it only grows, so GEMM shapes repeat
    for step in range(steps + 1):
        rsd, done = r.to(sd), 0
        smax, smin = top.new_empty(0), top.new_empty(0)
        while True:
            v = torch.mm(xsd[done * c : n * c], rsd, out=screen[done * c : n * c])
            if v.dtype == torch.bfloat16:  # float32 reductions run 3x faster (and the cast is exact)
                v = screen32[done * c : n * c].copy_(v)
            h = c if done == 0 else 0  # rows reduced one by one (chunk 0)
            smax = torch.cat([smax, v[:h].amax(1).double(), v[h:].view(-1, c * b).amax(1).double()])
            smin = torch.cat([smin, v[:h].amin(1).double(), v[h:].view(-1, c * b).amin(1).double()])
            done, seg = n, c + n - 1
            hi_lb = float((smax - margin[:seg]).max())  # certified: true max >= hi_lb
            lo_ub = float((smin + margin[:seg]).min())  # and true min <= lo_ub
            need = min(hi_lb, -lo_ub)
            if n == k or need > float(bound[n]):  # unscreened |entries| <= bound[n]
                break
            n = k if need <= 0 else min(k, max(n + 1, int((bound[:k] >= need).sum())))
        hit = (smax + margin[:seg] >= hi_lb) | (smin - margin[:seg] <= lo_ub)
        cand = torch.unique(seg_chunk[:seg][hit])
        # Exact values, always from the same (c, B) @ (B, B) GEMM per chunk: a GEMM's rounding
        # for a row depends on the matrix height (MKL's row-remainder kernel), so the pruned
        # and exhaustive searches must not batch chunks differently.
        vals = torch.cat([xs[i * c : (i + 1) * c] @ r for i in cand.tolist()])
        hi, lo = float(vals.max()), float(vals.min())
        if hi - lo < best_range:  # strict: the earliest (shortest) prefix wins ties
            best_range, best_r = hi - lo, r
        if step == steps:
            break
        first = int(torch.nonzero((vals.abs() == max(hi, -lo)).flatten())[0, 0])  # in sorted order
        e = first % b
        if e not in spread:  # S_e: the seed with rows and columns 0 and e swapped
            swap = torch.arange(b)
            swap[0], swap[e] = e, 0
            spread[e] = seed[swap][:, swap]
        r = r @ spread[e]
    return best_r


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


def build_transform(
    rows: Tensor,
    act_absmax: Tensor,
    weight: Tensor,
    *,
    alpha: float | None,
    block_size: int,
    steps: int,
    permute: bool,
    seed: int,
    prune: bool = True,
) -> Transform:
    """Smoothing -> R1 on rows/s -> zigzag on max|.| after R1 -> R2 on the permuted sample.

    rows: bounded calibration sample (N, D) of the raw activation; act_absmax: exact
    per-channel max|x| over all calibration data; weight: the group's weights concatenated
    (out_total, D). Same inputs and seed give a bit-identical Transform, pruned or not (prune=False
    runs the exhaustive search, for benchmarks and tests).
    """
    if rows.ndim != 2:
        raise ValueError(f"build_transform: rows must be (N, D), got {tuple(rows.shape)}")
    d = rows.shape[1]
    if act_absmax.shape != (d,) or weight.ndim != 2 or weight.shape[1] != d:
        raise ValueError(
            f"build_transform: rows {tuple(rows.shape)}, act_absmax {tuple(act_absmax.shape)} and "
            f"weight {tuple(weight.shape)} must agree on D = {d}"
        )
    gen = torch.Generator().manual_seed(seed)
    smooth = None if alpha is None else smoothing_scales(act_absmax, weight, alpha)
    if steps <= 0:
        return Transform(d, smooth, None, None, None, None, note="rotation off (steps = 0)")
    b, note = block_size_for(d, block_size)
    if b is None:
        return Transform(d, smooth, None, None, None, None, note=note)
    notes = []
    x = rows.detach().to(torch.float64)
    if smooth is not None:
        x = x / smooth.to(torch.float64)  # the stored float32 scales, so T is what runs
    r1 = greedy_rotation(x, b, steps, gen, prune=prune)
    x = _block_rotate(x, r1, b)
    perm = None
    if permute and d // b > 1:  # one block: a permutation adds nothing R2 cannot do
        perm = zigzag_permutation(x.abs().amax(dim=0), b)
        if torch.equal(perm, torch.arange(d)):
            perm = None
        else:
            x = x[..., perm]
    r2 = greedy_rotation(x, b, steps, gen, prune=prune)
    rots = []
    for name, r in (("R1", r1), ("R2", r2)):
        if torch.equal(r, torch.eye(b, dtype=torch.float64)):
            notes.append(f"{name} identity: no greedy step lowered the range")
            rots.append(None)
        else:
            rots.append(r.to(torch.float32))
    return Transform(d, smooth, b, rots[0], perm, rots[1], note="; ".join(notes))


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
    """T^T H T in float64 for H = X^T X (D, D): the Gram of the transformed activation."""
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"transform_gram: gram must be square (D, D), got {tuple(gram.shape)}")
    ht = apply_to_activation(gram.to(torch.float64), t)  # H T: T acts on rows of H
    return apply_to_activation(ht.T.contiguous(), t).T  # ((H T)^T T)^T = T^T H T


def as_matrix(t: Transform) -> Tensor:
    """Dense T (D, D) float64, for tests and dumps."""
    return apply_to_activation(torch.eye(t.dim, dtype=torch.float64), t)
