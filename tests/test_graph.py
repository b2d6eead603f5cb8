"""Structure of the rewritten graph: constants, meta, weight sharing, idempotent passes."""

import dataclasses

import torch
from conftest import op_counts, sqnr
from models import FlowLoop, mlp, tensor_batches, tiny_llama, token_batches

from fxquant import QuantConfig, quantize_graph
from fxquant.passes.cleanup import DropUnusedConstants
from fxquant.passes.common import META
from fxquant.passes.normalize import Normalize
from fxquant.passes.quantize import QuantizeActivations, QuantizeWeights
from fxquant.passes.transform import InsertTransforms
from fxquant.passes.verify import check_invariants

FAST = QuantConfig(rotation_steps=16, block_size=16)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_llama_graph_holds_only_what_forward_reads_and_model_is_unchanged():
    model = tiny_llama()
    before = _state(model)
    use_cache = model.config.use_cache
    gm = quantize_graph(model, token_batches(3), FAST)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert model.config.use_cache == use_cache
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    assert set(gm.state_dict()) <= read, f"unread tensors kept: {sorted(set(gm.state_dict()) - read)[:5]}"
    # no float original of a quantized weight survives: 7 linears x 2 layers, each one fxquant weight
    originals = [k for k in gm.state_dict() if k.endswith("proj.weight") and not k.startswith("fxquant.")]
    assert originals == []
    assert sum(k.startswith("fxquant.") and k.endswith(".weight") for k in gm.state_dict()) == 14
    check_invariants(gm)


def test_every_inserted_node_carries_fxquant_meta():
    gm = quantize_graph(tiny_llama(), token_batches(2), FAST)
    inserted = [n for n in gm.graph.nodes if n.op == "call_function"
                and (getattr(n.target, "__module__", "") == "fxquant.ops" or n.target is torch.mul)]
    roles = [n.meta.get(META, {}).get("role") for n in inserted]
    # 2 layers x 4 groups (qkv, o, gate/up, down): one smooth and one quantize node each;
    # rotations and permutations where the greedy search found one worth keeping
    assert roles.count("smooth") == 8 and roles.count("quantize") == 8, roles
    assert roles.count("rotate") + roles.count("rotate2") >= 8, roles
    assert None not in roles, [n.format_node() for n in inserted if META not in n.meta]
    for node in inserted:
        assert node.meta[META]["group"] in gm.meta[META]["plan"].groups


def test_loop_calls_share_one_weight_and_every_call_is_calibrated():
    model = FlowLoop(steps=3)
    gm = quantize_graph(model, tensor_batches(3, (4, 64)), FAST)
    plan = gm.meta[META]["plan"]
    expert = plan.sites["expert.0"]
    assert expert.calls == 3
    assert len(plan.groups["expert.0"].inputs) == 3  # the transform is applied on each call's input
    weights = [k for k in gm.state_dict() if k.endswith(".weight")]
    assert sorted(weights) == ["fxquant.encoder.weight", "fxquant.expert_0.weight", "fxquant.expert_2.weight"]
    linears = [n for n in gm.graph.nodes if n.meta.get(META, {}).get("role") == "linear"]
    assert len(linears) == 1 + 3 * 2
    # every call counted in calibration: 3 batches x 4 rows x 3 calls
    assert plan.groups["expert.0"].stats["tokens"] == 3 * 4 * 3


def test_passes_are_idempotent():
    gm = quantize_graph(tiny_llama(), token_batches(2), FAST)
    plan = gm.meta[META]["plan"]
    code = gm.code
    assert not Normalize()(gm).modified
    assert not InsertTransforms(plan, {}, {})(gm).modified
    assert not QuantizeActivations(plan, {})(gm).modified
    assert not QuantizeWeights(plan, {}, "fake")(gm).modified
    assert not DropUnusedConstants()(gm).modified
    assert gm.code == code


def test_packed_weights_hold_int4_codes_and_match_fake():
    data = token_batches(2)
    fake = quantize_graph(tiny_llama(), data, FAST)
    packed = quantize_graph(tiny_llama(), data, QuantConfig(rotation_steps=16, block_size=16, weight_format="packed"))
    codes = [v for k, v in packed.state_dict().items() if k.endswith("w_packed")]
    assert len(codes) == 14 and all(c.dtype == torch.uint8 for c in codes)
    assert not any(k.endswith(".weight") and k.startswith("fxquant.") for k in packed.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(packed(**data[0]).logits, fake(**data[0]).logits, rtol=1e-4, atol=1e-4)


def test_same_seed_and_data_give_bit_identical_graphs():
    a = quantize_graph(tiny_llama(), token_batches(2), FAST)
    b = quantize_graph(tiny_llama(), token_batches(2), FAST)
    assert a.code == b.code
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    c = quantize_graph(tiny_llama(), token_batches(2), QuantConfig(rotation_steps=16, block_size=16, seed=1))
    assert not torch.equal(c.state_dict()["fxquant.model_layers_0_mlp_down_proj.weight"],
                           sa["fxquant.model_layers_0_mlp_down_proj.weight"])


def test_dry_run_returns_plan_without_rewriting():
    plan = quantize_graph(tiny_llama(), token_batches(1), FAST, dry_run=True)
    table = plan.table()
    assert "model.layers.0.self_attn.{q_proj,k_proj,v_proj}" in table
    assert "lm_head" in table and "excluded" in table
    assert len(plan.groups) == 8 and len(plan.active_sites()) == 14


def test_bfloat16_model_keeps_its_dtype_and_float32_rotations():
    model = tiny_llama().to(torch.bfloat16)
    gm = quantize_graph(model, token_batches(2), FAST)
    state = gm.state_dict()
    rotations = [v for k, v in state.items() if k.endswith(("rot1", "rot2"))]
    assert rotations and all(r.dtype == torch.float32 for r in rotations)
    weights = [v for k, v in state.items() if k.startswith("fxquant.") and k.endswith(".weight")]
    assert weights and all(w.dtype == torch.bfloat16 for w in weights)
    fp32_model = tiny_llama()
    fp32_gm = quantize_graph(fp32_model, token_batches(2), FAST)
    ids = token_batches(1, seed=5)[0]
    with torch.no_grad():
        got = gm(**ids).logits
        bf16 = sqnr(got.float(), model(**ids).logits.float())
        fp32 = sqnr(fp32_gm(**ids).logits, fp32_model(**ids).logits)
    assert got.dtype == torch.bfloat16
    # quantization costs the bf16 model about what it costs the fp32 one
    assert bf16 > fp32 - 3, f"SQNR vs own float model: bf16 {bf16:.1f} dB, fp32 {fp32:.1f} dB"


def test_calibration_copy_stops_at_the_last_observer():
    """What runs after the last observed activation (an LLM's vocabulary projection) is cut from
    the calibration copy; the statistics are those of the full graph."""
    from fxquant.calibrate import GramBudget, InputStats, observed_copy
    from fxquant.capture import capture

    model = mlp()
    x = torch.randn(8, 64)
    gm = capture(model, (x,), {})
    first = next(n for n in gm.graph.nodes if n.op == "placeholder")
    stats = InputStats("0", 64, 16, 0, gram=GramBudget(2**30))
    observed = observed_copy(gm, [(first, stats)])
    ops = [n for n in observed.graph.nodes if n.op == "call_function"]
    assert ops == [], f"nothing should run after the only observer, got {ops}"
    assert observed(x) is None
    torch.testing.assert_close(stats.absmax, x.abs().amax(0))
    torch.testing.assert_close(stats.gram, (x.T @ x).double())
    assert len(list(gm.graph.nodes)) > len(list(observed.graph.nodes))  # the original graph is untouched


def test_gram_accumulates_in_block_rows_and_reads_symmetric():
    from fxquant.calibrate import GramBudget, InputStats

    stats = InputStats("0", 300, 16, 0, gram=GramBudget(2**30))  # 300 columns: block rows of 128, 128 and 44
    batches = [torch.randn(2, 50, 300, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    for x in batches:
        stats.update(x)
    x = torch.cat([b.reshape(-1, 300) for b in batches]).double()
    assert torch.equal(stats.gram, stats.gram.T)
    torch.testing.assert_close(stats.gram, x.T @ x, rtol=1e-5, atol=1e-4)
    stats.update(batches[0])  # reading in between does not disturb later sums
    again = batches[0].reshape(-1, 300).double()
    torch.testing.assert_close(stats.gram, x.T @ x + again.T @ again, rtol=1e-5, atol=1e-4)


def test_static_scales_from_kept_inputs_match_a_second_pass(monkeypatch):
    """Static scales come from the first pass's inputs, replayed through the graph's own transform
    ops, unless they exceed calib_cache_gb: then the loader runs again; both agree."""
    from fxquant import api

    runs = []
    run_loader = api.run_loader
    monkeypatch.setattr(api, "run_loader", lambda gm, loader, desc: runs.append(desc) or run_loader(gm, loader, desc))
    model, batches = tiny_llama(), token_batches(3)
    kept = quantize_graph(model, batches, FAST)
    assert runs == ["fxquant calibrate"]
    runs.clear()
    again = quantize_graph(model, batches, dataclasses.replace(FAST, calib_cache_gb=1e-6))  # ~1 KB: over budget
    assert runs == ["fxquant calibrate", "fxquant scales"]
    groups = kept.meta[META]["plan"].groups
    assert groups and all("act_scale" in g.stats for g in groups.values())
    for name, g in groups.items():
        other = again.meta[META]["plan"].groups[name].stats["act_scale"]
        torch.testing.assert_close(g.stats["act_scale"], other, rtol=2e-3, atol=0)
    x = batches[0]
    torch.testing.assert_close(kept(**x).logits, again(**x).logits, rtol=1e-2, atol=1e-2)


class _TwoLayers(torch.nn.Module):
    """Two linears at a.<first> and <second>; a.b_c and a_b.c read the same once dots become underscores."""

    def __init__(self, second: str = "a_b", first: str = "b_c") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.ModuleDict({first: torch.nn.Linear(64, 64)})
        self.add_module(second, torch.nn.ModuleDict({"c": torch.nn.Linear(64, 64)}))
        self.names = first, second

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.names[1])["c"](torch.relu(self.a[self.names[0]](x)))


@torch.no_grad()
def test_layers_whose_names_read_the_same_keep_their_own_constants():
    model, data = _TwoLayers(), tensor_batches(2, (8, 64))
    x = tensor_batches(1, (8, 64), seed=3)[0]
    # 16 bits: transforms only, exact in float; a shared constant would make it wrong
    exact = quantize_graph(model, data, dataclasses.replace(FAST, w_bits=16, a_bits=16))
    torch.testing.assert_close(exact(x), model(x), rtol=1e-4, atol=1e-4)
    # quantized: the same graph as for the same layers under names that do not collide
    quantized = quantize_graph(model, data, FAST)
    assert torch.equal(quantized(x), quantize_graph(_TwoLayers("d", "e"), data, FAST)(x))
    # each layer's constants sit in a container of its own, named after it and tagged with it
    owners = {}
    for node in quantized.graph.nodes:
        if node.meta.get(META, {}).get("role") == "constant":
            owners.setdefault(node.meta[META]["owner"], set()).add(node.target.rsplit(".", 1)[0])
    assert owners == {"a.b_c": {"fxquant.a_b_c"}, "a_b.c": {"fxquant.a_b_c_"}}, owners


def test_rewritten_graphs_have_exactly_the_expected_nodes():
    """Per-op node counts of two small rewritten graphs (smoothing only: no rotation to find)."""
    gm = quantize_graph(mlp(), tensor_batches(2, (8, 64)), QuantConfig(rotation_steps=0, weight_format="packed"))
    assert op_counts(gm) == {
        "placeholder": 1, "output": 1, "call_module": 1,  # the input, the output, export's guard
        "aten.linear.default": 2, "aten.relu.default": 1,  # the model's own ops
        "torch.mul": 2, "fxquant.ops.fake_quant_static": 2,  # per group input: smooth, quantize
        "fxquant.ops.unpack_int4": 2, "fxquant.ops.dequantize_weight": 2,  # per weight
        "get_attr": 10,  # per group inv_smooth, act_scale; per weight w_packed, w_scale; 2 biases
    }
    # a loop: 3 calls of the expert read one set of constants; each call's input gets its own transform
    gm = quantize_graph(FlowLoop(steps=3), tensor_batches(2, (4, 64)), QuantConfig(rotation_steps=0))
    assert op_counts(gm) == {
        "placeholder": 1, "output": 1, "call_module": 1,
        "aten.linear.default": 7, "aten.gelu.default": 3, "aten.add.Tensor": 6, "aten.mul.Tensor": 3,
        "aten.zeros_like.default": 1,
        "torch.mul": 7, "fxquant.ops.fake_quant_static": 7,  # encoder once, 2 expert layers x 3 calls
        "get_attr": 12,  # 3 layers x (weight, bias, inv_smooth, act_scale)
    }
