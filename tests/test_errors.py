"""Test 6: bad input gets a clear error naming the field or layer and what to change."""

import logging

import pytest
import torch
from models import mlp, tensor_batches

from fxquant import QuantConfig, quantize_graph

FAST = QuantConfig(rotation_steps=8, block_size=16)


@pytest.mark.parametrize("field,value,words", [
    ("w_bits", 1, "2 to 8"),
    ("a_bits", 12, "2 to 8"),
    ("a_percentile", 150, "(0, 100]"),
    ("block_size", 96, "power of two"),
    ("a_granularity", "row", "'tensor', 'channel', 'token'"),
    ("w_clip", 1.5, "ratio in (0, 1]"),
    ("smooth_alpha", 2.0, "[0, 1]"),
    ("w_method", "awq", "'rtn', 'gptq'"),
    ("rotation_steps", -1, "non-negative"),
    ("calib_cache_gb", -1.0, ">= 0"),
])
def test_invalid_field_names_field_and_fix(field, value, words):
    with pytest.raises(ValueError) as err:
        QuantConfig(**{field: value})
    assert field in str(err.value) and words in str(err.value)


def test_invalid_override_names_the_pattern():
    with pytest.raises(ValueError, match=r"overrides\['down'\].w_bits=3\.5"):
        QuantConfig(overrides={"down": {"w_bits": 3.5}})
    with pytest.raises(ValueError, match="cannot vary per layer"):
        QuantConfig(overrides={"down": {"seed": 3}})


def test_empty_loader():
    with pytest.raises(ValueError, match="no batches"):
        quantize_graph(mlp(), [], FAST)


def test_unsupported_batch_type():
    with pytest.raises(TypeError, match="calibration batch of type str"):
        quantize_graph(mlp(), ["not a tensor"], FAST)


def test_nan_in_calibration_names_the_layer():
    data = tensor_batches(2, (8, 64))
    data[1][3, 7] = float("nan")
    with pytest.raises(ValueError, match=r"read by 0 holds NaN or Inf"):
        quantize_graph(mlp(), data, FAST)


def test_override_matching_no_layer_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="fxquant"):
        config = QuantConfig(rotation_steps=8, overrides={"vision": {"skip": True}})
        quantize_graph(mlp(), tensor_batches(1, (8, 64)), config)
    assert "overrides['vision'] matches no linear layer" in caplog.text


def test_quantizing_a_quantized_graph_is_refused():
    gm = quantize_graph(mlp(), tensor_batches(1, (8, 64)), FAST)
    with pytest.raises(ValueError, match="already a graph rewritten by fxquant"):
        quantize_graph(gm, tensor_batches(1, (8, 64)), FAST)


def test_group_members_must_agree_on_activation_settings():
    from models import FunctionalAttention
    with pytest.raises(ValueError, match=r"read the same activation.*a_bits"):
        quantize_graph(FunctionalAttention(), tensor_batches(1, (2, 8, 64)),
                       QuantConfig(overrides={"wq": {"a_bits": 4}}), dry_run=True)


def test_capture_failure_quotes_reason_and_suggests():
    class Branchy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else -self.fc(x)  # data-dependent control flow

    with pytest.raises(RuntimeError, match="(?s)could not capture Branchy.*Try QuantConfig"):
        quantize_graph(Branchy(), [torch.randn(2, 8)], QuantConfig(capture="symbolic_trace"))


def test_skip_override_leaves_layer_in_float():
    model = mlp()
    config = QuantConfig(rotation_steps=8, overrides={r"^2$": {"skip": True}})
    gm = quantize_graph(model, tensor_batches(2, (8, 64)), config)
    plan = gm.meta["fxquant"]["plan"]
    assert plan.sites["2"].skip and not plan.sites["0"].skip
    assert torch.equal(gm.state_dict()["2.weight"], model[2].weight)


def test_size_one_capture_dim_warns_and_names_it():
    """A one-row example makes torch.export fix the batch dim: fxquant says so, naming the dim."""
    with pytest.warns(UserWarning, match=r"argument 0 has size 1 in dim \[0\].*at least 2"):
        gm = quantize_graph(mlp(), [torch.randn(1, 64)], FAST)
    with pytest.raises(AssertionError, match="size"):  # the warning is true: only batch 1 is accepted
        gm(torch.randn(3, 64))
