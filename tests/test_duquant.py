"""Tests of fxquant.duquant: pure tensor math, CPU, seeded."""

from __future__ import annotations

import math

import pytest
import torch

import fxquant.greedy as greedy
from fxquant.duquant import (
    GroupSample,
    Transform,
    apply_to_activation,
    apply_to_weight,
    as_matrix,
    block_size_for,
    build_transform,
    build_transforms,
    smoothing_scales,
    transform_gram,
    zigzag_permutation,
)
from fxquant.greedy import greedy_rotation, seed_matrix


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _outlier_rows(n: int, d: int, seed: int, channels=(3, 77, 200), gain: float = 40.0) -> torch.Tensor:
    x = torch.randn(n, d, generator=_gen(seed))
    x[:, list(channels)] *= gain  # persistent outlier channels, as after an LLM norm
    return x


def _group(d: int = 256, seed: int = 0, n: int = 512) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LLM-like activations: per-token scales, persistent outlier channels, one sink token."""
    rows = _outlier_rows(n, d, seed, channels=(3, 77, min(200, d - 1)))
    rows *= torch.exp(0.5 * torch.randn(n, 1, generator=_gen(seed + 50)))
    rows[0] *= 20
    weight = torch.randn(96, d, generator=_gen(seed + 100)) / math.sqrt(d)
    return rows, rows.abs().amax(0), weight


def _orth_err(r: torch.Tensor) -> float:
    eye = torch.eye(r.shape[0], dtype=r.dtype)
    return float((r @ r.T - eye).abs().max())


@pytest.mark.parametrize("b", [16, 64, 128])
def test_seed_matrix_orthogonal_with_uniform_first_row(b):
    s = seed_matrix(b, _gen(0))
    assert s.dtype == torch.float64 and s.shape == (b, b)
    assert _orth_err(s) < 1e-12
    torch.testing.assert_close(s[0], torch.full((b,), 1 / math.sqrt(b), dtype=torch.float64), rtol=0, atol=1e-12)
    assert not torch.equal(s, seed_matrix(b, _gen(1))), "the random part must depend on the generator"


def test_swapped_seed_spreads_one_channel_evenly():
    b, e = 32, 11
    s = seed_matrix(b, _gen(0))
    swap = torch.arange(b)
    swap[0], swap[e] = e, 0
    x = torch.zeros(b, dtype=torch.float64)
    x[e] = 5.0
    y = x @ s[swap][:, swap]
    torch.testing.assert_close(y, torch.full((b,), 5 / math.sqrt(b), dtype=torch.float64))


def test_zigzag_example_from_the_docs():
    values = torch.arange(16, 0, -1).float()  # channel i has rank i
    perm = zigzag_permutation(values, 4)
    assert perm.dtype == torch.int64
    assert perm.view(4, 4).tolist() == [[0, 7, 8, 15], [1, 6, 9, 14], [2, 5, 10, 13], [3, 4, 11, 12]]


def test_zigzag_follows_values_not_positions():
    ranked = torch.randperm(16, generator=_gen(0))  # ranked[k] = channel of rank k
    values = torch.empty(16)
    values[ranked] = torch.arange(16, 0, -1).float()
    perm = zigzag_permutation(values, 4)
    expected = ranked[torch.tensor([0, 7, 8, 15, 1, 6, 9, 14, 2, 5, 10, 13, 3, 4, 11, 12])]
    assert torch.equal(perm, expected)
    x = torch.randn(2, 3, 16, generator=_gen(1))
    blocks = x[..., perm].abs().amax((0, 1)).view(4, 4)
    assert torch.equal(blocks, x.abs().amax((0, 1))[expected].view(4, 4))


def test_greedy_rotation_lowers_the_peak():
    x = _outlier_rows(2048, 256, seed=0)
    r = greedy_rotation(x, 64, 64, _gen(0))
    assert _orth_err(r) < 1e-12
    before = float(x.abs().max())
    after = float((x.double().view(-1, 64) @ r).abs().max())
    assert after < before / 3, f"max|x| {before:.2f} -> {after:.2f} after the greedy rotation"


def _inputs(kind: str, seed: int) -> torch.Tensor:
    g = _gen(seed)
    if kind == "outliers":
        return _outlier_rows(512, 256, seed)
    if kind == "positive":  # min > 0: the norm bound never certifies the min, all rows needed
        return torch.randn(512, 256, generator=g).abs() + 0.1
    if kind == "heavy":  # a few tokens dominate, like attention-sink positions
        return torch.randn(512, 256, generator=g) * torch.rand(512, 1, generator=g) ** 4
    if kind == "ties":  # small integers; |x| = 6 in two channels of 64 rows: exact ties
        x = torch.randint(-1, 2, (512, 256), generator=g).float()
        x[:64, [5, 9]] = 12 * torch.randint(0, 2, (64, 2), generator=g).float() - 6
        return x
    if kind == "duplicates":
        return torch.randn(8, 256, generator=g).repeat(64, 1)
    return torch.randn(512, 256, generator=g)


@pytest.fixture
def one_thread():
    """Exactness, not parallel speed, is under test: one thread keeps the many small GEMMs
    fast even when other processes hold the cores (OpenMP waits badly when oversubscribed)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("kind", ["gauss", "outliers", "positive", "heavy", "ties", "duplicates"])
def test_pruned_greedy_equals_exhaustive(kind, one_thread):
    for seed, b in ((0, 32), (1, 64)):
        x = _inputs(kind, seed)
        fast = greedy_rotation(x, b, 48, _gen(seed), prune=True)
        slow = greedy_rotation(x, b, 48, _gen(seed), prune=False)
        assert torch.equal(fast, slow), f"{kind}, seed {seed}, B {b}: pruned search diverged"
        assert not torch.equal(fast, torch.eye(b, dtype=torch.float64)) or kind == "positive"


@pytest.mark.parametrize("magnitude", [1e-310, 1e-30, 1e30, 1e150])
def test_pruned_greedy_equals_exhaustive_at_extreme_magnitudes(magnitude, one_thread):
    # subnormal float64 (the int8 codes' scale rounds; products lose relative precision) up to near overflow
    x = _inputs("outliers", 4).double() * magnitude
    fast = greedy_rotation(x, 32, 24, _gen(4), prune=True)
    assert torch.equal(fast, greedy_rotation(x, 32, 24, _gen(4), prune=False)), f"diverged at {magnitude:g}"


@pytest.mark.parametrize("kind", ["gauss", "outliers", "heavy", "ties"])
def test_int8_screen_error_is_within_its_margin(kind):
    # the margin is what makes the pruned search exact: check it against the float64 chunk extremes
    b, c = 32, greedy._CHUNK
    xs = _inputs(kind, 5).double().reshape(-1, b)
    top = torch.linalg.vector_norm(xs, dim=1).view(-1, c).amax(1)
    screen = greedy._Screen(xs[None], top[None])
    k = screen.chunks
    r = seed_matrix(b, _gen(6)) @ seed_matrix(b, _gen(7))
    for rot in (torch.eye(b, dtype=torch.float64), r):
        codes, scale, margin = screen.quantize(rot[None])
        screen._screen(0, codes[0], 0, k)
        exact = (xs.view(k, c, b) @ rot).flatten(1)
        assert (screen.imax[0] * scale[0] - exact.amax(1)).abs().le(margin[0]).all(), kind
        assert (screen.imin[0] * scale[0] - exact.amin(1)).abs().le(margin[0]).all(), kind
        assert margin[0].le(0.05 * top).all(), "margins so wide that the screen prunes nothing"


def test_pruned_greedy_equals_exhaustive_multithreaded():
    x = _inputs("heavy", 2)  # default threads, as the solver runs it
    fast = greedy_rotation(x, 64, 24, _gen(2), prune=True)
    assert torch.equal(fast, greedy_rotation(x, 64, 24, _gen(2), prune=False))


def test_greedy_degenerate_inputs_give_identity():
    eye = torch.eye(16, dtype=torch.float64)
    assert torch.equal(greedy_rotation(torch.zeros(8, 32), 16, 10, _gen(0)), eye)
    assert torch.equal(greedy_rotation(torch.randn(8, 32, generator=_gen(1)), 16, 0, _gen(0)), eye)
    with pytest.raises(ValueError, match="inf/nan"):
        greedy_rotation(torch.full((4, 32), math.nan), 16, 4, _gen(0))


@pytest.mark.parametrize(
    ("dim", "requested", "expected"),
    [(576, 128, 64), (1536, 128, 128), (64, 128, 64), (100, 128, 100), (576, 8, 8)],
)
def test_block_size_for(dim, requested, expected):
    assert block_size_for(dim, requested) == (expected, "")


def test_block_size_for_skips_large_dims_without_a_power_of_two_block():
    b, why = block_size_for(1030, 128)  # 1030 = 2 * 515: largest power-of-two divisor is 2
    assert b is None and "1030" in why and "128" in why


def test_smoothing_scales_formula_and_guards():
    act = torch.tensor([4.0, 0.0, 9.0, 1e-12])
    w = torch.tensor([[0.5, 1.0, 0.0, 2.0], [-1.0, 0.2, 0.0, 0.1]])
    s = smoothing_scales(act, w, 0.5)
    assert s.dtype == torch.float32 and torch.isfinite(s).all()
    assert s[0].item() == pytest.approx(4.0**0.5 / 1.0**0.5)
    assert s[1].item() == 1.0 and s[2].item() == 1.0, "dead activation / weight channels keep s = 1"
    assert s[3].item() == pytest.approx(1e-5), "tiny scales are clamped to 1e-5"
    with pytest.raises(ValueError, match="alpha"):
        smoothing_scales(act, w, 1.5)


def _check_exact(t: Transform, d: int) -> None:
    x = torch.randn(2, 5, d, generator=_gen(7), dtype=torch.float64)  # batch > 1, several dims
    x[..., 3] *= 30
    w = torch.randn(48, d, generator=_gen(8), dtype=torch.float64)
    y = apply_to_activation(x, t) @ apply_to_weight(w, t).T
    torch.testing.assert_close(y, x @ w.T, rtol=1e-5, atol=1e-4)
    tm = as_matrix(t)
    torch.testing.assert_close(apply_to_activation(x, t), x @ tm)
    torch.testing.assert_close(apply_to_weight(w, t), w @ torch.linalg.inv(tm).T, rtol=1e-6, atol=1e-5)
    xf = x.float()  # float32 in, float32 out
    assert apply_to_activation(xf, t).dtype == torch.float32
    torch.testing.assert_close(apply_to_activation(xf, t), apply_to_activation(x, t).float(), rtol=1e-4, atol=1e-4)


def test_full_transform_is_exact_and_rotations_orthogonal(one_thread):
    rows, absmax, weight = _group()
    t = build_transform(rows, absmax, weight, alpha=0.6, block_size=64, steps=64, permute=True, seed=0)
    assert t.block_size == 64 and t.smooth is not None and t.perm is not None
    assert t.rot1 is not None and t.rot2 is not None and t.note == ""
    for r in (t.rot1, t.rot2):
        assert r.dtype == torch.float32 and _orth_err(r) < 1e-5
    assert torch.equal(t.perm.sort().values, torch.arange(256))
    assert (t.smooth > 0).all()
    _check_exact(t, 256)
    before = float((rows / t.smooth).abs().max())
    after = float(apply_to_activation(rows, t).abs().max())
    assert after < before, f"smoothed max|x| {before:.3f} -> {after:.3f} after R1 P R2"


def test_dense_fallback_and_rotation_off_are_exact(one_thread):
    rows, absmax, weight = _group(d=100)
    dense = build_transform(rows, absmax, weight, alpha=0.5, block_size=128, steps=32, permute=True, seed=0)
    assert dense.block_size == 100 and dense.perm is None  # one block: nothing to permute
    assert dense.rot1 is not None and _orth_err(dense.rot1) < 1e-5
    _check_exact(dense, 100)
    off = build_transform(rows, absmax, weight, alpha=0.5, block_size=64, steps=0, permute=True, seed=0)
    assert off.block_size is None and off.rot1 is None and off.smooth is not None and off.note
    _check_exact(off, 100)
    rows, absmax, weight = _group(d=1030)
    skip = build_transform(rows[:64], absmax, weight, alpha=None, block_size=128, steps=8, permute=True, seed=0)
    assert skip.block_size is None and skip.smooth is None and "1030" in skip.note
    _check_exact(skip, 1030)


def test_transform_gram_matches_transformed_activations(one_thread):
    rows, absmax, weight = _group()
    t = build_transform(rows, absmax, weight, alpha=0.6, block_size=64, steps=32, permute=True, seed=3)
    x = rows.double()
    y = apply_to_activation(x, t)
    torch.testing.assert_close(transform_gram(x.T @ x, t), y.T @ y)


def test_build_transform_is_deterministic_and_seeded(one_thread):
    rows, absmax, weight = _group()
    kw = dict(alpha=0.6, block_size=64, steps=48, permute=True)
    a = build_transform(rows, absmax, weight, seed=5, **kw)
    b = build_transform(rows, absmax, weight, seed=5, **kw)
    for name in ("smooth", "rot1", "perm", "rot2"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    c = build_transform(rows, absmax, weight, seed=6, **kw)
    assert not torch.equal(a.rot1, c.rot1), "another seed must give another rotation"


def test_lockstep_batch_gives_each_group_its_own_transform(one_thread):
    """Groups searched side by side (same shape, other shapes, nothing to search, all-zero rows)
    get exactly the transform each gets alone, in the order given."""
    kw = dict(alpha=0.6, block_size=64, steps=24, permute=True)
    samples = [GroupSample(*_group(seed=s), seed=s, **kw) for s in range(3)]
    rows, absmax, weight = _group(d=128, seed=7, n=256)
    samples.append(GroupSample(rows, absmax, weight, seed=7, **kw))  # another shape
    samples.append(GroupSample(rows, absmax, weight, 0.6, 64, 0, True, seed=8))  # rotation off
    rows, absmax, weight = _group(seed=9)
    samples.append(GroupSample(torch.zeros_like(rows), absmax, weight, seed=9, **kw))  # nothing to spread
    together = build_transforms(samples)
    for s, t in zip(samples, together, strict=True):
        alone = build_transform(s.rows, s.act_absmax, s.weight, alpha=s.alpha, block_size=s.block_size,
                                steps=s.steps, permute=s.permute, seed=s.seed)
        for name in ("smooth", "rot1", "perm", "rot2"):
            a, b = getattr(alone, name), getattr(t, name)
            assert (a is None and b is None) or torch.equal(a, b), f"seed {s.seed}: {name} differs in a batch"
        assert alone.note == t.note
    assert together[4].rot1 is None and together[5].rot1 is None and together[0].rot1 is not None


def test_build_transform_rejects_mismatched_shapes():
    rows, absmax, weight = _group()
    with pytest.raises(ValueError, match="D = 256"):
        build_transform(rows, absmax[:-1], weight, alpha=0.6, block_size=64, steps=4, permute=True, seed=0)


@pytest.mark.parametrize("kind", ["gauss", "outliers", "ties"])
def test_int8_and_float32_screens_give_the_same_rotation(kind, one_thread, monkeypatch):
    """The screen runs torch._int_mm where it is fast and a float32 GEMM of the same codes elsewhere;
    both sum integer products exactly, so the search takes the same path."""
    x = _inputs(kind, 3)
    found = {}
    for fast in (True, False):
        monkeypatch.setattr(greedy.ops, "fast_int8_gemm", lambda device="cpu", fast=fast: fast)
        assert greedy._screen_dtype(64) == (torch.int8 if fast else torch.float32)
        found[fast] = greedy_rotation(x, 64, 32, _gen(3), prune=True)
    assert torch.equal(found[True], found[False]), kind
    assert greedy._screen_dtype(2048) == torch.int8  # 2048 * 127^2 >= 2^24: float32 would round
