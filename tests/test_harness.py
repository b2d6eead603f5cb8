"""The accuracy harness (benchmarks/realmodel.py) on a tiny random Llama: no real model, no download."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
from models import tiny_llama

from fxquant import QuantConfig, quantize_graph

pytest.importorskip("transformers")


def _load_harness():
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "realmodel.py"
    spec = importlib.util.spec_from_file_location("realmodel", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("realmodel", module)
    spec.loader.exec_module(module)
    return module


realmodel = _load_harness()


def _windows(count: int = 6, length: int = 32, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return list(torch.randint(0, 128, (count, length), generator=g))


def _by_hand(model, windows: list[torch.Tensor]) -> float:
    """log_softmax of the logits, gather each next token, mean over every prediction, exp."""
    nll = []
    with torch.no_grad():
        for w in windows:  # one window at a time: batching must not change the result
            logp = torch.log_softmax(model(input_ids=w[None]).logits[0].double(), dim=-1)
            nll.append(-logp[:-1].gather(1, w[1:, None]).squeeze(1))
    return math.exp(torch.cat(nll).mean().item())


def test_perplexity_of_float_model_matches_hand_computation():
    model, windows = tiny_llama(), _windows()
    got, tokens = realmodel.perplexity_and_tokens(model, windows, batch_size=4)  # batches of 4 and 2
    assert tokens == 6 * 31  # every window predicts all but its first token
    assert got == pytest.approx(_by_hand(model, windows), rel=1e-5)
    # and what Hugging Face's own loss says, window by window
    with torch.no_grad():
        hf = [model(input_ids=w[None], labels=w[None]).loss.item() for w in windows]
    assert got == pytest.approx(math.exp(sum(hf) / len(hf)), rel=1e-5)


def test_perplexity_of_fxquant_graph_matches_hand_computation():
    model, windows = tiny_llama(), _windows()
    gm = quantize_graph(model, realmodel.calib_batches(windows[:4], batch_size=2),
                        QuantConfig(rotation_steps=8, block_size=16))
    # the graph was captured without labels: it is called like its calibration batches
    got = realmodel.perplexity(gm, windows[4:], batch_size=2)
    assert got == pytest.approx(_by_hand(gm, windows[4:]), rel=1e-5)
    assert got != pytest.approx(realmodel.perplexity(model, windows[4:]), rel=1e-6)  # it is quantized


def test_window_split_is_first_half_then_second_half():
    tokens = list(range(10 * 8 + 5))  # 10 whole windows of 8, and 5 left-over tokens that are dropped
    split = realmodel.split_windows(tokens, window=8, calib_windows=3, eval_windows=4)
    assert split.total_windows == 10
    assert [w[0].item() for w in split.calib] == [0, 8, 16]  # first windows of the first half
    assert [w[0].item() for w in split.eval] == [40, 48, 56, 64]  # first windows of the second half
    assert all(torch.equal(w, torch.arange(w[0], w[0] + 8)) for w in split.calib + split.eval)
    seen_calib = {t for w in split.calib for t in w.tolist()}
    assert seen_calib.isdisjoint(t for w in split.eval for t in w.tolist())
    assert max(seen_calib) < 40 <= min(t for w in split.eval for t in w.tolist())
    with pytest.raises(ValueError, match="each half holds 5"):
        realmodel.split_windows(tokens, window=8, calib_windows=6, eval_windows=1)


def test_calib_batches_are_input_id_dicts():
    batches = realmodel.calib_batches(_windows(5, 16), batch_size=2)
    assert [b["input_ids"].shape for b in batches] == [(2, 16), (2, 16), (1, 16)]
