"""The torch.compile backend "fxquant": same result as quantize_graph, one compile, graph breaks."""

import gc
import importlib
import os
import subprocess
import sys
import warnings
import weakref

import pytest
import torch
import torch._dynamo
from models import CountingLoader, mlp, tensor_batches, tiny_llama, token_batches
from torch import nn
from torch._dynamo.exc import BackendCompilerFailed
from torch._dynamo.testing import CompileCounter

import fxquant.backend
from fxquant import QuantConfig, quantize_graph
from fxquant.passes.common import META
from fxquant.passes.lift import LiftConstants, target_from_source

FAST = QuantConfig(rotation_steps=4, block_size=16, calib_tokens=256)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compile(model, dynamic=None, **options):
    return torch.compile(model, backend="fxquant", dynamic=dynamic,
                         options={"config": FAST, "inner": "eager", **options})


class Recorder:
    """An inner backend that keeps every graph it is handed (and runs it eagerly)."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward


class Break(nn.Module):
    """Two linears with a graph break between them: Dynamo captures two graphs."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 64)

    def forward(self, x):
        h = torch.relu(self.a(x))
        torch._dynamo.graph_break()
        return self.b(h)


def _sqnr(ref, out):
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean()))


@torch.no_grad()
def test_mlp_matches_compiled_quantize_graph():
    data = tensor_batches(3)
    reference = torch.compile(quantize_graph(mlp(), data, FAST), backend="eager")
    compiled = _compile(mlp(), calib_loader=data, dynamic=True)
    for rows in (8, 3):
        x = torch.randn(rows, 64) * 5
        torch.testing.assert_close(compiled(x), reference(x))


@torch.no_grad()
def test_llama_matches_compiled_quantize_graph_for_keyword_and_positional_calls():
    data = token_batches(2)
    reference = torch.compile(quantize_graph(tiny_llama(layers=1), data, FAST), backend="eager")
    compiled = _compile(tiny_llama(layers=1), calib_loader=data, dynamic=True)
    ids = torch.randint(0, 128, (3, 12))
    expected = reference(input_ids=ids).logits
    torch.testing.assert_close(compiled(input_ids=ids).logits, expected)
    # dict batches also map onto a positional call: by the name of forward's first parameter
    torch.testing.assert_close(compiled(ids).logits, expected)


@torch.no_grad()
def test_one_compile_for_ten_calls_with_changing_batch_sizes_and_no_weight_changes():
    model = tiny_llama(layers=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    counter = CompileCounter()
    compiled = torch.compile(model, backend="fxquant", dynamic=True,
                             options={"calib_loader": token_batches(2), "config": FAST, "inner": counter})
    sizes = [2, 3, 5, 4, 8, 2, 6, 1, 7, 1]
    for i, batch in enumerate(sizes):
        compiled(input_ids=torch.randint(0, 128, (batch, 8 + i)))
        if i < sizes.index(1):
            assert counter.frame_count == 1, f"recompiled at call {i} (batch {batch})"
    # batch size 1 specializes the dynamic batch dim once (0/1 specialization), nothing else does
    assert counter.frame_count == 2, f"{counter.frame_count} compiles over {len(sizes)} calls"
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a parameter or buffer changed"


@torch.no_grad()
def test_without_loader_warns_once_and_calibrates_on_the_first_call():
    x = tensor_batches(1, (8, 64), seed=3)[0]
    reference = quantize_graph(mlp(), [x], FAST)
    compiled = _compile(mlp())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = compiled(x)
        compiled(torch.randn(5, 64))  # a recompile (static -> dynamic batch): no second warning
    messages = [str(w.message) for w in caught if "fxquant" in str(w.message)]
    assert len(messages) == 1 and "calib_loader" in messages[0], messages
    torch.testing.assert_close(first, reference(x))


@torch.no_grad()
def test_graph_break_with_loader_quantizes_first_graph_and_names_the_unmappable_one():
    recorder = Recorder()
    compiled = _compile(Break(), calib_loader=tensor_batches(2), inner=recorder, dynamic=True)
    with pytest.raises(BackendCompilerFailed) as err:
        compiled(torch.randn(4, 64))
    message = str(err.value)
    # the error names the graph after the break, says why, and what to do instead
    for words in ("torch_dynamo_resume_in_forward", "L['h']", "graph break", "quantize_graph", "calib_loader out"):
        assert words in message, message
    # the graph before the break reads only the call's argument: it was calibrated and quantized
    assert len(recorder.graphs) == 1
    assert any(n.meta.get(META, {}).get("role") == "quantize" for n in recorder.graphs[0].graph.nodes)


@torch.no_grad()
def test_graph_break_without_loader_quantizes_each_graph_on_what_it_receives():
    model = Break()
    x = tensor_batches(1, (16, 64))[0]
    recorder = Recorder()
    compiled = _compile(model, inner=recorder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = compiled(x)
    assert len(recorder.graphs) == 2  # before and after the break
    for gm in recorder.graphs:
        quantized = [n for n in gm.graph.nodes if n.meta.get(META, {}).get("role") == "quantize"]
        assert len(quantized) == 1, gm.code  # one linear each, its input quantized once
    # W4A8 of two random 64x64 layers: well above 15 dB against float (measured ~25 dB)
    assert _sqnr(model(x), out) > 15, _sqnr(model(x), out)


@torch.no_grad()
def test_lifted_constants_keep_the_model_names_and_lifting_twice_changes_nothing():
    assert target_from_source("._modules['model']._modules['layers']._modules['0']._parameters['weight']") == \
        "model.layers.0.weight"
    recorder = Recorder()
    _compile(mlp(), calib_loader=tensor_batches(2), inner=recorder, dynamic=True)(torch.randn(4, 64))
    gm = recorder.graphs[0]
    # the plan sees the model's own layer names, as with quantize_graph (so include/exclude match alike)
    assert list(gm.meta[META]["plan"].sites) == ["0", "2"]
    assert {"0.bias", "2.bias"} <= {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    # left as inputs: the batch size (a SymInt under dynamic=True) and x; the 4 parameters are gone
    assert len(placeholders) == 2 and not any("parameters" in name for name in placeholders), placeholders
    again = LiftConstants({"l_fn_modules_0_parameters_weight_": ("0.weight", torch.zeros(1))})(gm)
    assert not again.modified


def test_unknown_option_is_rejected_with_the_allowed_ones():
    compiled = torch.compile(mlp(), backend="fxquant", options={"calib_loadr": tensor_batches(1)})
    with pytest.raises(BackendCompilerFailed, match=r"unknown option\(s\) \['calib_loadr'\].*calib_loader"):
        compiled(torch.randn(2, 64))


class FixedView(nn.Module):
    """Views its output by the input's batch size: Dynamo's static graph holds that size as a number."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(64, 64)

    def forward(self, x):
        return self.a(x).view(x.shape[0], 4, 16).softmax(-1).flatten(1)


@torch.no_grad()
def test_static_graph_calibrates_on_another_batch_size_where_it_does_not_depend_on_it():
    data = tensor_batches(2, (4, 64))
    reference = quantize_graph(mlp(), data, FAST)
    compiled = _compile(mlp(), calib_loader=data)  # dynamic=None: the first graph is static (6 rows)
    x = torch.randn(6, 64) * 5
    torch.testing.assert_close(compiled(x), reference(x))


def test_static_graph_that_depends_on_the_batch_size_says_to_compile_dynamic():
    compiled = _compile(FixedView(), calib_loader=tensor_batches(2, (8, 64)))  # dynamic=None: static graph
    with pytest.raises(BackendCompilerFailed, match=r"shape \(8, 64\).*\(3, 64\).*dim 0.*view.*dynamic=True"):
        compiled(torch.randn(3, 64))
    torch._dynamo.reset()
    # calibration batches of the call's shape serve that graph
    compiled = _compile(FixedView(), calib_loader=tensor_batches(2, (3, 64)))
    assert compiled(torch.randn(3, 64)).shape == (3, 64)


def test_dict_batches_for_a_tensor_model_name_the_missing_argument():
    compiled = _compile(mlp(), calib_loader=[{"inputs": torch.randn(4, 64)}])
    with pytest.raises(BackendCompilerFailed, match="calibration batch 0 has no argument 0"):
        compiled(torch.randn(2, 64))


def test_registration_is_guarded_against_duplicates():
    from torch._dynamo.backends.registry import lookup_backend

    importlib.reload(fxquant.backend)  # registering again must not raise
    assert lookup_backend("fxquant") is not None


def test_entry_point_registers_the_backend_in_a_fresh_process():
    script = (
        "import sys, torch\n"
        "assert 'fxquant' in torch._dynamo.list_backends(), torch._dynamo.list_backends()\n"
        "assert 'fxquant' not in sys.modules\n"
        "torch.manual_seed(0)\n"
        "model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32))\n"
        "compiled = torch.compile(model, backend='fxquant', options={'inner': 'eager'})\n"
        "import warnings; warnings.simplefilter('ignore')\n"
        "with torch.no_grad():\n"
        "    out = compiled(torch.randn(4, 32))\n"
        "assert 'fxquant.backend' in sys.modules and torch.isfinite(out).all()\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": ""}  # found through the installed entry point, not the tests' path
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(sys.executable), env=env)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


@torch.no_grad()
def test_inductor_is_the_default_inner_compiler():
    data = tensor_batches(3)
    reference = quantize_graph(mlp(), data, FAST)
    compiled = torch.compile(mlp(), backend="fxquant", dynamic=True, options={"calib_loader": data, "config": FAST})
    x = torch.randn(6, 64) * 5
    torch.testing.assert_close(compiled(x), reference(x), rtol=1e-4, atol=1e-4)


class _Loader:
    """A re-iterable loader that can be weakly referenced (a list cannot)."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


@torch.no_grad()
def test_nothing_of_a_compile_stays_alive_once_the_compiled_model_and_dynamo_cache_are_gone():
    loader = _Loader(tensor_batches(2))
    data = tensor_batches(2, seed=1)
    batches = (b for b in data)  # a generator: the backend keeps its batches in a list for recompiles
    refs = [weakref.ref(loader), weakref.ref(batches), *(weakref.ref(b) for b in data)]
    del data
    for options in ({"calib_loader": loader}, {"calib_loader": batches}):
        compiled = _compile(mlp(), dynamic=True, **options)
        compiled(torch.randn(4, 64))
        compiled(torch.randn(1, 64))  # a recompile (batch 1) shares the state of the first compile
        refs.append(weakref.ref(compiled))
        del compiled, options
    assert len(fxquant.backend._STATE) == 2, "one state per torch.compile call while its graphs live"
    del loader, batches
    torch._dynamo.reset()
    gc.collect()
    assert [r() for r in refs] == [None] * len(refs), "a loader, batch or compiled model outlived its compile"
    assert not fxquant.backend._STATE


@torch.no_grad()
def test_recompile_for_a_new_batch_size_reuses_calibration_and_solution():
    """dynamic=None: the second batch size recompiles (automatic dynamic). The recompiled graph has
    other sizes but the same linears and weights: it gets the first compile's quantization without
    reading the loader again, and computes what that first graph computes."""
    loader = CountingLoader(tensor_batches(3, (4, 64)))
    recorder = Recorder()
    compiled = _compile(mlp(), calib_loader=loader, inner=recorder)
    x = torch.randn(6, 64) * 5
    first = compiled(x)
    passes = loader.passes
    assert passes >= 0.99
    y = torch.randn(9, 64) * 5
    second = compiled(y)
    assert len(recorder.graphs) == 2, "the second batch size should recompile (automatic dynamic)"
    assert loader.passes == passes, "the recompile read the loader again"
    static, dynamic = recorder.graphs
    constants = {k: v for k, v in static.state_dict().items()}
    for name, value in dynamic.state_dict().items():  # the same transforms, scales and weights
        torch.testing.assert_close(value, constants[name], rtol=0, atol=0)
    by_first = static(y[:6])  # the first graph (fixed to 6 rows) on the same rows: rows are independent
    torch.testing.assert_close(second[:6], by_first[0] if isinstance(by_first, tuple | list) else by_first)
    torch.testing.assert_close(first, compiled(x))


@torch.no_grad()
def test_a_different_graph_over_the_same_weights_is_solved_on_its_own():
    """Another config is another solution: nothing is reused across torch.compile calls either."""
    loader = CountingLoader(tensor_batches(3, (4, 64)))
    model = mlp()
    _compile(model, calib_loader=loader)(torch.randn(6, 64))
    passes = loader.passes
    torch._dynamo.reset()
    _compile(model, calib_loader=loader)(torch.randn(6, 64))
    assert loader.passes == pytest.approx(2 * passes)
