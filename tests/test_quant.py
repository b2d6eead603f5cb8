"""Tests of fxquant.quant: pure tensor math, CPU, seeded."""

from __future__ import annotations

import math

import pytest
import torch

from fxquant.quant import (
    dequantize_weight,
    pack_int4,
    percentile_from_histogram,
    quantize_weight,
    unpack_int4,
    weight_scales,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _weight(out: int = 64, cols: int = 256, seed: int = 0) -> torch.Tensor:
    # Heavy-tailed rows (a few large entries), as in trained layers: clipping can pay off.
    w = torch.randn(out, cols, generator=_gen(seed)) / math.sqrt(cols)
    w[torch.rand(out, cols, generator=_gen(seed + 1)) < 0.01] *= 8
    return w


def _expand(t: torch.Tensor, cols: int) -> torch.Tensor:
    return t.repeat_interleave(cols // t.shape[1], dim=1)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(("group_size", "clip"), [(None, "mse"), (32, "minmax"), (64, 0.9)])
def test_codes_within_range_and_shapes(bits, symmetric, group_size, clip):
    w = _weight()
    qw = quantize_weight(w, bits, group_size=group_size, symmetric=symmetric, clip=clip)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    assert qw.codes.dtype == (torch.uint8 if bits == 8 and not symmetric else torch.int8)
    assert qw.codes.shape == w.shape
    assert lo <= int(qw.codes.min()) and int(qw.codes.max()) <= hi
    groups = 1 if group_size is None else 256 // group_size
    assert qw.scale.shape == (64, groups) and qw.scale.dtype == torch.float32 and (qw.scale > 0).all()
    assert (qw.zero is None) == symmetric
    if not symmetric:
        assert qw.zero.shape == (64, groups) and (qw.zero >= 0).all() and (qw.zero <= hi).all()
    assert dequantize_weight(qw).dtype == torch.float32


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [None, 32])
def test_minmax_error_at_most_half_a_step(symmetric, group_size):
    w = _weight()
    qw = quantize_weight(w, 4, group_size=group_size, symmetric=symmetric, clip="minmax")
    err = (dequantize_weight(qw) - w).abs()
    half = _expand(qw.scale, 256) / 2
    assert (err <= half * (1 + 1e-5) + 1e-7).all(), f"worst error / half step {float((err / half).max()):.4f}"


def test_zero_rows_stay_zero():
    w = _weight()
    w[3] = 0
    for symmetric in (True, False):
        qw = quantize_weight(w, 4, symmetric=symmetric, clip="mse")
        deq = dequantize_weight(qw)
        assert torch.isfinite(qw.scale).all() and torch.equal(deq[3], torch.zeros(256))


def test_mse_clip_never_worse_than_minmax():
    w = _weight(seed=2)
    cols = w.shape[1]
    x = torch.randn(4096, cols, generator=_gen(3)) * torch.linspace(0.2, 3.0, cols)  # independent channels
    gram = (x.T @ x).double()
    d = gram.diagonal().float()
    for bits, symmetric in ((3, True), (4, True), (4, False)):
        mse = quantize_weight(w, bits, symmetric=symmetric, clip="mse", gram=gram)
        mm = quantize_weight(w, bits, symmetric=symmetric, clip="minmax", gram=gram)
        # Per row, the searched objective itself can never lose: ratio 1.0 is in the grid.
        obj_mse = ((w - dequantize_weight(mse)).square() * d).sum(1)
        obj_mm = ((w - dequantize_weight(mm)).square() * d).sum(1)
        assert (obj_mse <= obj_mm * (1 + 1e-6)).all()
        out_mse = float((x @ (w - dequantize_weight(mse)).T).square().mean())
        out_mm = float((x @ (w - dequantize_weight(mm)).T).square().mean())
        assert out_mse <= out_mm, f"{bits}b sym={symmetric}: output MSE mse-clip {out_mse:.3e} vs minmax {out_mm:.3e}"


def test_weight_scales_clip_ratio_and_validation():
    w = _weight()
    full, _ = weight_scales(w, 4, group_size=None, symmetric=True, clip="minmax")
    half, _ = weight_scales(w, 4, group_size=None, symmetric=True, clip=0.5)
    torch.testing.assert_close(half, full * 0.5)
    torch.testing.assert_close(full[:, 0], w.abs().amax(1) / 7)
    with pytest.raises(ValueError, match="clip"):
        weight_scales(w, 4, group_size=None, symmetric=True, clip="best")
    with pytest.raises(ValueError, match="clip ratio"):
        weight_scales(w, 4, group_size=None, symmetric=True, clip=1.5)
    with pytest.raises(ValueError, match="bits"):
        quantize_weight(w, 16)


def test_gptq_beats_rtn_on_correlated_inputs():
    cols = 128
    w = _weight(out=96, cols=cols, seed=4)
    mix = torch.randn(cols, cols, generator=_gen(5)) / math.sqrt(cols)
    x = torch.randn(2048, cols, generator=_gen(6)) @ (torch.eye(cols) + 2 * mix)  # correlated channels
    gram = x.double().T @ x.double()

    def out_mse(qw) -> float:
        return float((x @ (w - dequantize_weight(qw)).T).square().mean())

    for group_size, symmetric in ((None, True), (32, False)):
        kw = dict(group_size=group_size, symmetric=symmetric, clip="minmax", gram=gram)
        rtn = out_mse(quantize_weight(w, 4, method="rtn", **kw))
        gptq = out_mse(quantize_weight(w, 4, method="gptq", **kw))
        assert gptq < 0.9 * rtn, f"group {group_size}: output MSE gptq {gptq:.3e} vs rtn {rtn:.3e}"


def test_gptq_handles_dead_columns_and_needs_gram():
    cols = 64
    w = _weight(out=32, cols=cols, seed=7)
    x = torch.randn(512, cols, generator=_gen(8))
    x[:, 10] = 0  # a channel that never fires: zero row/col in the Gram
    gram = x.double().T @ x.double()
    qw = quantize_weight(w, 4, method="gptq", gram=gram, clip="mse")
    deq = dequantize_weight(qw)
    assert torch.isfinite(deq).all()
    rtn = quantize_weight(w, 4, method="rtn", gram=gram, clip="mse")
    assert torch.equal(qw.scale, rtn.scale), "gptq keeps the scales fixed beforehand"
    torch.testing.assert_close(deq[:, 10], dequantize_weight(rtn)[:, 10])  # dead column: plain RTN
    with pytest.raises(ValueError, match="gram"):
        quantize_weight(w, 4, method="gptq")
    with pytest.raises(ValueError, match="method"):
        quantize_weight(w, 4, method="awq")


def test_group_size_helps_and_must_divide():
    w = _weight()
    w[:, :32] *= 20  # one loud column block: per-channel scales waste levels on the rest
    err_pc = float((dequantize_weight(quantize_weight(w, 4, clip="minmax")) - w)[:, 32:].square().sum())
    qw = quantize_weight(w, 4, group_size=32, clip="minmax")
    err_g = float((dequantize_weight(qw) - w)[:, 32:].square().sum())
    assert qw.scale.shape == (64, 8) and qw.group_size == 32
    assert err_g < 0.1 * err_pc, f"quiet columns' squared error: group-32 {err_g:.3e} vs per-channel {err_pc:.3e}"
    with pytest.raises(ValueError, match=r"group_size 48.*256"):
        quantize_weight(w, 4, group_size=48)


@pytest.mark.parametrize(("signed", "lo", "hi"), [(True, -8, 8), (False, 0, 16)])
def test_pack_unpack_round_trip(signed, lo, hi):
    codes = torch.randint(lo, hi, (16, 64), generator=_gen(9), dtype=torch.int8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (16, 32)
    assert torch.equal(unpack_int4(packed, signed=signed), codes)


def test_pack_layout_and_validation():
    assert pack_int4(torch.tensor([[1, -1]], dtype=torch.int8)).tolist() == [[0xF1]]  # low nibble first
    with pytest.raises(ValueError, match="even"):
        pack_int4(torch.zeros(2, 3, dtype=torch.int8))
    with pytest.raises(ValueError, match="fit neither"):
        pack_int4(torch.tensor([[-1, 9]], dtype=torch.int8))


def test_quantized_codes_pack_losslessly():
    qw = quantize_weight(_weight(), 4, symmetric=True, clip="mse")
    assert torch.equal(unpack_int4(pack_int4(qw.codes), signed=True), qw.codes)


def test_percentile_from_histogram_matches_quantile():
    sample = torch.randn(20000, generator=_gen(10)).abs() * 3
    bins = 512
    upper = 2.0 ** math.ceil(math.log2(float(sample.max())))
    counts = torch.bincount((sample / upper * bins).long().clamp(max=bins - 1), minlength=bins)
    width = upper / bins
    for q in (10.0, 50.0, 90.0, 99.0, 99.9, 100.0):
        got = percentile_from_histogram(counts, upper, q)
        want = float(torch.quantile(sample, q / 100))
        assert abs(got - want) <= width, f"q={q}: histogram {got:.4f} vs quantile {want:.4f} (bin {width:.4f})"
    with pytest.raises(ValueError, match="percentile"):
        percentile_from_histogram(counts, upper, 0.0)
    with pytest.raises(ValueError, match="empty"):
        percentile_from_histogram(torch.zeros(8), 1.0, 50.0)
