"""Model -> GraphModule, and a loader batch -> the (args, kwargs) the model is called with."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.export import Dim


def batch_to_call(batch: Any) -> tuple[tuple, dict]:
    """Tensor -> model(batch); tuple/list -> model(*batch); dict -> model(**batch)."""
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    if isinstance(batch, dict):
        return (), dict(batch)
    raise TypeError(f"calibration batch of type {type(batch).__name__} is not supported: yield a Tensor "
                    "(model(batch)), a tuple/list (model(*batch)) or a dict (model(**batch))")


def capture(model: nn.Module, args: tuple, kwargs: dict, method: str = "export") -> torch.fx.GraphModule:
    """Trace ``model`` into a GraphModule called like ``model(*args, **kwargs)``.

    "export": torch.export non-strict, every dim of every tensor input dynamic except those
    the model specializes (so any batch size and sequence length serve). "symbolic_trace":
    torch.fx.symbolic_trace, for models written to be traceable.
    """
    if isinstance(model, torch.fx.GraphModule) and _is_fxquant_graph(model):
        raise ValueError("this model is already a graph rewritten by fxquant.quantize_graph; "
                         "quantize the original float model instead")
    with _no_kv_cache(model), torch.no_grad():
        try:
            if method == "symbolic_trace":
                return torch.fx.symbolic_trace(model)
            program = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_dims(args, kwargs),
                                          strict=False)
            _warn_size_one(args, kwargs)
            return program.module()
        except Exception as err:  # quote torch's reason and say what to try
            other = "symbolic_trace" if method == "export" else "export"
            raise RuntimeError(
                f"could not capture {type(model).__name__} with capture={method!r}: {type(err).__name__}: "
                f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}\n"
                f"Try QuantConfig(capture={other!r}), pass example_inputs that match how the model is called, "
                "or use torch.compile(model, backend='fxquant'), which quantizes each subgraph Dynamo captures."
            ) from err


def dynamic_dims(args: tuple, kwargs: dict) -> list:
    """torch.export dynamic_shapes: every dim of every tensor input Dim.AUTO (export keeps the
    dims the model specializes static); one entry per positional, then per keyword argument."""

    def auto(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return {i: Dim.AUTO for i in range(value.dim())} if value.dim() else None
        return None

    return [torch.utils._pytree.tree_map(auto, value) for value in list(args) + list(kwargs.values())]


def _warn_size_one(args: tuple, kwargs: dict) -> None:
    """torch.export fixes a dim whose example size is 1: say so, since the graph then serves
    only that size there (a batch of one row captures a batch-1-only graph)."""
    named = [(f"argument {i}", v) for i, v in enumerate(args)] + [(f"'{k}'", v) for k, v in kwargs.items()]
    for name, value in named:
        leaves = torch.utils._pytree.tree_leaves(value)
        for tensor in (t for t in leaves if isinstance(t, torch.Tensor)):
            fixed = [i for i, size in enumerate(tensor.shape) if size == 1]
            if fixed:
                warnings.warn(f"fxquant capture: input {name} has size 1 in dim {fixed} of shape "
                              f"{tuple(tensor.shape)}; torch.export fixes such a dim, so the graph accepts only "
                              "size 1 there. If it varies at run time (batch, tokens), capture from a batch with "
                              "at least 2 there (example_inputs= or the loader's first batch).", stacklevel=4)


@contextlib.contextmanager
def _no_kv_cache(model: nn.Module) -> Iterator[None]:
    """Hugging Face models: capture the prefill graph without a KV cache, then restore the config."""
    config = getattr(model, "config", None)
    if config is None or not getattr(config, "use_cache", False):
        yield
        return
    config.use_cache = False
    try:
        yield
    finally:
        config.use_cache = True


def _is_fxquant_graph(gm: torch.fx.GraphModule) -> bool:
    return any("fxquant" in node.meta for node in gm.graph.nodes)
