"""dump: code, table, dot and html views of a rewritten graph, for review.

Read-only: nothing here edits the GraphModule or recomputes calibration statistics. What is
shown comes from node.meta["fxquant"] and the plan's stats; a field the core did not keep is
shown as "n/a". The one measurement made here is the optional per-site SQNR on ``calib_batch``.
"""

from __future__ import annotations

import html
import io
import math
import os
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from . import ops, torch_private
from .capture import batch_to_call
from .files import check_writable, write_atomic
from .passes.common import META, copy_graph_module, fetch_attr
from .plan import QuantPlan

FORMATS = ("code", "table", "dot", "html")
# Graphviz X11 names that are also CSS colour names, so the dot and html views agree.
COLOURS = {"smooth": "lightskyblue", "rotate": "lightskyblue", "permute": "lightskyblue", "rotate2": "lightskyblue",
           "quantize": "orange", "unpack": "gold", "dequantize": "gold", "linear": "palegreen", "constant": "lightgrey"}
SQNR_HEADERS = ("SQNR dB (x float)", "SQNR dB (x,W float)")
SQNR_LEGEND = ("SQNR dB (x float): the site's output vs the same layer on its transformed input without "
               "activation quantization (quantized weight kept), on calib_batch",
               "SQNR dB (x,W float): vs the transformed float weight on that input (weight + activation "
               "error); n/a unless the core kept site.stats['weight_float']")
REPORT_HINT = "Plots need matplotlib: pip install fxquant[report]"
Sqnr = dict[str, tuple[float, float | None]]  # site -> (vs x float, vs x and W float)


def dump(gm: fx.GraphModule, path: str | os.PathLike | None = None, fmt: str = "code",
         calib_batch: Any = None) -> str:
    """``gm`` (as quantize_graph returns it) as annotated "code", a "table" per site, "dot" or "html".

    Returns the text and, when ``path`` is given, writes it atomically. ``calib_batch`` (one loader
    batch: Tensor, tuple or dict) adds per-site SQNR columns to "table" and "html".
    """
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"dump(gm=...) takes a GraphModule (as quantize_graph or fxquant.load return), got "
                        f"{type(gm).__name__}; quantize the model first: dump(quantize_graph(model, loader))")
    if fmt not in FORMATS:
        raise ValueError(f"dump(fmt={fmt!r}) is not a format: use one of {FORMATS}")
    if path is not None:  # before the SQNR runs and the rendering
        check_writable(path, "dump path")
    if calib_batch is not None and fmt not in ("table", "html"):
        raise ValueError(f"calib_batch is used by fmt='table' and fmt='html' only, not fmt={fmt!r}; drop it")
    if fmt in ("code", "dot"):
        text = annotated_code(gm) if fmt == "code" else graph_dot(gm)
    else:
        plan = gm.meta.get(META, {}).get("plan")
        if plan is None:
            raise ValueError(f"dump(fmt={fmt!r}) needs gm.meta['fxquant']['plan'], which quantize_graph sets on "
                             "the GraphModule it returns; this one has none (not rewritten by fxquant, or its meta "
                             "was lost in save/load). fmt='code' and fmt='dot' work without it")
        sqnr = site_sqnr(gm, calib_batch) if calib_batch is not None else None
        text = plan_table(plan, sqnr) if fmt == "table" else _html(gm, plan, sqnr)
    if path is not None:
        _write_atomic(os.fspath(path), text)
    return text


# --- code ----------------------------------------------------------------------------------------------
def _step(info: dict) -> str:
    role, bits = info.get("role", "?"), info.get("bits")
    if role == "quantize":
        return f"quantize int{bits} " + ("dynamic per token" if info.get("granularity") == "token"
                                         else f"per {info.get('granularity')}")
    if role in ("unpack", "dequantize"):
        return f"{role} int{bits} weight"
    if role == "linear":
        kernel = f" ({info['kernel']})" if info.get("kernel") else ""
        return f"linear W{info.get('w_bits', 'float')} A{info.get('a_bits', 'float')}{kernel}"
    return info.get("target", "?").rsplit(".", 1)[-1] if role == "constant" else role


def _owner(info: dict) -> str:
    """The group (transform chain) or layer (linear, weight) a node belongs to."""
    if info.get("role") == "constant":  # its owner, or the key of target "fxquant.<owner key>.<name>"
        return info.get("owner") or (info.get("target", "").split(".") + ["?"])[1]
    if info.get("role") in ("smooth", "rotate", "permute", "rotate2", "quantize"):
        return info.get("group", "?")
    return info.get("site", info.get("group", "?"))


def _annotated_lines(gm: fx.GraphModule) -> list[tuple[str, str | None]]:
    """Lines of gm.code, with a "# fxquant <owner>: <steps>" comment before each run of one owner's lines.

    Lines are matched to nodes by the name each assigns (FX emits ``name = ...`` once per node);
    torch's private ``_lineno_map`` is off by the blank lines its codegen strips (torch 2.13).
    Returns (line, None) for code and (comment, role of its first node) for comments.
    """
    by_name = {n.name: n for n in gm.graph.nodes}
    out: list[tuple[str, str | None]] = []
    last, head, prefix, steps = None, 0, "", []
    for line in gm.code.split("\n"):
        match = re.match(r"\s*([A-Za-z_]\w*)\s*(?::[^=]*)?=(?!=)", line)
        info = by_name[match.group(1)].meta.get(META) if match and match.group(1) in by_name else None
        key = (_owner(info), info.get("role") == "constant") if info else None
        if key is not None:
            if key != last:  # a new run: its comment goes first and lists the steps as they come
                indent = line[: len(line) - len(line.lstrip())]
                prefix = f"{indent}# fxquant {'constants of ' if key[1] else ''}{key[0]}: "
                head, steps = len(out), []
                out.append(("", info.get("role")))
            steps += [] if (step := _step(info)) in steps else [step]
            out[head] = (prefix + ", ".join(steps), out[head][1])
        last = key
        out.append((line, None))
    return out


def annotated_code(gm: fx.GraphModule) -> str:
    return "\n".join(line for line, _ in _annotated_lines(gm))


# --- table ---------------------------------------------------------------------------------------------
def _num(value: Any) -> str:
    """4 significant digits; a tensor shows its max; a field the core did not keep shows "n/a"."""
    return "n/a" if value is None else f"{float(value.max() if isinstance(value, torch.Tensor) else value):.4g}"


def table_rows(plan: QuantPlan, sqnr: Sqnr | None = None) -> tuple[list[str], list[list[str]]]:
    """Header and one row per site: settings from the plan, numbers from its calibration stats."""
    header = ["layer", "in", "out", "calls", "group", "w", "a", "block", "alpha", "act scale", "max|x| before",
              "max|x| after", "mean|x| before", "mean|x| after", "w error", "kernel",
              *(SQNR_HEADERS if sqnr is not None else ()),
              "status"]
    rows = []
    for s in plan.sites.values():
        g, c = plan.groups.get(s.group), s.config
        row = [s.name, str(s.in_features), str(s.out_features), str(s.calls), s.group or "-"]
        if s.skip or g is None:
            rows.append(row + ["-"] * (len(header) - len(row) - 1) + [s.skip or "not in a group"])
            continue
        st, scale = g.stats, g.stats.get("act_scale")
        if not c.a_static:
            scale = "dynamic" if c.a_quantized else "-"
        elif scale is not None and scale.numel() > 1:  # per channel: the range of the scales
            scale = f"{float(scale.min()):.3g}..{float(scale.max()):.3g}"
        row += ["float" if not c.w_quantized else f"{c.w_bits}/{c.w_group_size or 'ch'}",
                "float" if not c.a_quantized else f"{c.a_bits}/{c.a_granularity}",
                "-" if g.block_size is None else str(g.block_size),
                "-" if c.smooth_alpha is None else f"{c.smooth_alpha:g}",
                scale if isinstance(scale, str) else _num(scale),
                *(_num(st.get(k)) for k in ("absmax_before", "absmax_after", "mean_abs_before", "mean_abs_after")),
                _num(s.stats.get("weight_error")) if c.w_quantized else "-",
                s.kernel or ("fake" if c.w_quantized or c.a_quantized else "float"),
                *(map(_num, sqnr.get(s.name, (None, None))) if sqnr is not None else ())]
        rows.append(row + [g.note or "quantized"])
    return header, rows


def _summary(plan: QuantPlan) -> str:
    return (f"{len(plan.active_sites())} of {len(plan.sites)} linear layers quantized "
            f"in {len(plan.groups)} transform groups")


def plan_table(plan: QuantPlan, sqnr: Sqnr | None = None) -> str:
    """The plan as aligned text: QuantPlan.table (dry_run) and dump(fmt="table") both print this."""
    header, rows = table_rows(plan, sqnr)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(_summary(plan))
    return "\n".join(lines + (list(SQNR_LEGEND) if sqnr is not None else []))


# --- SQNR on one batch ---------------------------------------------------------------------------------
class _SiteProbe(nn.Module):
    """Sums, over every call of one site, reference and error energy (float64): for a looped layer too."""

    def __init__(self, float_weight: torch.Tensor | None) -> None:
        super().__init__()
        self.float_weight = float_weight
        self.energy = torch.zeros(4, dtype=torch.float64)  # |ref_a|^2, |err_a|^2, |ref_wa|^2, |err_wa|^2

    def forward(self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        refs = [F.linear(x, weight, bias)] + ([] if self.float_weight is None else
                                              [F.linear(x, self.float_weight.to(x), bias)])
        for i, ref in enumerate(refs):
            self.energy[2 * i : 2 * i + 2] += torch.stack([ref.double().square().sum(),
                                                           (y.double() - ref.double()).square().sum()])


def _int_weight_float(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    """The float weight an int8_linear node computes with: (codes - zero) x its weight scale (the
    rescale constant divided by the static activation scale folded into it)."""
    codes, rescale, w_zero = (None if a is None else fetch_attr(gm, a.target)
                              for a in (node.args[1], node.args[2], node.args[8]))
    if codes.dtype == torch.uint8:  # fbgemm's linears keep 4-bit codes two per byte
        codes = ops.unpack_int4(codes, signed=True)
    scale = rescale.double()
    if node.args[5] is None:  # static activations: their scale is folded into the rescale
        scale = scale / fetch_attr(gm, node.args[0].args[1].target).double()
    groups = scale.shape[0]
    w = codes.double().view(codes.shape[0], groups, -1)
    if w_zero is not None:
        w = w - w_zero.t().double().unsqueeze(-1)
    return (w * scale.t().unsqueeze(-1)).view(codes.shape).float()


def _db(signal: float, noise: float) -> float:
    return math.inf if noise == 0 else 10 * math.log10(signal / noise)


def site_sqnr(gm: fx.GraphModule, batch: Any) -> Sqnr:
    """Per site, SQNR in dB of its output on ``batch``: (vs x float, vs x and W float or None).

    Runs a copy of the graph that also feeds each quantized linear's unquantized input, output,
    weight and bias to a probe (as calibration observes: gm itself is not edited).
    """
    probed, mapping = copy_graph_module(gm)  # called exactly like gm, whatever its inputs
    graph = probed.graph
    plan = gm.meta.get(META, {}).get("plan")
    probes: dict[str, tuple[str, _SiteProbe]] = {}
    for node in gm.graph.nodes:
        if (site := node.meta.get(META, {}).get("site")) is None or node.meta[META].get("role") != "linear":
            continue
        if site not in probes:
            stats = plan.sites[site].stats if plan is not None and site in plan.sites else {}
            probes[site] = (f"fxquant_probe_{len(probes)}", _SiteProbe(stats.get("weight_float")))
            probed.add_submodule(*probes[site])
        x = node.args[0]
        while x.meta.get(META, {}).get("role") == "quantize":
            x = x.args[0]  # the transformed activation before its quantizer (and its getitem outputs)
        weight, bias = node.args[1], node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if node.target is ops.int8_linear:  # integer codes: the probe compares against their float values
            bias = node.args[3]
            probed.register_buffer(f"fxquant_probe_w_{node.name}", _int_weight_float(gm, node))
            with graph.inserting_before(mapping[node]):
                weight = graph.get_attr(f"fxquant_probe_w_{node.name}")
        with graph.inserting_after(mapping[node]):
            graph.call_module(probes[site][0], tuple(mapping.get(a, a) if isinstance(a, fx.Node) else a
                                                     for a in (x, node, weight, bias)))
    probed.recompile()
    args, kwargs = batch_to_call(batch)
    with torch.no_grad():
        probed(*args, **kwargs)
    return {site: (_db(*p.energy[:2].tolist()), None if p.float_weight is None else _db(*p.energy[2:].tolist()))
            for site, (_, p) in probes.items()}


# --- dot -----------------------------------------------------------------------------------------------
def graph_dot(gm: fx.GraphModule) -> str:
    """Graphviz text, fxquant nodes filled by role (COLOURS): torch's FxGraphDrawer with pydot, else plain DOT."""
    from torch.fx.passes import graph_drawer

    def colour(node: fx.Node) -> str | None:
        return COLOURS.get(node.meta.get(META, {}).get("role"))

    try:
        import pydot  # noqa: F401  (graph_drawer decided at its import; this also honours a missing pydot now)
    except ImportError:
        pass
    else:
        if graph_drawer.HAS_PYDOT:
            return torch_private.drawer_with_colours(gm, "fxquant", colour).get_dot_graph().to_string()

    def q(text: str) -> str:  # a DOT string literal
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'

    out = ["digraph fxquant {", '  node [shape=box, style="rounded,filled", fillcolor=white, fontname=monospace];']
    for node in gm.graph.nodes:
        info, target = node.meta.get(META), node.target
        target = target if isinstance(target, str) else getattr(target, "__name__", str(target))
        label = f"{node.name}\n{node.op} {target}" + (f"\nfxquant {_step(info)}" if info else "")
        out.append(f"  {q(node.name)} [label={q(label)}" + (f", fillcolor={colour(node)}];" if colour(node) else "];"))
    out += [f"  {q(n.name)} -> {q(u.name)};" for n in gm.graph.nodes for u in n.users]
    return "\n".join(out + ["}", ""])


# --- html ----------------------------------------------------------------------------------------------
CSS = """body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222}.scroll{overflow-x:auto}
table{border-collapse:collapse;font:12px monospace}td,th{border:1px solid #ccc;padding:2px 6px;white-space:nowrap}
th{background:#eee}td:nth-child(n+2){text-align:right}td:nth-child(5),td:last-child{text-align:left}
.plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(420px,1fr));gap:1em}figure{margin:0}
figcaption{font:12px monospace}svg{max-width:100%;height:auto}.config{white-space:pre-wrap}
pre{font:12px monospace;background:#fafafa;padding:1em;overflow-x:auto}pre span{font-weight:bold}"""


def _plot(group: str, before: torch.Tensor, after: torch.Tensor) -> str | None:
    """Inline SVG of per-channel max|x| before vs after the transform; None without matplotlib."""
    try:
        from matplotlib import rc_context
        from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend
    except ImportError:
        return None
    # hashsalt: reproducible SVG ids; fonttype "path": glyphs drawn as paths, so no font is fetched
    with rc_context({"svg.hashsalt": group, "svg.fonttype": "path"}):
        fig = Figure(figsize=(7, 2.2), layout="constrained")
        ax = fig.subplots()
        for values, colour, when in ((before, "tab:red", "before"), (after, "tab:blue", "after the transform")):
            ax.plot(values.float().numpy(), lw=0.8, color=colour, label=f"{when}: max {float(values.max()):.3g}")
        ax.set(xlabel="channel", ylabel="max |x|", xlim=(0, len(before) - 1))
        fig.legend(loc="outside upper center", ncols=2, fontsize=8, frameon=False)  # never over the data
        buf = io.StringIO()
        fig.savefig(buf, format="svg")
    svg = buf.getvalue()
    return svg[svg.index("<svg"):]  # drop the XML prolog and doctype: inline SVG in HTML takes neither


def _html(gm: fx.GraphModule, plan: QuantPlan, sqnr: Sqnr | None) -> str:
    e = html.escape
    header, rows = table_rows(plan, sqnr)
    table = "".join("<tr>" + "".join(f"<{t}>{e(c)}</{t}>" for c in r) + "</tr>"
                    for t, r in [("th", header)] + [("td", r) for r in rows])
    figures = []
    for g in plan.groups.values():
        before, after = g.stats.get("absmax_before"), g.stats.get("absmax_after")
        svg = None if before is None or after is None else _plot(g.name, before, after)
        if svg is None and before is not None and after is not None:  # stats are there, matplotlib is not
            figures = [f"<p>{e(REPORT_HINT)}</p>"]
            break
        figures.append(f"<figure><figcaption>{e(g.name)}</figcaption>{svg or '<p>n/a: no calibration stats</p>'}"
                       "</figure>")
    code = "\n".join(f'<span style="background:{COLOURS.get(role, "lightgrey")}">{e(line)}</span>' if role
                     else e(line) for line, role in _annotated_lines(gm)).lstrip("\n")
    config = gm.meta.get(META, {}).get("config")
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8"><title>fxquant report</title>',
        f"<style>{CSS}</style></head><body>", "<h1>fxquant report</h1>",
        f"<p>{e(_summary(plan))}.</p>",
        f"<pre class=config>{e(repr(config))}</pre>" if config is not None else "",
        "<h2>Plan</h2>", f"<div class=scroll><table>{table}</table></div>",
        *(f"<p>{e(n)}</p>" for n in (SQNR_LEGEND if sqnr is not None else ())),
        "<h2>Per-channel max |x| of each group input, before and after the DuQuant transform</h2>",
        f"<div class=plots>{''.join(figures)}</div>", "<h2>Code</h2>", f"<pre>{code}</pre>", "</body></html>", ""])


# --- writing -------------------------------------------------------------------------------------------
def _write_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` whole (files.write_atomic: a replaced file keeps its mode)."""

    def write(tmp: str) -> None:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    write_atomic(path, write, what="dump path")
