"""The torch.compile backend "fxquant": quantize every graph Dynamo captures, then compile it.

    torch.compile(model, backend="fxquant",
                  options={"calib_loader": loader, "config": QuantConfig(...), "inner": "inductor"})

Dynamo calls a backend once per graph it captures (each frame, each piece between graph
breaks, each recompile) with the graph and the real tensors of the call being compiled. The
model's parameters and buffers arrive as graph inputs; here they become constants (passes/lift),
the remaining inputs are calibrated, ``quantize_module`` runs the same passes as
``quantize_graph``, and the rewritten graph goes to Inductor (or to ``options["inner"]``).

Which graphs are calibrated from what (the README states the same):
- ``calib_loader`` given: a graph whose inputs are arguments of the model call (or items,
  attributes or sizes of them) is calibrated on every batch of the loader, mapped onto its
  inputs by name and position. That is the graph of the compiled frame up to its first graph
  break, and every recompile of it. A graph that starts after a graph break (a
  ``torch_dynamo_resume_in_*`` function, or a function Dynamo starts tracing from the eager code
  that runs after a break) reads values computed by that eager code, which the loader's batches
  cannot reach: compiling it raises a ValueError that names the graph and what to do.
- no ``calib_loader``: every graph is calibrated on the real inputs of the call that compiles it
  (its first call; for a recompile, the call that triggered it), with one warning.

Shapes: under the default ``dynamic=None`` the first graph is compiled for the call's sizes. If
a calibration batch differs from the call in a size (4 rows, call of 6), the graph is traced
again with symbolic sizes: where it does not depend on that size (an MLP), the batch calibrates
it as it is; where it does (a view to the call's shape, as Hugging Face attention does), the
compile raises, saying to pass ``dynamic=True`` or yield batches of the call's shape. A graph
Dynamo specializes to batch size 1 is calibrated on the loader's batches one row at a time.
A recompile of a graph already quantized under the same torch.compile call (another shape: Dynamo's
automatic dynamic shapes recompile on the second batch size by default) reuses the calibration
and the solved transforms, scales and weights of the first (api.solution_key: the same groups of
the same weight tensors under the same config): it costs a compile, not a quantization, and the
loader is not read again. Without a loader that means the first call's calibration.

State: the compiles of one torch.compile call share the no-loader warning, a generator loader
read into a list, and the solutions of the graphs quantized so far (their quantized weights and
transforms: about one quantized model). The compiled graphs hold that state, nothing else does:
once the compiled model is dropped and Dynamo's cache is cleared (``torch._dynamo.reset()``),
options, loader, batches and solutions can be collected.

Constants: parameters, buffers and every other tensor that is not an argument of the call
(module attributes, globals, closure cells) are baked in at compile time, sharing storage with
the model: in-place updates are seen, reassigned attributes are not (compile again).
"""

from __future__ import annotations

import ast
import inspect
import re
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from . import torch_private
from .api import Solution, quantize_module
from .capture import batch_to_call
from .config import QuantConfig
from .passes.common import copy_graph_module
from .passes.lift import LiftConstants, target_from_source

NAME = "fxquant"
OPTIONS = ("calib_loader", "config", "inner")
_NAMESPACE = {"__builtins__": {}}  # Dynamo source names are Python expressions over L / G


class _State:
    """What the compiles of one torch.compile call share: whether the no-loader warning was
    given, a one-shot loader read into a list, and the solved graphs (recompiles reuse them)."""

    def __init__(self, options: dict | None) -> None:
        self.options = options  # keeps id(options) unique while this state exists
        self.warned = False
        self.loader: list | None = None
        self.solutions: dict[tuple, Solution] = {}


# Keyed by id of the options dict. Held weakly here and strongly by every callable compiled with
# those options, so it (and the loader's batches) goes when Dynamo and the user drop them.
_STATE: weakref.WeakValueDictionary[int, _State] = weakref.WeakValueDictionary()


def fxquant_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], options: dict | None = None,
                    mode: str | None = None) -> Callable[..., Any]:
    """Dynamo backend: lift constants, calibrate, quantize, compile; returns the compiled callable.

    ``options``: ``calib_loader`` (batches as for quantize_graph; a generator is read once and
    kept for recompiles), ``config`` (QuantConfig), ``inner`` ("inductor" by default, any registered backend
    name such as "eager", or a backend callable). ``mode`` is passed on to Inductor.
    """
    state = _STATE.get(id(options))
    if state is None:
        state = _STATE[id(options)] = _State(options)
    options = dict(options or {})
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"torch.compile(backend='fxquant', options=...) got unknown option(s) {unknown}; "
                         f"allowed: {', '.join(OPTIONS)}")
    config = options.get("config") or QuantConfig()
    if not isinstance(config, QuantConfig):
        raise TypeError(f"options['config'] must be a fxquant.QuantConfig, got {type(config).__name__}")
    frame = _Frame.current()
    call = _Arguments(frame) if frame is not None else None
    inputs = _classify(gm, example_inputs, frame, call)
    # Dynamo reads its graph again after the backend returns (to call the result): rewrite a copy
    constants = {i.node: (i.target, example_inputs[i.index]) for i in inputs if i.constant}
    dynamo_gm, gm = gm, LiftConstants(constants)(copy_graph_module(gm)[0]).graph_module
    user = [i for i in inputs if not i.constant]

    loader = options.get("calib_loader")
    if loader is not None and iter(loader) is loader:  # a generator: recompiles must see the same batches
        if state.loader is None:
            state.loader = list(loader)
        loader = state.loader
    if loader is None:
        if not state.warned:
            state.warned = True
            _warn(user)
        batches: Iterable[Any] = [tuple(_first_call_value(i, example_inputs, frame) for i in user)]
    else:
        batches = _mapped_batches(loader, user, frame, call, dynamo_gm, example_inputs)
    quantized = quantize_module(gm, batches, config, solutions=state.solutions)

    kept = [example_inputs[i.index] for i in user]
    compiled = _compile_inner(options.get("inner", "inductor"), quantized, kept, mode)
    return _drop_constants(compiled, [i.index for i in user], state)


@dataclass
class _Frame:
    """The frame Dynamo is compiling: its code, the real values it was called with, and whether
    it runs inside another compiled frame (it starts after a graph break)."""

    code: Any
    f_locals: dict[str, Any]
    f_globals: dict[str, Any]
    nested: bool

    @staticmethod
    def current() -> _Frame | None:
        tx = torch_private.compiling_frame()
        if tx is None:
            return None
        return _Frame(tx.f_code, dict(tx.f_locals), tx.f_globals, torch_private.inside_compiled_frame())

    @property
    def where(self) -> str:
        return f"{self.code.co_name} ({self.code.co_filename}:{self.code.co_firstlineno})"

    def eval(self, source_name: str) -> Any:
        return eval(source_name, _NAMESPACE, {"L": self.f_locals, "G": self.f_globals})  # noqa: S307


@dataclass
class _Input:
    index: int  # position among Dynamo's flat inputs
    node: str  # placeholder name
    source: str  # Dynamo source name, e.g. L['kwargs']['input_ids']
    constant: bool
    target: str = ""  # constants: the get_attr target
    slot: tuple[int | None, str | None] = (None, None)  # user inputs: (position, keyword) in the model call
    root: str = ""  # user inputs: the source of the call argument; source = root + suffix
    sizes: tuple[int | None, ...] | None = None  # tensor inputs: the sizes the graph fixed (None: dynamic)


def _classify(gm: fx.GraphModule, example_inputs: Sequence[Any], frame: _Frame | None,
              call: _Arguments | None) -> list[_Input]:
    """Split the placeholders: arguments of the call stay inputs, everything else becomes a constant."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        raise RuntimeError(f"fxquant backend: {len(placeholders)} graph inputs but {len(example_inputs)} "
                           "example inputs; this torch version passes inputs differently than expected")
    inputs = []
    for index, (node, value) in enumerate(zip(placeholders, example_inputs, strict=True)):
        source = torch_private.input_source(node) or node.name
        item = _Input(index, node.name, source, constant=False)
        if call is not None:
            slot = call.slot(source)
            lift = slot is None
        else:  # no frame to bind the call to: lift what is visibly a parameter or buffer
            slot, lift = None, re.search(r"\._(parameters|buffers)\[", source) is not None
        if isinstance(value, torch.Tensor) and (isinstance(value, nn.Parameter) or lift):
            item.constant = True
            item.target = target_from_source(source[len(_module_root(source, frame)):])
        elif slot is not None:
            item.root, item.slot = slot
        if isinstance(value, torch.Tensor) and not item.constant:
            fake = torch_private.fake_value(node, value)
            item.sizes = tuple(d if isinstance(d, int) else None for d in fake.shape)
        inputs.append(item)
    return inputs


class _Arguments:
    """How the compiled frame's arguments relate to the user's call ``model(*args, **kwargs)``.

    Leading arguments holding an nn.Module are the model itself (``self``; ``args[0]`` in wrappers
    such as Hugging Face's ``wrapper(*args, **kwargs)``); the others are the call's arguments.
    """

    def __init__(self, frame: _Frame) -> None:
        code = frame.code
        count = code.co_argcount + code.co_kwonlyargcount
        names = list(code.co_varnames[:count])
        self.varargs = code.co_varnames[count] if code.co_flags & inspect.CO_VARARGS else None
        self.varkw = code.co_varnames[count + bool(self.varargs)] if code.co_flags & inspect.CO_VARKEYWORDS else None
        values = frame.f_locals
        self.named: dict[str, tuple[int | None, str]] = {}
        position = 0
        for i, name in enumerate(names):
            if isinstance(values.get(name), nn.Module):
                continue
            positional = i < code.co_argcount
            self.named[name] = (position if positional else None, name)
            position += positional
        self.varargs_positions: dict[int, int] = {}
        for j, value in enumerate(values.get(self.varargs, ()) if self.varargs else ()):
            if not isinstance(value, nn.Module):
                self.varargs_positions[j] = position
                position += 1
        leading = [*(values.get(n) for n in names), *(values.get(self.varargs, ()) if self.varargs else ()),
                   *values.values()]  # a wrapper's closure (torch.compile's own `fn`) comes last
        model = next((v for v in leading if isinstance(v, nn.Module)), None)
        self.params = _positional_params(model) if model is not None else []

    def slot(self, source: str) -> tuple[str, tuple[int | None, str | None]] | None:
        """(root source, (position, keyword)) when ``source`` reads a call argument, else None."""
        match = re.match(r"L\[('[^']+')\]", source)
        if match is None:
            return None
        name = match.group(1)[1:-1]
        root = match.group(0)
        if name in self.named:
            return root, self.named[name]
        item = re.match(re.escape(root) + r"\[([^\]]+)\]", source)
        if item is None:
            return None
        try:
            key = ast.literal_eval(item.group(1))
        except (ValueError, SyntaxError):
            return None
        if name == self.varargs and key in self.varargs_positions:
            return item.group(0), (self.varargs_positions[key], None)
        if name == self.varkw and isinstance(key, str):
            return item.group(0), (None, key)
        return None


def _module_root(source: str, frame: _Frame | None) -> str:
    """The prefix of ``source`` that names the model (the outermost nn.Module on its path), so
    constant names are the model's own parameter names (``model.layers.0.mlp.up_proj.weight``)."""
    if frame is None:
        match = re.match(r"[LG]\[[^\]]+\](\[\d+\])?", source)
        return match.group(0) if match else ""
    for end in [m.end() for m in re.finditer(r"\]|\.[A-Za-z_]\w*(?=[.\[]|$)", source)]:
        try:
            if isinstance(frame.eval(source[:end]), nn.Module):
                return source[:end]
        except Exception:  # a helper Dynamo uses in names, or a path not valid on its own
            continue
    return ""


def _first_call_value(item: _Input, example_inputs: Sequence[Any], frame: _Frame | None) -> Any:
    value = example_inputs[item.index]
    if isinstance(value, torch.SymInt | torch.SymFloat):  # a size Dynamo made symbolic: its real value
        if frame is not None:
            try:
                return frame.eval(item.source)
            except Exception:
                pass
        return torch_private.size_hint(value)
    return value


def _warn(user: list[_Input]) -> None:
    warnings.warn("fxquant backend: no options['calib_loader']; calibrating on the inputs of the first call "
                  f"({', '.join(i.source for i in user) or 'no inputs'}). Quantization scales from one batch are "
                  "rough: pass calib_loader=<representative batches> for a real calibration.", stacklevel=2)


def _mapped_batches(loader: Iterable[Any], user: list[_Input], frame: _Frame | None, call: _Arguments | None,
                    gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Iterable[tuple]:
    """The loader, each batch mapped to the tuple of this graph's remaining inputs (placeholder order)."""
    if user and frame is None:
        raise RuntimeError("fxquant backend: calib_loader needs the frame Dynamo is compiling, and none was "
                           "found (was the backend called outside torch.compile?); use fxquant.quantize_graph")
    unmapped = [i for i in user if not i.root]
    if user and (frame.nested or unmapped):
        raise ValueError(_unmappable(gm, frame, unmapped or user))
    return _Mapped(loader, user, call.params if call is not None else [], example_inputs, gm)


class _Mapped:
    """Re-iterable view of the loader (quantize_module reads it twice; nothing is copied)."""

    def __init__(self, loader: Iterable[Any], user: list[_Input], params: list[str],
                 example_inputs: Sequence[Any], graph: fx.GraphModule) -> None:
        self.loader, self.user, self.params, self.example_inputs = loader, user, params, example_inputs
        self.graph = graph  # Dynamo's graph: traced again only if a batch's sizes differ from those it fixed
        self._free: tuple[list[tuple[bool, ...]], str] | None = None

    def free_sizes(self) -> tuple[list[tuple[bool, ...]], str]:
        if self._free is None:
            self._free = _free_sizes(self.graph, self.example_inputs)
        return self._free

    def __iter__(self) -> Iterator[tuple]:
        for number, batch in enumerate(self.loader):
            args, kwargs = batch_to_call(batch)
            values = tuple(_as_graph_value(_resolve(i, args, kwargs, self.params, number), self.example_inputs[i.index])
                           for i in self.user)
            for piece in _rows_if_batch_one(values, self.user):
                _check_batch(piece, self.user, self.example_inputs, number, self.free_sizes)
                yield piece


def _positional_params(model: nn.Module) -> list[str]:
    """Positional parameter names of ``model.forward``: to map a dict batch onto a positional call."""
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    try:
        return [p.name for p in inspect.signature(model.forward).parameters.values() if p.kind in kinds]
    except (TypeError, ValueError):
        return []


def _resolve(item: _Input, args: tuple, kwargs: dict, params: list[str], number: int) -> Any:
    position, keyword = item.slot
    if position is not None and position < len(args):
        value = args[position]
    elif keyword is not None and keyword in kwargs:
        value = kwargs[keyword]
    elif position is not None and position < len(params) and params[position] in kwargs:
        value = kwargs[params[position]]
    elif keyword in params and params.index(keyword) < len(args):
        value = args[params.index(keyword)]
    else:
        wanted = f"argument {position}" if keyword is None else f"argument {keyword!r}"
        raise ValueError(f"fxquant backend: calibration batch {number} has no {wanted} (graph input {item.source}); "
                         f"it gives {len(args)} positional and keywords {sorted(kwargs)}. Yield batches that call "
                         "the model the way you call the compiled model.")
    suffix = item.source[len(item.root):]
    return eval("v" + suffix, _NAMESPACE, {"v": value}) if suffix else value  # noqa: S307


def _as_graph_value(value: Any, real: Any) -> Any:
    """Dynamo passes a Python number it does not specialize as a 0-D tensor: do the same."""
    if isinstance(real, torch.Tensor) and real.dim() == 0 and isinstance(value, (bool, int, float)):
        return torch.tensor(value, dtype=real.dtype)
    return value


def _rows_if_batch_one(values: tuple, user: list[_Input]) -> list[tuple]:
    """A graph Dynamo specialized to batch size 1 (its 0/1 specialization of a dynamic batch dim)
    is calibrated on the batch one row at a time: rows of a batch are independent inputs."""
    ones = [k for k, i in enumerate(user) if i.sizes and i.sizes[0] == 1 and isinstance(values[k], torch.Tensor)]
    rows = {values[k].shape[0] for k in ones if values[k].dim()}
    if len(rows) != 1 or (n := rows.pop()) == 1:
        return [values]
    return [tuple(v[r:r + 1] if k in ones else v for k, v in enumerate(values)) for r in range(n)]


def _free_sizes(gm: fx.GraphModule, inputs: Sequence[Any]) -> tuple[list[tuple[bool, ...]], str]:
    """For each input of a graph Dynamo compiled for fixed sizes, which of its sizes the graph does
    not depend on (True), and why none are when that cannot be told.

    Dynamo writes the call's sizes into a static graph as numbers. Traced again with every input
    size symbolic, a size the graph really uses (a view to the call's shape, a broadcast with a
    tensor of that size) becomes a constant; any other size may differ in calibration. A size used
    only as a number (x.sum(0) / 6) is not seen: calibration then computes with the call's number.
    """
    if any(isinstance(v, torch.SymInt | torch.SymFloat) for v in inputs):
        return [()] * len(inputs), "Dynamo made other sizes of this graph dynamic and kept this one fixed"
    try:
        with torch_private.fresh_tracing_context(), torch.no_grad():
            traced = make_fx(gm, tracing_mode="symbolic")(*inputs)
    except Exception as err:  # cannot tell: treat every size as fixed, and say why
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        return [()] * len(inputs), f"tracing it with symbolic sizes failed ({type(err).__name__}: {reason})"
    values = [n.meta.get("val") for n in traced.graph.nodes if n.op == "placeholder"]
    return [tuple(not is_concrete_int(d) for d in v.shape) if isinstance(v, torch.Tensor) else () for v in values], \
        "it uses the call's size there (e.g. in a view or reshape to the call's shape)"


def _check_batch(values: tuple, user: list[_Input], example_inputs: Sequence[Any], number: int,
                 free_sizes: Callable[[], tuple[list[tuple[bool, ...]], str]]) -> None:
    """Batches must fit the graph: same dtype and rank as the call, and the sizes the graph depends on."""
    for value, item in zip(values, user, strict=True):
        real = example_inputs[item.index]
        if not isinstance(real, torch.Tensor):
            continue
        if not isinstance(value, torch.Tensor) or value.dtype != real.dtype or value.dim() != real.dim():
            got = f"{value.dtype} {value.dim()}-D" if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"fxquant backend: calibration batch {number} gives {item.source} as {got}, but the "
                             f"compiled call passed {real.dtype} {real.dim()}-D; yield batches that call the model "
                             "the way you call the compiled model")
        differ = [d for d, (fixed, size) in enumerate(zip(item.sizes, value.shape, strict=True))
                  if fixed is not None and fixed != size]
        if not differ:
            continue
        free, why = free_sizes()
        fixed = [d for d in differ if not (d < len(free[item.index]) and free[item.index][d])]
        if fixed:
            shown = tuple("*" if d is None else d for d in item.sizes)
            raise ValueError(f"fxquant backend: calibration batch {number} gives {item.source} of shape "
                             f"{tuple(value.shape)}, but Dynamo compiled this graph for shape {shown} (* = dynamic) "
                             f"and it depends on the size in dim {fixed[0]}: {why}. Pass dynamic=True to "
                             "torch.compile (one graph for every batch size and length), or yield calibration "
                             "batches of the shape of the calls.")


def _unmappable(gm: fx.GraphModule, frame: _Frame, user: list[_Input]) -> str:
    ops = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")][:3]
    first = "; ".join(f"{n.name} = {getattr(n.target, '__name__', n.target)}(...)" for n in ops) or "none"
    compile_id = gm.meta.get("dynamo_compile_id", "?")
    names = sorted({i.root or i.source for i in user})
    why = (f"it starts after a graph break, and its inputs {names} are values computed by the eager code before it"
           if frame.nested else f"its inputs {names} are not arguments of the model call")
    return (f"fxquant backend: cannot calibrate graph {compile_id} of {frame.where} from calib_loader: {why}, so the "
            f"loader's batches cannot be mapped onto them. Its first ops: {first}.\n"
            "Fix: remove the graph break (torch._dynamo.explain(model)(*batch) lists them), or quantize the whole "
            "model with fxquant.quantize_graph(model, calib_loader, config) and torch.compile the result, or leave "
            "calib_loader out so each graph is calibrated on the inputs of the call that compiles it.")


def _compile_inner(inner: Any, gm: fx.GraphModule, inputs: list[Any], mode: str | None) -> Callable[..., Any]:
    if inner == NAME or inner is fxquant_backend:
        raise ValueError("options['inner'] cannot be 'fxquant' itself; use 'inductor' or 'eager'")
    if inner in (None, "inductor"):
        return torch_private.compile_with_inductor(gm, inputs, mode)
    return torch_private.backend(inner)(gm, inputs)


def _drop_constants(compiled: Callable[..., Any], keep: list[int], state: _State) -> Callable[..., Any]:
    """Dynamo calls the result with every original input (unboxed, like any backend's result);
    the lifted constants are dropped. The result holds the shared state for later recompiles."""

    def run(*args: Any) -> Any:
        return compiled(*[args[i] for i in keep])

    run.fxquant_state = state  # type: ignore[attr-defined]
    return run


# backend="fxquant" by name also where the package is imported but not installed (no entry point)
torch_private.register_backend_once(fxquant_backend, NAME)
