"""The greedy DuQuant block rotation (tensors only): seed matrices and the exact, pruned search.

From R = I, each step spreads the channel holding the largest |entry| of rows @ R with the seed
matrix S_e (docs/duquant.md); the prefix of steps with the smallest range (max - min over all
entries) is the rotation. Every max, min and argmax the search decides on is the float64 value,
so the pruned search returns bit for bit what the exhaustive one does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from . import ops

_CHUNK = 16  # rows per screening reduction and per exact float64 GEMM in the greedy search
_SCREEN_TILE = 1 << 20  # about this many screened entries per GEMM: 4 MB of int32 output per call
_QMAX = 127  # int8 screening: B * 127^2 < 2^31 (exact int32 sums) for any B whose (B, B) float64 fits in memory
_FLOAT_EXACT = 1 << 24  # a float32 sum of integer products is exact below this


def _screen_dtype(block: int) -> torch.dtype:
    """int8 codes go through torch._int_mm where it is fast; elsewhere they are held as float32 and
    multiplied by a float32 GEMM, which gives the same integers while B * 127^2 < 2^24 (B <= 1040)."""
    return torch.int8 if ops.fast_int8_gemm() or block * _QMAX**2 >= _FLOAT_EXACT else torch.float32
_U64 = 2.0**-53
_NORM_SLACK = 1e-6  # relative margin: a computed |x @ R| may exceed ||x|| by rounding (~1e-13)


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


def greedy_rotation(
    rows: Tensor, block_size: int, steps: int, generator: torch.Generator, *, prune: bool = True
) -> Tensor:
    """Greedy DuQuant rotation for rows (N, D) viewed as (-1, B); returns float64 (B, B).

    Draws its seed matrix from ``generator``, then runs greedy_rotations on this one problem.
    """
    b = block_size
    if rows.ndim != 2 or rows.shape[1] % b:
        raise ValueError(f"greedy_rotation: rows {tuple(rows.shape)} must be (N, D) with D % {b} == 0")
    x = rows.detach().to(torch.float64).reshape(-1, b)
    return greedy_rotations([x], seed_matrix(b, generator)[None], steps, prune=prune)[0]


def greedy_rotations(rows: Sequence[Tensor], seeds: Tensor, steps: int, *, prune: bool = True) -> Tensor:
    """The greedy rotation of G independent problems in lockstep: G float64 rows (M, B), seeds (G, B, B).

    Returns (G, B, B) float64. Each step spreads the channel of the largest |entry| with S_e (the
    group's seed with rows and cols 0, e swapped); the prefix of steps with the smallest global
    range (max - min) wins. Rows are sorted by norm (stable) and cut in chunks of _CHUNK; ties of
    |entry| go to the first in that order. Each step screens each group's rows with an int8 GEMM
    (_Screen), then recomputes in float64 only the chunks that can hold the max or min (the screen's
    error is bounded by a margin from the measured quantization errors), so every decision is exact.
    prune=False recomputes every chunk in float64 at every step and gives the same matrices. Running
    the groups side by side makes the float64 recomputation, the argmax and the rotation update one
    call per step for all of them: per group those are small ops whose per-call cost would otherwise
    dominate.
    """
    (g, (m, b)), c = (len(rows), rows[0].shape), _CHUNK
    norms = torch.stack([torch.linalg.vector_norm(x, dim=1) for x in rows])
    if not torch.isfinite(norms).all():  # a row's norm is finite iff its entries are (float32-sized data)
        raise ValueError("greedy_rotation: calibration rows contain inf/nan (or values too large for float64)")
    r = torch.eye(b, dtype=torch.float64).repeat(g, 1, 1)
    if m == 0 or steps <= 0:
        return r
    order = torch.sort(norms, dim=1, descending=True, stable=True).indices
    k = -(-m // c)  # chunks; padding repeats the last row, changing no max or min
    order = torch.cat([order, order[:, -1:].expand(g, k * c - m)], dim=1)
    ns = norms.gather(1, order)
    xs = rows[0].new_empty(g, k * c, b)
    for x, o, out in zip(rows, order, xs, strict=True):
        torch.index_select(x, 0, o, out=out)
    top = ns[:, ::c]  # each chunk's largest norm
    screen = _Screen(xs, top) if prune else None
    groups = torch.arange(g)
    best_range, best_r = torch.full((g,), math.inf, dtype=torch.float64), r
    for step in range(steps + 1):
        hit = screen.candidates(r) if screen else torch.ones(g, k, dtype=torch.bool)
        # Exact values, always from the same (c, B) @ (B, B) product per chunk: a GEMM's rounding
        # for a row depends on the matrix height (MKL's row-remainder kernel), so the pruned and
        # exhaustive searches must not batch rows differently.
        owner, chunk = hit.nonzero(as_tuple=True)  # sorted by group, then chunk
        blocks, vals = xs.view(g, k, c, b)[owner, chunk], xs.new_empty(len(owner), c, b)
        start = 0
        for i, count in enumerate(torch.bincount(owner, minlength=g).tolist()):
            torch.bmm(blocks[start : start + count], r[i].expand(count, b, b), out=vals[start : start + count])
            start += count
        vals = vals.view(len(owner), -1)
        top_chunk, low_chunk = vals.amax(1), vals.amin(1)
        hi = vals.new_full((g,), -math.inf).scatter_reduce(0, owner, top_chunk, "amax")
        lo = vals.new_full((g,), math.inf).scatter_reduce(0, owner, low_chunk, "amin")
        better = hi - lo < best_range  # strict: the earliest (shortest) prefix wins ties
        best_range, best_r = torch.where(better, hi - lo, best_range), torch.where(better[:, None, None], r, best_r)
        if step == steps:
            break
        # the first entry (in sorted order) holding the largest |value|, in each group, searched
        # only in the chunks whose max or min reaches it
        target = torch.maximum(hi, -lo)[owner]
        holds = ((top_chunk == target) | (-low_chunk == target)).nonzero()[:, 0]
        at = vals[holds].abs() == target[holds, None]
        position = chunk[holds] * (c * b) + at.int().argmax(1)
        first = position.new_full((g,), k * c * b).scatter_reduce(0, owner[holds], position, "amin")
        swap = torch.arange(b).repeat(g, 1)  # S_e: the seed with rows and columns 0 and e swapped
        swap[groups, first % b], swap[:, 0] = 0, first % b
        spread = seeds.gather(1, swap[:, :, None].expand(-1, -1, b)).gather(2, swap[:, None, :].expand(-1, b, -1))
        r = torch.bmm(r, spread)
    return best_r


class _Screen:
    """The cheap first pass of greedy_rotations: which chunks can hold each group's max or min.

    Screens with an exact int8 GEMM: each chunk of rows is scaled to int8 by its largest |entry|,
    the rotation by its own; the quantization errors are measured (float64 norms), so the gap between
    a screened and an exact value has a proven bound, the margin. Rows are sorted by norm and an
    orthogonal map keeps norms, so a group screens only a prefix of its chunks: rows whose norm is
    below both |max| and |min| of the screened rows cannot matter. The prefix only grows (so GEMM
    shapes repeat from step to step).
    """

    def __init__(self, xs: Tensor, top: Tensor) -> None:
        c, (g, rows, b) = _CHUNK, xs.shape
        self.chunks = k = rows // c
        chunked = xs.view(g, k, c * b)
        largest = torch.maximum(chunked.amax(2), chunked.amin(2).neg_())
        self.scale = torch.where(largest > 0, largest / _QMAX, 1.0)  # (G, chunks) float64
        # the largest entry maps to 127; the clamp only matters where the scale rounds (subnormals),
        # and the measured error below is of the clamped codes
        q = torch.div(chunked, self.scale[..., None]).round_().clamp_(-_QMAX, _QMAX)
        self.dtype = _screen_dtype(b)
        self.xq = q.to(self.dtype).view(g, rows, b)
        # per chunk, the largest ||x_q * scale - x|| of its rows (float64: exact up to rounding slack)
        error = torch.linalg.vector_norm(q.mul_(self.scale[..., None]).sub_(chunked).view(g, k, c, b), dim=3).amax(2)
        self.x_error = error * (1 + _NORM_SLACK) + top * _NORM_SLACK
        self.top = top
        self.bound = torch.cat([top * (1 + _NORM_SLACK), top.new_zeros(g, 1)], 1)  # >= |entry| in chunks i..
        # One group and tile at a time, into a buffer reused at every step: a fresh tensor per step
        # costs more in page faults than the GEMM itself.
        self.per_tile = -(-k // max(1, round(rows * b / _SCREEN_TILE)))  # chunks per GEMM
        acc = torch.int32 if self.dtype == torch.int8 else torch.float32  # exact integers either way
        self.gemm = torch._int_mm if self.dtype == torch.int8 else torch.mm
        self.out = torch.empty(self.per_tile * c, b, dtype=acc)
        # per chunk, the screened max and min of x_q @ r_q (exact integers)
        self.imax = torch.zeros(g, k, dtype=acc)
        self.imin = torch.zeros(g, k, dtype=acc)
        # the prefix grows by whole steps of 1/16 of the chunks: each new GEMM shape costs oneDNN a
        # kernel build (about one GEMM's time), so shapes must repeat
        self.grain = -(-k // 16)
        self.screened = torch.full((g,), self.grain, dtype=torch.long)  # chunks in each group's prefix

    def quantize(self, r: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """r as int8 codes (G, B, B); the float64 scale (G, chunks) of x_q @ r_q; and the margin (G, chunks):
        |screened - exact| per entry is below it (exact: the float64 product the search decides on)."""
        r_scale = r.abs().amax((1, 2)) / _QMAX
        r_q = torch.div(r, r_scale[:, None, None]).round_().clamp_(-_QMAX, _QMAX)
        # per entry, |x~ r~_j - x r_j| <= ||x~ - x|| ||r~_j|| + ||x|| ||r~_j - r_j||, ||r_j|| = 1; then
        # float64's rounding of the exact product (B + 2 units), and slack for the scaling's own rounding
        r_error = torch.linalg.vector_norm(r_q * r_scale[:, None, None] - r, dim=1).amax(1)[:, None]
        r_error = r_error * (1 + _NORM_SLACK) + 1e-12
        # float64's rounding is relative only above the subnormals: 1e-290 covers its absolute part
        margin = (self.x_error * (1 + r_error) + self.top * (r_error + (r.shape[-1] + 2) * _U64)) * (1 + _NORM_SLACK)
        margin += 1e-290
        return r_q.to(self.dtype), self.scale * r_scale[:, None], margin

    def candidates(self, r: Tensor) -> Tensor:
        """(G, chunks) bool: chunks whose rows may hold the max or the min of rows @ r."""
        k = self.chunks
        r_q, scale, margin = self.quantize(r)
        start, todo = [0] * len(r), range(len(r))
        while True:
            ends = self.screened.tolist()
            for i in todo:
                self._screen(i, r_q[i], start[i], ends[i])
            seen = torch.arange(k) < self.screened[:, None]
            smax = torch.where(seen, self.imax * scale, -math.inf)
            smin = torch.where(seen, self.imin * scale, math.inf)
            hi_lb = (smax - margin).amax(1)  # certified: true max >= hi_lb
            lo_ub = (smin + margin).amin(1)  # and true min <= lo_ub
            need = torch.minimum(hi_lb, -lo_ub)
            # unscreened |entries| <= bound[screened]: grow the prefix where that may reach `need`
            grow = (self.screened < k) & (need <= self.bound.gather(1, self.screened[:, None])[:, 0])
            if not grow.any():
                break
            wider = torch.maximum(self.screened + 1, (self.bound[:, :k] >= need[:, None]).sum(1))
            wider = (-(-wider // self.grain) * self.grain).clamp(max=k)
            self.screened = torch.where(grow, torch.where(need <= 0, k, wider), self.screened)
            start, todo = ends, grow.nonzero()[:, 0].tolist()
        return (smax + margin >= hi_lb[:, None]) | (smin - margin <= lo_ub[:, None])

    def _screen(self, i: int, r_q: Tensor, start: int, end: int) -> None:
        """Screen chunks [start, end) of group i into imax / imin, a cache-sized tile at a time."""
        c, b = _CHUNK, r_q.shape[-1]
        for lo in range(start, end, self.per_tile):
            hi = min(end, lo + self.per_tile)
            v = self.gemm(self.xq[i, lo * c : hi * c], r_q, out=self.out[: (hi - lo) * c])
            torch.amax(v.view(-1, c * b), 1, out=self.imax[i, lo:hi])
            torch.amin(v.view(-1, c * b), 1, out=self.imin[i, lo:hi])
