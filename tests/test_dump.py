"""dump: the code, table, dot and html views of a rewritten graph, and the atomic write."""

import importlib
import math
import os
import re
import sys

import pytest
import torch
from models import mlp, tensor_batches, tiny_llama, token_batches

from fxquant import QuantConfig, dump, quantize_graph
from fxquant.dump import plan_table
from fxquant.passes.common import META

FAST = QuantConfig(rotation_steps=16, block_size=16)
dump_module = importlib.import_module("fxquant.dump")  # fxquant.dump, the attribute, is the function


@pytest.fixture(scope="module")
def llama():
    return quantize_graph(tiny_llama(layers=1), token_batches(2), FAST)  # 4 groups, 7 quantized sites


def _inserted(gm):
    return [n for n in gm.graph.nodes if META in n.meta]


def _rows(table):
    """Parse the text table: cells are separated by two or more spaces."""
    lines = table.split("\n")
    header = re.split(r"\s{2,}", lines[0])
    return header, {cells[0]: dict(zip(header, cells, strict=True))
                    for cells in (re.split(r"\s{2,}", line) for line in lines[2:]) if len(cells) == len(header)}


def test_code_puts_a_comment_naming_layer_and_step_before_every_inserted_node(llama):
    code = dump(llama)
    lines = code.split("\n")
    # the code is gm.code plus comment lines, nothing else
    assert [line for line in lines if not line.lstrip().startswith("# fxquant")] == llama.code.split("\n")
    plan = llama.meta[META]["plan"]
    for node in _inserted(llama):
        info = node.meta[META]
        index = next(i for i, line in enumerate(lines) if re.match(rf"\s*{node.name} = ", line))
        comment = next(line for line in reversed(lines[:index]) if line.lstrip().startswith("#"))
        if info["role"] == "constant":  # target fxquant.<owner key>.<name>, owner the layer or group name
            step = info["target"].rsplit(".", 1)[1]
            owner = f"constants of {info['owner']}"
            assert info["owner"] in plan.sites or info["owner"] in plan.groups
        else:
            step = info["role"]
            owner = info["site"] if info["role"] in ("linear", "unpack", "dequantize") else info["group"]
        assert f"# fxquant {owner}:" in comment and step in comment.split(":", 1)[1], (node.name, comment)
    # 4 groups: each transform chain (smooth ... quantize) is one region with one comment
    assert sum("smooth, " in line and "quantize int8 per tensor" in line for line in lines) == 4


def test_table_has_one_row_per_site_with_the_plan_stats(llama):
    plan = llama.meta[META]["plan"]
    header, rows = _rows(dump(llama, fmt="table"))
    assert list(rows) == list(plan.sites)  # one row per site, in plan order
    for name, site in plan.sites.items():
        row = rows[name]
        if site.skip:
            assert row["status"] == site.skip and row["max|x| before"] == "-"
            continue
        stats = plan.groups[site.group].stats
        expected = {"max|x| before": stats["absmax_before"].max(), "max|x| after": stats["absmax_after"].max(),
                    "mean|x| before": stats["mean_abs_before"], "mean|x| after": stats["mean_abs_after"],
                    "act scale": stats["act_scale"].item(), "w error": site.stats["weight_error"]}
        for column, value in expected.items():
            assert float(row[column]) == pytest.approx(float(value), rel=1e-3), (name, column)
        assert (row["in"], row["out"], row["group"]) == (str(site.in_features), str(site.out_features), site.group)
        assert (row["w"], row["a"], row["block"], row["alpha"]) == ("4/ch", "8/tensor", "16", "0.6")
        # the transform shrinks the peak the int8 grid must cover (outlier channels have gain 20)
        assert float(row["max|x| after"]) < float(row["max|x| before"])


def test_dry_run_plan_prints_the_same_columns_with_na_for_stats(llama):
    plan = quantize_graph(tiny_llama(layers=1), token_batches(1), FAST, dry_run=True)
    header, rows = _rows(plan_table(plan))
    assert header == _rows(dump(llama, fmt="table"))[0]
    q = rows["model.layers.0.self_attn.q_proj"]
    assert q["group"] == "model.layers.0.self_attn.{q_proj,k_proj,v_proj}" and q["block"] == "16"
    assert all(q[c] == "n/a" for c in ("act scale", "max|x| before", "mean|x| after", "w error"))
    assert "excluded" in rows["lm_head"]["status"]


def test_calib_batch_adds_a_finite_sqnr_column_and_leaves_gm_unchanged(llama):
    code, state = llama.code, {k: v.clone() for k, v in llama.state_dict().items()}
    table = dump(llama, fmt="table", calib_batch=token_batches(1, seed=7)[0])
    header, rows = _rows(table)
    for name in llama.meta[META]["plan"].active_sites():
        value = float(rows[name.name]["SQNR dB (x float)"])
        # int8 per-tensor activations after DuQuant: measured 21-49 dB on this model
        assert math.isfinite(value) and value > 15, (name.name, value)
        assert rows[name.name]["SQNR dB (x,W float)"] == "n/a"  # the core keeps no float weight (yet)
    assert "activation quantization" in table  # the legend says what the column measures
    assert llama.code == code and all(torch.equal(v, state[k]) for k, v in llama.state_dict().items())


def test_sqnr_against_a_kept_float_weight_and_float_activations():
    data = tensor_batches(2, (8, 64))
    gm = quantize_graph(mlp(), data, FAST)
    plan = gm.meta[META]["plan"]
    for node in gm.graph.nodes:  # a stand-in float weight: the quantized one, so both columns must agree
        if node.meta.get(META, {}).get("role") == "linear":
            plan.sites[node.meta[META]["site"]].stats["weight_float"] = gm.get_buffer(node.args[1].target)
    sqnr = dump_module.site_sqnr(gm, data[0])
    assert all(a == pytest.approx(wa) and math.isfinite(a) for a, wa in sqnr.values()), sqnr
    # without activation quantization the site output equals its x-float reference exactly
    weights_only = quantize_graph(mlp(), data, QuantConfig(rotation_steps=16, block_size=16, a_bits=None))
    assert all(a == math.inf for a, _ in dump_module.site_sqnr(weights_only, data[0]).values())


def test_packed_weights_annotate_unpack_and_dequantize():
    data = tensor_batches(2, (8, 64))
    gm = quantize_graph(mlp(), data, QuantConfig(rotation_steps=16, block_size=16, weight_format="packed"))
    code = dump(gm)
    assert re.search(r"# fxquant 0: unpack int4 weight, dequantize int4 weight.*linear W4 A8", code), code
    assert all(math.isfinite(a) for a, _ in dump_module.site_sqnr(gm, data[0]).values())


def _quantize_lines(dot, gm):
    names = [n.name for n in gm.graph.nodes if n.meta.get(META, {}).get("role") == "quantize"]
    return [line for line in dot.split("\n") for name in names if re.match(rf'\s*"?{name}"? \[', line)]


def test_dot_with_pydot_colours_quantize_nodes(llama):
    pytest.importorskip("pydot")
    dot = dump(llama, fmt="dot")
    lines = _quantize_lines(dot, llama)
    assert len(lines) == 4 and all("fillcolor=orange" in line for line in lines), lines


def test_dot_without_pydot_is_plain_valid_graphviz(llama, monkeypatch):
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "pydot", None)  # import pydot now raises ImportError
        dot = dump(llama, fmt="dot")
    assert dot.startswith("digraph fxquant {")
    lines = _quantize_lines(dot, llama)
    assert len(lines) == 4 and all("fillcolor=orange" in line for line in lines), lines
    assert dot.count(" -> ") == sum(len(n.users) for n in llama.graph.nodes)
    pydot = pytest.importorskip("pydot")
    assert len(pydot.graph_from_dot_data(dot)[0].get_nodes()) > len(llama.graph.nodes)  # parses (+ defaults)


def _external_refs(page):
    """Anything a browser would fetch: http(s) or protocol-relative links, scripts, stylesheets, url() not #id."""
    return re.findall(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//|<script|<link|@import|url\(\s*["']?(?!#)""",
                      page, re.I)


def test_html_is_self_contained_with_a_plot_per_group(llama, tmp_path):
    pytest.importorskip("matplotlib")
    page = dump(llama, tmp_path / "report.html", fmt="html", calib_batch=token_batches(1)[0])
    assert (tmp_path / "report.html").read_text(encoding="utf-8") == page
    assert _external_refs(page) == []
    assert page.count("<svg") == len(llama.meta[META]["plan"].groups) == 4
    assert "SQNR dB (x float)" in page and "# fxquant model.layers.0.mlp.down_proj: smooth" in page
    assert "model.layers.0.self_attn.{q_proj,k_proj,v_proj}" in page


def test_html_without_matplotlib_says_how_to_get_plots_and_escapes_text(llama, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(llama.meta[META], "config", "<script>alert(1)</script>")  # shown as repr(config)
    page = dump(llama, fmt="html")
    assert "<svg" not in page and "pip install fxquant[report]" in page and _external_refs(page) == []
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<table>" in page and "# fxquant" in page


def test_write_is_atomic_and_a_failed_write_keeps_the_old_file(llama, tmp_path, monkeypatch):
    path = tmp_path / "graph.py"
    path.write_text("old")

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dump_module.os, "fsync", disk_full)  # fails after the new text went to the temp file
    with pytest.raises(OSError, match="No space"):
        dump(llama, path)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["graph.py"]  # no temp file left behind
    monkeypatch.undo()
    assert dump(llama, str(path)) == path.read_text() and os.listdir(tmp_path) == ["graph.py"]


def test_errors_name_the_fix(llama):
    with pytest.raises(ValueError, match="use one of"):
        dump(llama, fmt="svg")
    with pytest.raises(ValueError, match="calib_batch is used by"):
        dump(llama, fmt="code", calib_batch=token_batches(1)[0])
    bare = torch.fx.symbolic_trace(mlp())
    with pytest.raises(ValueError, match="quantize_graph"):
        dump(bare, fmt="table")
    assert "# fxquant" not in dump(bare)  # code of a graph fxquant never touched: no comments, no error
