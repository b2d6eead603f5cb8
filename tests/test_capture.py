"""Capture: the model's mode and signature, and what capture leaves behind."""

import dataclasses

import pytest
import torch
from models import tensor_batches
from torch import nn

from fxquant import QuantConfig, quantize_graph

FAST = QuantConfig(rotation_steps=8, block_size=16)
EXACT = dataclasses.replace(FAST, w_bits=16, a_bits=16)  # transforms only: equal to the float model


class DropoutMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up, self.drop, self.down = nn.Linear(64, 128), nn.Dropout(0.5), nn.Linear(128, 64)
        self.norm = nn.BatchNorm1d(64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.drop(torch.relu(self.up(self.norm(x)))))


@pytest.mark.parametrize("method", ["export", "symbolic_trace"])
@torch.no_grad()
def test_train_mode_model_is_captured_in_eval_semantics_and_keeps_its_flags(method):
    model = DropoutMLP().train()
    model.norm.eval()  # mixed flags come back as they were, module by module
    flags = {name: m.training for name, m in model.named_modules()}
    data, x = tensor_batches(2, (8, 64)), tensor_batches(1, (8, 64), seed=3)[0]
    gm = quantize_graph(model, data, dataclasses.replace(EXACT, capture=method))
    assert {name: m.training for name, m in model.named_modules()} == flags
    first = gm(x)
    assert torch.equal(first, gm(x)), "the graph must be a pure function (no training-mode dropout)"
    want = model.eval()(x)
    torch.testing.assert_close(first, want, rtol=1e-4, atol=1e-4)
    model.train()  # the graph does not follow the model's flags later either
    assert torch.equal(gm(x), first)


class Keywords(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc, self.gate = nn.Linear(64, 64), nn.Linear(64, 64)

    def forward(self, x: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * torch.sigmoid(self.gate(kwargs["mask"]))


class Varargs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(64, 64)

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return self.fc(xs[0] + xs[1] * xs[2])


@pytest.mark.parametrize("method", ["export", "symbolic_trace"])
@torch.no_grad()
def test_forward_with_var_keyword_arguments_is_captured(method):
    model = Keywords()
    data = [{"x": x, "mask": m} for x, m in zip(tensor_batches(2, (8, 64)), tensor_batches(2, (8, 64), seed=1),
                                                 strict=True)]
    gm = quantize_graph(model, data, dataclasses.replace(EXACT, capture=method))
    x, mask = torch.randn(5, 64), torch.randn(5, 64)  # another batch size: the batch dim stays dynamic
    torch.testing.assert_close(gm(x=x, mask=mask), model(x, mask=mask), rtol=1e-4, atol=1e-4)
    assert quantize_graph(model, data, dataclasses.replace(FAST, capture=method))(x=x, mask=mask).shape == (5, 64)


@pytest.mark.parametrize("method", ["export", "symbolic_trace"])
@torch.no_grad()
def test_forward_with_var_positional_arguments_is_captured(method):
    model = Varargs()
    data = [tuple(tensor_batches(3, (8, 64), seed=s)) for s in range(2)]
    gm = quantize_graph(model, data, dataclasses.replace(EXACT, capture=method))
    xs = tuple(torch.randn(5, 64) for _ in range(3))
    torch.testing.assert_close(gm(*xs), model(*xs), rtol=1e-4, atol=1e-4)
    assert quantize_graph(model, data, dataclasses.replace(FAST, capture=method))(*xs).shape == (5, 64)
