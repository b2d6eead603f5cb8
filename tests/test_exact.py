"""Test 1: with 16-bit weights and activations, smoothing + rotation + permutation are exact."""

import dataclasses

import pytest
import torch
from conftest import relative_error
from models import FlowLoop, FunctionalAttention, mlp, tensor_batches, tiny_bert, tiny_gemma, tiny_llama, token_batches

from fxquant import QuantConfig, quantize_graph

EXACT = QuantConfig(w_bits=16, a_bits=16, smooth_alpha=0.6, rotation_steps=32, block_size=16)


CASES = {
    "sequential_mlp": (lambda: mlp(), lambda: tensor_batches(3, (8, 64))),
    # symbolic_trace: the group input is a placeholder, so constants must be defined above it
    "sequential_mlp_symbolic_trace": (lambda: mlp(), lambda: tensor_batches(3, (8, 64))),
    "functional_attention": (lambda: FunctionalAttention(), lambda: tensor_batches(3, (2, 12, 64))),
    "flow_loop": (lambda: FlowLoop(), lambda: tensor_batches(3, (4, 64))),
    "llama": (tiny_llama, lambda: token_batches(3)),
    "gemma": (tiny_gemma, lambda: token_batches(3)),
    "bert": (tiny_bert, lambda: token_batches(3)),
}


def _call(f, batch):
    return f(**batch) if isinstance(batch, dict) else f(batch)


def _output(out):
    for field in ("logits", "last_hidden_state"):
        if hasattr(out, field):
            return getattr(out, field)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_transform_only_graph_equals_model(case):
    build, batches = CASES[case]
    model, data = build(), batches()
    config = dataclasses.replace(EXACT, capture="symbolic_trace") if case.endswith("symbolic_trace") else EXACT
    gm = quantize_graph(model, data, config)
    roles = [n.meta["fxquant"]["role"] for n in gm.graph.nodes if "fxquant" in n.meta]
    assert "rotate" in roles and "smooth" in roles, f"{case}: no transform was inserted: {roles}"
    for batch in data + batches()[:1]:
        with torch.no_grad():
            want, got = (_call(f, batch) for f in (model, gm))
        assert type(got) is type(want)
        err = relative_error(_output(got), _output(want))
        assert err < 1e-5, f"{case}: relative error {err:.2e} >= 1e-5"
