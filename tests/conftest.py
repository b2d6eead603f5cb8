"""Shared test helpers: error measures, per-op node counts, and a check, around every test, that
torch's process-wide state is left as it was."""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import fx


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def sqnr(got: torch.Tensor, want: torch.Tensor) -> float:
    """Signal to quantization noise, dB."""
    return float(10 * torch.log10(want.pow(2).mean() / (got - want).pow(2).mean()))


def op_counts(gm: fx.GraphModule) -> Counter:
    """How many nodes of each kind: call_function nodes by their target's qualified name
    ("aten.linear.default", "fxquant.ops.block_rotate", "torch.mul"), the others by op."""
    def name(node: fx.Node) -> str:
        if node.op != "call_function":
            return node.op
        if isinstance(node.target, torch._ops.OpOverload):
            return str(node.target)
        return f"{getattr(node.target, '__module__', None) or 'torch'}.{node.target.__name__}"
    return Counter(name(n) for n in gm.graph.nodes)


def new_thread_count() -> int:
    """The torch thread count a new thread starts with (process-wide, unlike this thread's)."""
    with ThreadPoolExecutor(1) as one:
        return one.submit(torch.get_num_threads).result()


def _torch_state() -> dict:
    return {"threads": torch.get_num_threads(), "new thread": new_thread_count(), "grad": torch.is_grad_enabled(),
            "dispatch modes": torch._C._len_torch_dispatch_stack(), "default dtype": torch.get_default_dtype()}


@pytest.fixture(autouse=True)
def _torch_state_unchanged():
    """fxquant promises to leave nothing process-wide changed, after success or failure."""
    before = _torch_state()
    yield
    assert _torch_state() == before, "the test left torch's process-wide state changed"
