"""Tests 2 and 3: one compile for any batch size, no graph break, nothing mutated; the seed failure."""

import torch
import torch._dynamo
from models import lazy_mlp, mlp, tensor_batches, tiny_llama, token_batches
from torch._dynamo.testing import CompileCounter

from fxquant import QuantConfig, quantize_graph

FAST = QuantConfig(rotation_steps=16, block_size=16)


def _snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_quantized_llama_compiles_once_for_all_batch_sizes_without_graph_breaks():
    gm = quantize_graph(tiny_llama(), token_batches(3), FAST)
    ids = torch.randint(0, 128, (2, 16))
    explain = torch._dynamo.explain(gm)(input_ids=ids)
    assert explain.graph_break_count == 0, explain.break_reasons
    assert explain.graph_count == 1

    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(gm, backend=counter, fullgraph=True, dynamic=True)
    before = _snapshot(gm)
    calls = 0
    for seq in (16, 24):
        for batch in (2, 4, 8):
            x = torch.randint(0, 128, (batch, seq))
            with torch.no_grad():
                torch.testing.assert_close(compiled(input_ids=x).logits, gm(input_ids=x).logits)
            calls += 1
    while calls < 10:
        with torch.no_grad():
            compiled(input_ids=torch.randint(0, 128, (4, 16)))
        calls += 1
    assert counter.frame_count == 1, f"compiled {counter.frame_count} times across batch sizes 2/4/8 x 2 lengths"
    after = _snapshot(gm)
    assert all(torch.equal(before[k], after[k]) for k in before), "a buffer or parameter changed at run time"


def test_lazy_style_module_recompiles_while_fxquant_graph_compiles_once():
    data = tensor_batches(6, (8, 64))
    float_model = mlp()
    lazy = lazy_mlp(mlp())
    torch._dynamo.reset()
    lazy_counter = CompileCounter()
    lazy_compiled = torch.compile(lazy, backend=lazy_counter)
    with torch.no_grad():
        for x in data:
            lazy_compiled(x)

    gm = quantize_graph(float_model, data[:3], QuantConfig(a_granularity="tensor", rotation_steps=16))
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(gm, backend=counter)
    with torch.no_grad():
        for x in data:
            compiled(x)
    # the lazy module mutates self.scale / self.calls in forward: every calibration call changes
    # the guarded Python state, so Dynamo recompiles; the fxquant graph has no such state
    assert lazy_counter.frame_count >= 3, f"lazy-style module compiled {lazy_counter.frame_count} times"
    assert counter.frame_count == 1, f"fxquant graph compiled {counter.frame_count} times"


def test_inductor_compiled_graph_matches_eager_graph():
    gm = quantize_graph(tiny_llama(layers=1), token_batches(2), FAST)
    torch._dynamo.reset()
    compiled = torch.compile(gm, fullgraph=True, dynamic=True)
    x = torch.randint(0, 128, (3, 20))
    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids=x).logits, gm(input_ids=x).logits, rtol=1e-4, atol=1e-4)


def _batch_sizes_compiles(gm, make, backend, mark: bool) -> int:
    """Compiles for calls of batch 2, 1, 3, 1 (the first call marked when ``mark``), each checked
    against the eager graph."""
    import fxquant

    torch._dynamo.reset()
    counter = backend()
    compiled = torch.compile(gm, backend=counter, fullgraph=True, dynamic=True)
    for number, batch in enumerate((2, 1, 3, 1)):
        inputs = make(batch)
        if mark and number == 0:
            fxquant.mark_batch_unbacked(inputs)
        with torch.no_grad():
            got, want = compiled(**inputs), gm(**inputs)
        got, want = getattr(got, "logits", got), getattr(want, "logits", want)
        torch.testing.assert_close(got, want)
    return counter.frame_count


def test_batch_size_1_after_batch_2_compiles_once_with_mark_batch_unbacked():
    from models import FlowLoop

    llama = quantize_graph(tiny_llama(), token_batches(3), FAST)
    flow = quantize_graph(FlowLoop(), tensor_batches(3, (4, 64)), FAST)
    cases = {"llama": (llama, lambda b: {"input_ids": torch.randint(0, 128, (b, 16))}),
             "flow": (flow, lambda b: {"obs": torch.randn(b, 64)})}
    for name, (gm, make) in cases.items():
        assert _batch_sizes_compiles(gm, make, CompileCounter, mark=False) == 2, f"{name}: the problem is gone?"
        assert _batch_sizes_compiles(gm, make, CompileCounter, mark=True) == 1, name


def test_mark_batch_unbacked_holds_through_inductor():
    from torch._dynamo.testing import CompileCounterWithBackend

    gm = quantize_graph(tiny_llama(layers=1), token_batches(3), FAST)
    compiles = _batch_sizes_compiles(gm, lambda b: {"input_ids": torch.randint(0, 128, (b, 16))},
                                     lambda: CompileCounterWithBackend("inductor"), mark=True)
    assert compiles == 1
