"""The seed failure, as users wrote it: a Linear that calibrates its activation scale lazily.

This is the pattern fxquant replaces, kept here (and used by the tests and benchmarks) so the
comparison is against the real thing: the scale is observed inside ``forward`` and assigned to
``self`` on the first calls, which under torch.compile mutates guarded Python state
(recompiles) and under CUDA graphs reads a tensor a later replay overwrites.
"""

from __future__ import annotations

import torch
from torch import nn


class LazyQuantLinear(nn.Module):
    def __init__(self, linear: nn.Linear, calib_calls: int = 3, w_bits: int = 4, a_bits: int = 8) -> None:
        super().__init__()
        self.calib_calls, self.qmax = calib_calls, 2 ** (a_bits - 1) - 1
        w = linear.weight.detach()
        w_qmax = 2 ** (w_bits - 1) - 1
        w_scale = w.abs().amax(1, keepdim=True).clamp(min=1e-8) / w_qmax
        self.weight = nn.Parameter(torch.clamp(torch.round(w / w_scale), -w_qmax - 1, w_qmax) * w_scale,
                                   requires_grad=False)
        self.bias = linear.bias
        self.calls = 0
        self.scale = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calls < self.calib_calls:  # lazy calibration: Python state mutated under compile
            peak = x.detach().abs().amax() / self.qmax
            self.scale = peak if self.scale is None else torch.maximum(self.scale, peak)
            self.calls += 1
        q = torch.clamp(torch.round(x / self.scale), -self.qmax - 1, self.qmax) * self.scale
        return nn.functional.linear(q, self.weight, self.bias)


def lazy_copy(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> nn.Module:
    """A deep copy of ``model`` with every nn.Linear (but ``skip``) swapped for LazyQuantLinear."""
    import copy

    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and not any(s in full for s in skip):
                setattr(module, child_name, LazyQuantLinear(child))
    return model
