"""Weight quantization math (tensors only, no FX): scales, clip search, RTN, GPTQ, int4 packing.

Conventions (b = bits, 2..8; 16-bit / float is the caller's business and never reaches here):
- symmetric: qmax = 2**(b-1) - 1, codes in [-(qmax+1), qmax], scale = ratio * amax / qmax,
  w ~ code * scale;
- asymmetric: codes in [0, 2**b - 1], lo = ratio * min(min, 0), hi = ratio * max(max, 0),
  scale = (hi - lo) / (2**b - 1), zero = round(-lo / scale), w ~ (code - zero) * scale;
- scale and zero are per output row and per group of `group_size` input columns
  (group_size None: one group per row); all-zero rows get a tiny scale floor, never 0;
- codes are int8 (out, in), except asymmetric 8-bit, whose [0, 255] needs uint8;
  round half to even (torch.round).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import ops
from .ops import unpack_int4  # noqa: F401  the inverse of pack_int4 is the run-time op

_SCALE_FLOOR = 1e-12  # scale of an all-zero row or group: keeps w / scale finite
_MSE_GRID = [1.0 - 0.025 * i for i in range(21)]  # clip ratios 1.00, 0.975, ..., 0.50
_GRID_ELEMS = 1 << 18  # elements per chunk of the clip search: 1 MiB stays in cache (16x faster than 64 MiB)
_GPTQ_BLOCK = 32  # lazy-batch width of GPTQ: 32 keeps the in-block updates cache-sized (2.8x faster than 128)
_GPTQ_OUTER = 512  # columns whose blocks' errors reach the later columns in one GEMM: each such update reads and
# writes all later columns, so on a 6144-wide input blocks of 32 alone took 2x as long (memory-bound)
_TRIANGULAR_STEP = 1024  # columns per triangular solve of the inverse (its upper-triangular right-hand side)
_GPTQ_BATCH_ELEMS = 1 << 26  # weights per GPTQ batch (256 MiB of float32 working copy)


@dataclass(frozen=True)
class QuantizedWeight:
    codes: Tensor  # (out, in) int8 (uint8 for asymmetric 8-bit: codes up to 255)
    scale: Tensor  # (out, n_groups) float32
    zero: Tensor | None  # (out, n_groups) float32 for asymmetric, None for symmetric
    bits: int
    group_size: int | None  # None = per output channel (n_groups = 1)


def _code_range(bits: int, symmetric: bool) -> tuple[int, int]:
    if not 2 <= bits <= 8:
        raise ValueError(f"weight bits must be in 2..8, got {bits}")
    qmax = 2 ** (bits - 1) - 1
    return (-(qmax + 1), qmax) if symmetric else (0, 2**bits - 1)


def _code_dtype(bits: int, symmetric: bool) -> torch.dtype:
    return torch.uint8 if bits == 8 and not symmetric else torch.int8


def _grouped(w: Tensor, group_size: int | None) -> Tensor:
    """(out, in) -> (out, n_groups, gs) float32, checking that groups tile the row."""
    if w.ndim != 2:
        raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(w.shape)}")
    cols = w.shape[1]
    gs = cols if group_size is None else group_size
    if gs < 1 or cols % gs:
        raise ValueError(f"group_size {group_size} must divide in_features {cols}; pick a divisor of {cols}")
    return w.detach().to(torch.float32).reshape(w.shape[0], cols // gs, gs)


def _params(wg: Tensor, ratio: Tensor, bits: int, symmetric: bool) -> tuple[Tensor, Tensor | None]:
    """Scale (and zero) for grouped weights wg (..., gs) at clip ratio(s) broadcast to wg[..., 0]."""
    lo_code, hi_code = _code_range(bits, symmetric)
    if symmetric:
        scale = ratio * wg.abs().amax(-1) / hi_code
        return scale.clamp_min(_SCALE_FLOOR), None
    lo = ratio * wg.amin(-1).clamp_max(0)
    hi = ratio * wg.amax(-1).clamp_min(0)
    scale = ((hi - lo) / hi_code).clamp_min(_SCALE_FLOOR)
    return scale, torch.round(-lo / scale)


def _codes(wg: Tensor, scale: Tensor, zero: Tensor | None, bits: int, out: Tensor | None = None) -> Tensor:
    """Codes as float, clamp(round(wg / s) + z), for wg (..., gs) with scale/zero (...,); into ``out`` if given."""
    lo_code, hi_code = _code_range(bits, zero is None)
    q = torch.div(wg, scale.unsqueeze(-1), out=out).round_()
    if zero is not None:
        q.add_(zero.unsqueeze(-1))
    return q.clamp_(lo_code, hi_code)


def weight_scales(
    w: Tensor,
    bits: int,
    *,
    group_size: int | None,
    symmetric: bool,
    clip: str | float,
    gram_diag: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Per-(row, group) scale and zero (None if symmetric), each (out, n_groups) float32.

    clip: "minmax" (ratio 1), a float ratio in (0, 1], or "mse": per row and group, the ratio
    of the grid 1.00 .. 0.50 minimising sum_j d_j (w_ij - deq_ij)^2 with d = gram_diag (the
    input's second moments, so this is the layer's output error if channels are independent;
    ones when None). Ratio 1.0 is in the grid, so "mse" never loses to "minmax" on that objective.
    """
    wg = _grouped(w, group_size)
    if clip == "minmax" or (isinstance(clip, (int, float)) and not isinstance(clip, bool)):
        ratio = 1.0 if clip == "minmax" else float(clip)
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"clip ratio must be in (0, 1], got {clip}")
        return _params(wg, torch.tensor(ratio), bits, symmetric)
    if clip != "mse":
        raise ValueError(f"clip must be 'minmax', 'mse' or a ratio in (0, 1], got {clip!r}")
    if gram_diag is None:
        d = torch.ones(wg.shape[1:])
    else:
        if gram_diag.shape != (w.shape[1],):
            raise ValueError(f"gram_diag must be ({w.shape[1]},), got {tuple(gram_diag.shape)}")
        d = gram_diag.detach().to(torch.float32).reshape(wg.shape[1:])
    grid = torch.tensor(_MSE_GRID).view(-1, 1, 1)
    best = torch.empty(wg.shape[:2], dtype=torch.long)
    rows = max(1, _GRID_ELEMS // (len(_MSE_GRID) * w.shape[1]))
    # One buffer for every chunk, computed in place: fresh 1 MiB temporaries per op cost more in
    # page faults than the arithmetic. Dequantized: (q - z) * s; (deq - w)^2 == (w - deq)^2 exactly.
    buf = torch.empty(len(_MSE_GRID) * min(rows, wg.shape[0]) * w.shape[1])
    for a in range(0, wg.shape[0], rows):  # chunk rows: the grid multiplies memory by 21
        chunk = wg[a : a + rows]
        scale, zero = _params(chunk.unsqueeze(0), grid, bits, symmetric)
        space = buf[: len(_MSE_GRID) * chunk.numel()].view(-1, *chunk.shape)
        q = _codes(chunk.unsqueeze(0), scale, zero, bits, out=space)
        if zero is not None:
            q.sub_(zero.unsqueeze(-1))
        err = q.mul_(scale.unsqueeze(-1)).sub_(chunk).square_().mul_(d).sum(-1)  # (grid, rows, groups)
        best[a : a + rows] = err.argmin(0)  # first minimum: the largest ratio among ties
    return _params(wg, grid.view(-1)[best], bits, symmetric)


def _gptq_hinv(gram: Tensor) -> Tensor:
    """Upper Cholesky factor (float32) of (H + damp I)^-1, H = X^T X: row i holds column i's
    error feedback onto the later columns, in closed form."""
    # Only the diagonal changes (dampening, dead channels), in float64; the factorisation runs in
    # float32 (as GPTQ does: 2x faster, 4e-6 relative error on SmolLM2's Grams). Building the
    # float32 matrix directly, never a float64 copy or identity, keeps a 16384-wide input's
    # transient memory at a few float32 copies (1 GiB each) instead of float64 ones (2 GiB).
    diagonal = gram.detach().diagonal().to(torch.float64).clone()
    # A dead input channel (never non-zero) has no curvature: make H invertible there; its
    # column is then plain RTN and its error couples to nothing.
    diagonal[diagonal == 0] = 1.0
    damp = 0.01 * diagonal.mean()
    for _ in range(5):
        h = gram.detach().float()
        h.diagonal().copy_(diagonal + damp)
        chol, info = torch.linalg.cholesky_ex(h.flip(0, 1))
        del h
        if info == 0:
            break
        damp = damp * 10  # numerically indefinite Gram: dampen more rather than fail
    else:
        raise ValueError("gptq: the Gram matrix is not positive definite even with heavy dampening")
    # With J the index flip, J chol(J H J) J = V is upper triangular and H = V V^T, so
    # H^-1 = V^-T V^-1: its upper factor is V^-1, one triangular inverse (no second Cholesky).
    v = chol.flip(0, 1)
    del chol
    return _upper_inverse(v)


def _upper_inverse(v: Tensor) -> Tensor:
    """V^-1 of an upper-triangular V, a block of columns at a time: column block j of the inverse
    solves V[:e, :e] X = I[:e, j] (rows below e are zero), a third of the flops of one solve against
    the whole identity (1.5x faster at 6144 wide, where the solve took 2.5x the Cholesky's time)."""
    cols = v.shape[0]
    inverse = torch.zeros(cols, cols)
    for start in range(0, cols, _TRIANGULAR_STEP):
        end = min(start + _TRIANGULAR_STEP, cols)
        rhs = torch.zeros(end, end - start)
        rhs[start:].fill_diagonal_(1.0)
        inverse[:end, start:end] = torch.linalg.solve_triangular(v[:end, :end], rhs, upper=True)
    return inverse


def _gptq_codes(w: Tensor, hinv: Tensor, scale: Tensor, zero: Tensor | None, bits: int, gs: int) -> Tensor:
    """GPTQ (Frantar et al. 2022) with fixed scales, for a batch of same-shaped problems:
    w (n, out, cols), hinv (n, cols, cols) from _gptq_hinv, scale/zero (n, out, groups).
    Columns are quantized in order, each one's error pushed onto the later columns. The column
    loop runs once for the whole batch: per column it is a few small ops, so batching the
    layers of a model that share a shape divides the Python overhead by their number."""
    lo_code, hi_code = _code_range(bits, zero is None)
    cols = w.shape[-1]
    wk = w.detach().to(torch.float32).clone()
    diag = hinv.diagonal(dim1=1, dim2=2)  # (n, cols)
    codes = torch.empty(w.shape, dtype=_code_dtype(bits, zero is None))
    for outer in range(0, cols, _GPTQ_OUTER):
        stop = min(outer + _GPTQ_OUTER, cols)
        errors = torch.empty_like(wk[..., outer:stop])
        for a in range(outer, stop, _GPTQ_BLOCK):
            b = min(a + _GPTQ_BLOCK, stop)
            blk = wk[..., a:b].clone()
            err = errors[..., a - outer:b - outer]
            for i in range(b - a):
                col, g = a + i, (a + i) // gs
                s = scale[..., g]
                z = 0.0 if zero is None else zero[..., g]
                q = (torch.round(blk[..., i] / s) + z).clamp_(lo_code, hi_code)
                codes[..., col] = q
                e = (blk[..., i] - (q - z) * s) / diag[:, col : col + 1]
                blk[..., i + 1 :].baddbmm_(e.unsqueeze(-1), hinv[:, col : col + 1, col + 1 : b], alpha=-1)
                err[..., i] = e
            wk[..., b:stop] -= err @ hinv[:, a:b, b:stop]  # lazy batch: the block's error on the outer block
        wk[..., stop:] -= errors @ hinv[:, outer:stop, stop:]  # and the outer block's on all later columns
    return codes


def quantize_weight(
    w: Tensor,
    bits: int,
    *,
    group_size: int | None = None,
    symmetric: bool = True,
    clip: str | float = "mse",
    method: str = "rtn",
    gram: Tensor | None = None,
) -> QuantizedWeight:
    """Quantize w (out, in). method "rtn": round to nearest; "gptq": needs gram = X^T X (in, in)
    of the layer input. Scales come from weight_scales (clip "mse" weighs by diag(gram))."""
    return quantize_weights([w], bits, group_size=group_size, symmetric=symmetric, clip=clip, method=method,
                            grams=None if gram is None else [gram])[0]


def quantize_weights(
    ws: list[Tensor],
    bits: int,
    *,
    group_size: int | None = None,
    symmetric: bool = True,
    clip: str | float = "mse",
    method: str = "rtn",
    grams: list[Tensor] | None = None,
) -> list[QuantizedWeight]:
    """quantize_weight for weights of one shape, grams[i] belonging to ws[i]; same results,
    but GPTQ runs its column loop once per batch of _GPTQ_BATCH_ELEMS elements."""
    if not ws or any(w.shape != ws[0].shape for w in ws):
        raise ValueError(f"quantize_weights: needs weights of one shape, got {[tuple(w.shape) for w in ws]}")
    if method not in ("rtn", "gptq"):
        raise ValueError(f"method must be 'rtn' or 'gptq', got {method!r}")
    cols = ws[0].shape[1]
    if grams is not None:
        for gram in grams:
            if gram.shape != (cols, cols):
                raise ValueError(f"gram must be ({cols}, {cols}) for weight {tuple(ws[0].shape)}, "
                                 f"got {tuple(gram.shape)}")
    elif method == "gptq":
        raise ValueError("method 'gptq' needs gram = X^T X of the layer input (collect it in calibration)")
    params = [weight_scales(w, bits, group_size=group_size, symmetric=symmetric, clip=clip,
                            gram_diag=None if grams is None else grams[i].diagonal()) for i, w in enumerate(ws)]
    if method == "rtn":
        codes = [_codes(_grouped(w, group_size), *p, bits).reshape(w.shape).to(_code_dtype(bits, symmetric))
                 for w, p in zip(ws, params, strict=True)]
    else:
        per_batch = max(1, _GPTQ_BATCH_ELEMS // ws[0].numel())
        codes = []
        for a in range(0, len(ws), per_batch):
            part = range(a, min(a + per_batch, len(ws)))
            zeros = None if symmetric else torch.stack([params[i][1] for i in part])
            codes += _gptq_codes(torch.stack([ws[i] for i in part]), torch.stack([_gptq_hinv(grams[i]) for i in part]),
                                 torch.stack([params[i][0] for i in part]), zeros, bits, group_size or cols).unbind(0)
    return [QuantizedWeight(c, s, z, bits, group_size) for c, (s, z) in zip(codes, params, strict=True)]


def dequantize_weight(qw: QuantizedWeight) -> Tensor:
    """float32 (out, in) weights from codes, scale and zero (the same function the graph runs)."""
    return ops.dequantize_weight(qw.codes, qw.scale.float(), None if qw.zero is None else qw.zero.float(),
                                 qw.group_size)


def pack_int4(codes: Tensor) -> Tensor:
    """int8 codes in [-8, 7] or [0, 15] -> uint8 (..., in // 2): column 2k in the low nibble,
    column 2k+1 in the high nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even last dim, got shape {tuple(codes.shape)}")
    lo, hi = (int(codes.min()), int(codes.max())) if codes.numel() else (0, 0)
    if lo < -8 or hi > 15 or (lo < 0 and hi > 7):
        raise ValueError(f"pack_int4: codes in [{lo}, {hi}] fit neither [-8, 7] nor [0, 15]")
    nib = codes.to(torch.int16) & 0xF  # two's complement low nibble: -1 -> 15
    return (nib[..., 0::2] | (nib[..., 1::2] << 4)).to(torch.uint8)


def percentile_from_histogram(counts: Tensor, upper: float, q: float) -> float:
    """q-th percentile (q in (0, 100]) of values histogrammed into equal bins over [0, upper].

    Linear within the bin that holds the target rank, so exact to one bin width.
    """
    if not 0.0 < q <= 100.0:
        raise ValueError(f"percentile q must be in (0, 100], got {q}")
    c = counts.detach().to(torch.float64).flatten()
    total = float(c.sum())
    if total <= 0 or upper <= 0:
        raise ValueError(f"percentile of an empty histogram (total count {total}, upper {upper})")
    width = upper / c.numel()
    cum = torch.cumsum(c, 0)
    target = q / 100.0 * total
    i = min(int(torch.searchsorted(cum, torch.tensor([target], dtype=torch.float64))), c.numel() - 1)
    before = float(cum[i - 1]) if i > 0 else 0.0
    frac = (target - before) / float(c[i]) if c[i] > 0 else 1.0
    return (i + min(max(frac, 0.0), 1.0)) * width
