"""Integer execution (QuantConfig(execution="int")): the same codes as the fake graph, an integer GEMM
on int8-held weights, no float copy of a quantized weight, one compile, 4-bit weights on disk."""

import dataclasses
import gc
import zipfile

import pytest
import torch
from models import mlp, tensor_batches, tiny_llama, token_batches
from torch import nn
from torch._dynamo.testing import CompileCounter

import fxquant
from fxquant import QuantConfig, ops, quantize_graph
from fxquant.capture import capture
from fxquant.passes import lower
from fxquant.passes.verify import check_invariants
from fxquant.quant import dequantize_weight, pack_int4, quantize_weight

FAST = QuantConfig(rotation_steps=16, block_size=16)
INT = dataclasses.replace(FAST, execution="int")
# activation settings x weight settings the integer path must reproduce
ACTIVATIONS = {"static": {}, "token_sym": {"a_granularity": "token", "a_symmetric": True},
               "token_asym": {"a_granularity": "token"}, "token_asym_4bit": {"a_granularity": "token", "a_bits": 4}}
WEIGHTS = {"channel": {}, "group16": {"w_group_size": 16}, "asym": {"w_symmetric": False},
           "asym_group16": {"w_symmetric": False, "w_group_size": 16}, "int8_asym": {"w_bits": 8, "w_symmetric": False}}


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def _fake_linear(x, qw, act, bias):
    """The fake graph's linear: fake-quantized x times the dequantized weight, in float."""
    if act == "static":
        xq = ops.fake_quant_static(x, torch.tensor([0.05]), 127)
    elif act == "token_sym":
        xq = ops.fake_quant_per_token(x, 127)
    else:
        xq = ops.fake_quant_per_token_asym(x, 15 if act.endswith("4bit") else 255)
    return torch.nn.functional.linear(xq, dequantize_weight(qw), bias)


def _int_linear(x, qw, act, bias, kernel="int_mm"):
    from fxquant.passes.lower import int_weight

    codes, w_zero = int_weight(qw)
    scale = qw.scale.t().float()
    colsum = codes.view(codes.shape[0], scale.shape[0], -1).sum(-1, dtype=torch.int32).t()
    if kernel == "x86_int4":
        codes = pack_int4(codes)
    if act == "static":
        q = ops.quantize_static_int8(x, torch.tensor([0.05]), 127)
        return ops.int8_linear(q, codes, scale * 0.05, bias, torch.float32, w_zero=w_zero, kernel=kernel)
    if act == "token_sym":
        q, s = ops.quantize_per_token_int8(x, 127)
        return ops.int8_linear(q, codes, scale, bias, torch.float32, x_scale=s, w_zero=w_zero, kernel=kernel)
    q, s, z = ops.quantize_per_token_asym_int8(x, 15 if act.endswith("4bit") else 255)
    return ops.int8_linear(q, codes, scale, bias, torch.float32, x_scale=s, x_zero=z, w_colsum=colsum, w_zero=w_zero,
                           kernel=kernel)


X86 = pytest.mark.skipif(not ops.x86_int8_kernel(), reason="no x86 quantized engine (fbgemm) in this torch")
# the kernel an int graph runs on this machine (lower.choose_kernel): fbgemm where _int_mm is slow
KERNEL = "int_mm" if ops.fast_int8_gemm() or not ops.x86_int8_kernel() else "fbgemm"


def _weight_codes(gm) -> list[torch.Tensor]:
    """The quantized linears' code tensors: int8, or two 4-bit codes per byte where fbgemm runs them."""
    return [v for k, v in gm.state_dict(keep_vars=True).items() if k.endswith((".w_int8", ".w_int4"))]


@pytest.mark.parametrize("kernel", ["int_mm", pytest.param("x86", marks=X86), pytest.param("x86_int4", marks=X86)])
@pytest.mark.parametrize("act", list(ACTIVATIONS))
@pytest.mark.parametrize("weight", list(WEIGHTS))
@pytest.mark.parametrize("shape", [(3, 5, 64, 48), (1, 7, 36, 20)])  # (batch, tokens, in, out); 36/20: odd widths
def test_integer_linear_equals_fake_linear(kernel, act, weight, shape):
    """Same codes, exact int32 sums: only the float32 rescale order differs from the fake linear."""
    batch, tokens, k, n = shape
    if "group16" in weight and k % 16:
        pytest.skip("group 16 does not tile 36 columns")
    if kernel.startswith("x86") and "int8" in weight:
        pytest.skip("fbgemm's AVX2 kernel saturates 8-bit weights: lower.choose_kernel never gives it them")
    g = torch.Generator().manual_seed(k * n)
    x = torch.randn(batch, tokens, k, generator=g) * 2
    w, bias = torch.randn(n, k, generator=g) * 0.1, torch.randn(n, generator=g)
    settings = WEIGHTS[weight]
    qw = quantize_weight(w, settings.get("w_bits", 4), group_size=settings.get("w_group_size"),
                         symmetric=settings.get("w_symmetric", True), clip="minmax")
    want, got = _fake_linear(x, qw, act, bias), _int_linear(x, qw, act, bias, kernel)
    assert got.shape == want.shape == (batch, tokens, n)
    assert _relative(got, want) < 2e-6, f"{act}/{weight}: integer vs fake relative error {_relative(got, want):.2e}"


def test_int_matmul_is_exact_in_int32():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (5, 40), dtype=torch.int8, generator=g)
    b = torch.randint(-8, 8, (40, 12), dtype=torch.int8, generator=g)
    assert torch.equal(ops.int_matmul(a, b), (a.long() @ b.long()).int())


@pytest.mark.parametrize("name", list(ACTIVATIONS)[:3] + ["asym_group16"])
def test_int_graph_equals_fake_graph_on_one_layer(name):
    """One quantized layer (the second stays float): its input is the same in both graphs, so its
    codes are too, and the outputs agree to float32 rounding."""
    settings = ACTIVATIONS[name] if name in ACTIVATIONS else WEIGHTS[name]
    model, data = mlp(), tensor_batches(3, (8, 64))
    config = dataclasses.replace(FAST, include=("^0$",), **settings)
    fake = quantize_graph(model, data, config)
    integer = quantize_graph(model, data, dataclasses.replace(config, execution="int"))
    with torch.no_grad():
        err = _relative(integer(data[0]), fake(data[0]))
    assert err < 1e-5, f"{name}: int graph vs fake graph relative error {err:.2e}"


def test_int_llama_matches_fake_and_holds_no_float_copy_of_a_quantized_weight():
    model, data = tiny_llama(), token_batches(3)
    fake = quantize_graph(model, data, FAST)
    integer = quantize_graph(model, data, INT)
    check_invariants(integer)
    plan = integer.meta["fxquant"]["plan"]
    assert {s.kernel for s in plan.active_sites()} == {KERNEL}
    state = integer.state_dict()
    # 7 linears x 2 layers: each one integer weight and one rescale, no float (out, in) matrix of theirs
    codes = _weight_codes(integer)
    assert len(codes) == 14 and {c.dtype for c in codes} == ({torch.int8} if KERNEL == "int_mm" else {torch.uint8})
    for site in plan.active_sites():
        shape = (site.out_features, site.in_features)
        floats = [k for k, v in state.items() if v.is_floating_point() and tuple(v.shape) == shape
                  and not k.startswith(("model.embed_tokens", "lm_head"))]  # (128, 64) like gate_proj: float layers
        assert not floats, f"{site.name}: float copies {floats}"
    ops_run = [n.target for n in integer.graph.nodes]
    assert ops_run.count(ops.int8_linear) == 14 and torch.ops.aten.linear.default in ops_run  # lm_head stays float
    with torch.no_grad():
        got, want = integer(**data[0]).logits, fake(**data[0]).logits
    # the same codes in every layer up to rounding-boundary flips that float32 reassociation causes
    assert _relative(got, want) < 2e-2


def test_int_graph_compiles_once_for_batch_2_to_8_and_runs_the_integer_gemm():
    gm = quantize_graph(tiny_llama(), token_batches(3), dataclasses.replace(INT, a_granularity="token"))
    graphs = []

    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    counter = CompileCounter()
    torch._dynamo.reset()
    compiled = torch.compile(gm, backend=lambda g, e: counter(g, e) and backend(g, e), fullgraph=True, dynamic=True)
    for batch in range(2, 9):
        x = torch.randint(0, 128, (batch, 16))
        with torch.no_grad():
            torch.testing.assert_close(compiled(input_ids=x).logits, gm(input_ids=x).logits)
    assert counter.frame_count == 1, f"{counter.frame_count} compiles for batch 2..8"
    targets = [n.target for n in graphs[0].graph.nodes]
    if KERNEL == "int_mm":
        assert targets.count(torch._int_mm) == 14, "every quantized linear runs torch._int_mm"
    else:  # per layer one GEMM for q/k/v, one for gate/up, one each for o_proj and down_proj
        x86 = (torch.ops.fxquant.fbgemm_int8_mm, torch.ops.fxquant.fbgemm_int8_mm.default)
        gemms = [n for n in graphs[0].graph.nodes if n.target in x86]
        assert sorted(len(n.args[1]) for n in gemms) == [1, 1, 1, 1, 2, 2, 3, 3]


def _tensor_bytes(path) -> int:
    """Bytes of the tensor members of a .pt2 archive (the graph's JSON is not counted)."""
    with zipfile.ZipFile(path) as archive:
        members = archive.infolist()
        return sum(i.file_size for i in members if "/data/" in i.filename and not i.filename.endswith("json"))


def _no_op_casts(gm) -> int:
    """aten.to nodes whose input already has the dtype they convert to (torch.export keeps them)."""
    return sum(1 for n in gm.graph.nodes if n.target is torch.ops.aten.to.dtype
               and n.args[0].meta["val"].dtype == n.args[1])


def test_save_load_round_trip_stores_4bit_weights_packed(tmp_path):
    model, data = tiny_llama(), token_batches(3)
    # the float model's own graph, saved the same way: its no-op conversions are the model's
    fxquant.save(capture(model, (), data[0]), tmp_path / "float.pt2", data[0])
    float_casts = _no_op_casts(fxquant.load(tmp_path / "float.pt2"))
    paths = {}
    for name, config in {"int4": INT, "int8": dataclasses.replace(INT, w_bits=8)}.items():
        gm = quantize_graph(model, data, config)
        paths[name] = tmp_path / f"{name}.pt2"
        fxquant.save(gm, paths[name], data[0])
        loaded = fxquant.load(paths[name])
        with torch.no_grad():
            torch.testing.assert_close(loaded(**data[1]).logits, gm(**data[1]).logits, rtol=0, atol=0)
        # unpacked once at load: integer weights as buffers, no unpack op left to run per call
        assert len(_weight_codes(loaded)) == 14
        assert all("unpack" not in str(n.target) for n in loaded.graph.nodes)
        # the rewrite adds no no-op conversions (graph size is load and compile memory)
        assert _no_op_casts(loaded) == float_casts > 0
    # the 14 quantized weights take half a byte per code at 4 bits, a byte at 8
    codes = sum(s.in_features * s.out_features for s in gm.meta["fxquant"]["plan"].active_sites())
    saved = _tensor_bytes(paths["int8"]) - _tensor_bytes(paths["int4"])
    assert saved >= 0.9 * codes / 2, f"the 4-bit archive is {saved} bytes smaller, expected ~{codes // 2}"


def test_16_bit_passthrough_is_unchanged_by_execution_int():
    model, data = tiny_llama(), token_batches(3)
    exact = dataclasses.replace(INT, w_bits=16, a_bits=16)
    gm = quantize_graph(model, data, exact)
    assert ops.int8_linear not in [n.target for n in gm.graph.nodes]
    with torch.no_grad():
        assert _relative(gm(**data[0]).logits, model(**data[0]).logits) < 1e-5


def test_float_weights_in_an_int_graph_keep_the_fake_activation_quantizer_and_say_so():
    model, data = mlp(), tensor_batches(3, (8, 64))
    gm = quantize_graph(model, data, dataclasses.replace(INT, overrides={"^2$": {"w_bits": 16}}))
    plan = gm.meta["fxquant"]["plan"]
    assert plan.sites["0"].kernel == KERNEL and plan.sites["2"].kernel == ""
    assert "fake" in fxquant.dump(gm, fmt="table").splitlines()[3]  # layer 2's row names its kernel


@pytest.mark.parametrize("field, value", [("a_granularity", "channel"), ("weight_format", "packed")])
def test_int_execution_refuses_settings_it_cannot_run_exactly(field, value):
    with pytest.raises(ValueError, match=field):
        QuantConfig(execution="int", **{field: value})


def test_int_linear_on_a_module_with_bias_and_3d_input():
    model = nn.Sequential(nn.Linear(32, 24), nn.GELU(), nn.Linear(24, 16))
    data = tensor_batches(3, (2, 5, 32), outliers=(3, 17))
    fake = quantize_graph(model, data, dataclasses.replace(FAST, include=("^0$",), block_size=8))
    integer = quantize_graph(model, data, dataclasses.replace(INT, include=("^0$",), block_size=8))
    with torch.no_grad():
        assert _relative(integer(data[0]), fake(data[0])) < 1e-5


def test_cli_execution_int_writes_an_integer_graph(tmp_path, monkeypatch):
    from fxquant.cli import main

    (tmp_path / "int_models.py").write_text(
        "import torch\n\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64))\n"
        "    g = torch.Generator().manual_seed(1)\n"
        "    return model, [torch.randn(8, 64, generator=g) for _ in range(2)]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    flags = ["--rotation-steps", "2", "--block-size", "16", "--calib-tokens", "128", "--execution", "int"]
    assert main(["quantize", "--factory", "int_models:build", "--out", "mlp.pt2", "--quiet", *flags]) == 0
    import int_models

    model, batches = int_models.build()
    expected = quantize_graph(model, batches, QuantConfig(rotation_steps=2, block_size=16, calib_tokens=128,
                                                          execution="int"))
    loaded = fxquant.load(tmp_path / "mlp.pt2")
    assert len(_weight_codes(loaded)) == 2
    x = torch.randn(5, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected(x), rtol=0, atol=0)


@X86
@pytest.mark.parametrize("kernel", ["x86", "x86_int4"])
def test_shared_gemm_gives_the_same_outputs_as_one_gemm_per_linear(monkeypatch, kernel):
    """q/k/v and gate/up read one activation: one fbgemm GEMM over their stacked weights gives each
    linear the same integer sums, so the graph's outputs equal torch._int_mm's bit for bit."""

    model, data = tiny_llama(), token_batches(3)
    config = dataclasses.replace(INT, a_granularity="token", w_group_size=16, w_symmetric=False)
    monkeypatch.setattr(lower, "choose_kernel", lambda qw: kernel)
    shared = quantize_graph(model, data, config)
    monkeypatch.setattr(lower, "choose_kernel", lambda qw: "int_mm")
    separate = quantize_graph(model, data, config)
    gemms = [n for n in shared.graph.nodes if n.target is torch.ops.fxquant.fbgemm_int8_mm.default]
    assert sorted(len(n.args[1]) for n in gemms) == [2, 2, 3, 3] and all(n.args[2] == 4 for n in gemms)
    with torch.no_grad():
        assert torch.equal(shared(**data[0]).logits, separate(**data[0]).logits)


@X86
def test_fbgemm_weights_are_packed_once_and_survive_compile_and_another_engine(monkeypatch):
    monkeypatch.setattr(lower, "choose_kernel", lambda qw: "x86_int4")  # also where int_mm is the pick
    gm = quantize_graph(mlp(), tensor_batches(3, (8, 64)), INT)
    weights = _weight_codes(gm)
    x = torch.randn(4, 64)
    with torch.no_grad():
        want = gm(x)
    packed = [ops._PREPARED[id(w), "fbgemm"].forms for w in weights]
    torch._dynamo.reset()
    compiled = torch.compile(gm, backend="eager", fullgraph=True, dynamic=True)
    engine = torch.backends.quantized.engine
    try:
        torch.backends.quantized.engine = "qnnpack"  # the user's engine: packing must still make fbgemm's
        with torch.no_grad():
            for batch in (2, 3, 4):
                compiled(x[:batch])
            got = compiled(x)
        assert torch.backends.quantized.engine == "qnnpack"
    finally:
        torch.backends.quantized.engine = engine
    assert torch.equal(got, want)
    repacked = [w for w, p in zip(weights, packed, strict=True) if ops._PREPARED[id(w), "fbgemm"].forms is not p]
    assert not repacked, "a call packed the weights again"


@pytest.mark.parametrize("kernel", [pytest.param("fbgemm", marks=X86), "int_mm"])
def test_prepared_copies_are_freed_with_their_weights_and_never_reused_for_others(kernel):
    """fbgemm's packed copy (CPU) and the int8 copy its CUDA fallback reads (run here on CPU) are made
    once per weight, dropped with it, and made again after an in-place edit."""
    gemm = torch.ops.fxquant.fbgemm_int8_mm if kernel == "fbgemm" else ops._fbgemm_int8_mm_elsewhere
    codes = torch.randint(-8, 8, (24, 32), dtype=torch.int8)
    a = torch.randint(-128, 128, (5, 32)).float()
    first = codes.clone()
    got = gemm(a, [first], 1, False)
    assert torch.equal(got, a @ codes.float().t()) and (id(first), kernel) in ops._PREPARED
    key = id(first), kernel
    del first
    gc.collect()
    assert key not in ops._PREPARED, "the prepared copy outlived its weight"
    changed = codes.clone()
    gemm(a, [changed], 1, False)
    changed.neg_()  # an in-place edit bumps the version: the next call prepares again
    assert torch.equal(gemm(a, [changed], 1, False), -(a @ codes.float().t()))


@X86
def test_x86_kernel_takes_only_weights_it_sums_exactly():
    from fxquant.passes.lower import choose_kernel

    w = torch.randn(16, 32)
    assert choose_kernel(quantize_weight(w, 8, clip="minmax")) == "int_mm"
    assert choose_kernel(quantize_weight(w, 6, clip="minmax")) == ("int_mm" if ops.fast_int8_gemm() else "x86")
    assert choose_kernel(quantize_weight(w, 4, clip="minmax")) == ("int_mm" if ops.fast_int8_gemm() else "x86_int4")


def test_dump_sqnr_of_an_int_graph_equals_the_fake_graphs():
    """The dump reads integer linears' codes (int8, or two per byte) back as the float weight they
    stand for, so its per-layer SQNR is the fake graph's."""
    import importlib

    dump_module = importlib.import_module("fxquant.dump")  # fxquant.dump, the attribute, is the function
    model, data = tiny_llama(), token_batches(3)
    fake = dump_module.site_sqnr(quantize_graph(model, data, FAST), data[0])
    integer = dump_module.site_sqnr(quantize_graph(model, data, INT), data[0])
    assert fake.keys() == integer.keys() and len(fake) == 14
    for site, (db, _) in fake.items():
        assert integer[site][0] == pytest.approx(db, abs=0.25), site  # layer 1: code flips upstream
