"""Model -> GraphModule, and a loader batch -> the (args, kwargs) the model is called with."""

from __future__ import annotations

import contextlib
import copy
import inspect
import itertools
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.export import Dim

from . import torch_private

# torch.export and symbolic_trace install process-wide state while they trace (dispatch modes,
# patched functions), and torch.set_num_threads sets the count every new thread starts with:
# two threads doing either at once break each other. Every fxquant call does them under this lock.
TORCH_LOCK = threading.RLock()


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
    torch.fx.symbolic_trace, for models written to be traceable. Either way the graph is the
    model in eval mode (no dropout, batch norm on running statistics), as torch.onnx.export does
    by default; the model's own train/eval flags are left as they were.
    """
    if isinstance(model, torch.fx.GraphModule) and _is_fxquant_graph(model):
        raise ValueError("this model is already a graph rewritten by fxquant.quantize_graph; "
                         "quantize the original float model instead")
    with TORCH_LOCK, _eval_mode(model), _no_kv_cache(model), torch.no_grad():
        try:
            if method == "symbolic_trace":
                return _own_eval_modules(torch.fx.symbolic_trace(model))
            named = _named_call(model, args, kwargs)
            program = torch.export.export(named, args, kwargs, dynamic_shapes=dynamic_dims(args, kwargs, named),
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


def mark_batch_unbacked(batch: Any) -> Any:
    """Mark dim 0 of every tensor in ``batch`` (Tensor, tuple, list or dict, as for the loader) as
    one unbacked batch size, then return it: call the compiled graph with it the first time, and
    that one compile serves every batch size, 1 included.

    Without it, torch.compile(gm, dynamic=True) first called with batch 2 assumes the batch is
    never 1, and a later batch of 1 compiles a second graph. Every tensor's dim 0 must be the
    batch (runtime asserts check they agree). Only the compiling call needs the marks. A graph
    with convolutions (a vision tower) under Inductor: compile that call inside
    torch._inductor.config.patch(layout_optimization=False); torch 2.13's channels-last choice
    expects strides the convolution does not return under an unbacked batch."""
    for tensor in torch_private.tree_leaves(batch):
        if isinstance(tensor, torch.Tensor) and tensor.dim() > 0:
            torch_private.mark_unbacked(tensor, 0, shape_id="fxquant_batch")
    return batch


def pin_thread_count() -> int:
    """This thread's torch thread count, fixed now. torch gives a thread the process-wide count on
    its first parallel op; read under the lock, that is never the 1 a concurrent solve sets for
    its workers (solve.solve_transforms), so results do not depend on what runs beside."""
    with TORCH_LOCK:
        return torch.get_num_threads()


def dynamic_dims(args: tuple, kwargs: dict, fn: Callable[..., Any] | None = None) -> list | dict:
    """torch.export dynamic_shapes: every dim of every tensor input Dim.AUTO (export keeps the
    dims the model specializes static). With ``fn`` (the model), one entry per parameter of its
    forward that the call binds, as export matches them: ``*xs`` gets a tuple, ``**kwargs`` a
    dict. Without, one entry per positional, then per keyword argument."""

    def auto(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return {i: Dim.AUTO for i in range(value.dim())} if value.dim() else None
        return None

    if fn is not None:
        bound = inspect.signature(fn.forward if isinstance(fn, nn.Module) else fn).bind(*args, **kwargs)
        return {name: torch_private.tree_map(auto, value) for name, value in bound.arguments.items()}
    return [torch_private.tree_map(auto, value) for value in list(args) + list(kwargs.values())]


def _warn_size_one(args: tuple, kwargs: dict) -> None:
    """torch.export fixes a dim whose example size is 1: say so, since the graph then serves
    only that size there (a batch of one row captures a batch-1-only graph)."""
    named = [(f"argument {i}", v) for i, v in enumerate(args)] + [(f"'{k}'", v) for k, v in kwargs.items()]
    for name, value in named:
        leaves = torch_private.tree_leaves(value)
        for tensor in (t for t in leaves if isinstance(t, torch.Tensor)):
            fixed = [i for i, size in enumerate(tensor.shape) if size == 1]
            if fixed:
                warnings.warn(f"fxquant capture: input {name} has size 1 in dim {fixed} of shape "
                              f"{tuple(tensor.shape)}; torch.export fixes such a dim, so the graph accepts only "
                              "size 1 there. If it varies at run time (batch, tokens), capture from a batch with "
                              "at least 2 there (example_inputs= or the loader's first batch).", stacklevel=4)


def _named_call(model: nn.Module, args: tuple, kwargs: dict) -> nn.Module:
    """The module to export for this call. torch.export cannot give dynamic shapes to what a
    ``forward(..., **kwargs)`` receives (pytorch/pytorch#150022); then a stand-in whose forward
    names those arguments (``forward(x, *, mask)`` for ``forward(x, **kwargs)`` called with
    ``mask=``) and calls the model. It holds the model's own submodules, parameters and buffers,
    so the graph's constants keep their names."""
    signature = inspect.signature(model.forward)
    var_keyword = [p for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD]
    extra = signature.bind(*args, **kwargs).arguments.get(var_keyword[0].name, {}) if var_keyword else {}
    if not extra:
        return model
    parameters = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
    parameters += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY) for name in extra]

    def forward(*args: Any, **kwargs: Any) -> Any:
        return model(*args, **kwargs)

    forward.__signature__ = signature.replace(parameters=parameters)  # what export binds the call to
    named = nn.Module()
    named._modules, named._parameters, named._buffers = model._modules, model._parameters, model._buffers
    named._non_persistent_buffers_set = model._non_persistent_buffers_set
    named.forward = forward
    named.training = model.training
    return named


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """The model in eval mode while it is traced, then every module's own flag back."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def _own_eval_modules(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """symbolic_trace keeps torch.nn layers (Dropout, BatchNorm) as calls of the model's own
    modules, which would follow the model's train/eval flag at run time: the graph gets its own
    copies in eval mode instead, sharing the model's tensors."""
    for target in {node.target for node in gm.graph.nodes if node.op == "call_module"}:
        module = gm.get_submodule(target)
        shared = {id(t): t for t in itertools.chain(module.parameters(), module.buffers())}
        gm.set_submodule(target, copy.deepcopy(module, shared).eval())
    return gm


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
