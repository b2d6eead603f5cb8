"""Speed and memory of SmolLM2-135M under torch.compile: fxquant fake and integer graphs, FP32, torchao.

Everything timed in one process, same inputs, interleaved: for each shape, each compiled variant is
called after warm-up and its median is divided by compiled FP32's median in the same round.
Variants: torch.compile(fp32), the same with Inductor freezing, fxquant W4A8 static "fake" and
"int", fxquant W4A8 per-token "int", and torchao 0.18's 8da4w (per-channel and group 32) when it
imports. Memory: bytes of the quantized linears' weights in each GraphModule and in its .pt2 (vs
their FP32 bytes), and the resident memory of each compiled model, measured in a fresh process
(RSS after loading, compiling and two calls, minus RSS before loading).

    python benchmarks/speed.py [--calib-windows 4] [--calls 20] [--budget-s 20]

Writes benchmarks/results/speed.json and prints a markdown table with the load average.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch._dynamo.testing import CompileCounterWithBackend

sys.path.insert(0, str(Path(__file__).resolve().parent))
import realmodel  # noqa: E402
from accuracy import torchao_model, torchao_reason  # noqa: E402

import fxquant  # noqa: E402
from fxquant import QuantConfig, quantize_graph  # noqa: E402
from fxquant.capture import capture  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = ((1, 1), (1, 16), (4, 128))
STATIC = QuantConfig()  # W4 per channel, A8 static per tensor
CONFIGS = {"fxquant fake W4A8 static": STATIC,
           "fxquant int W4A8 static": dataclasses.replace(STATIC, execution="int"),
           "fxquant int W4A8 token": dataclasses.replace(STATIC, execution="int", a_granularity="token")}


def _median_ms(fn: Any, ids: torch.Tensor, calls: int, budget_s: float) -> float:
    """Median of up to ``calls`` calls (at least 3) after 2 warm-up calls, stopping after ``budget_s``."""
    times: list[float] = []
    with torch.no_grad():
        for _ in range(2):
            fn(ids)
        start = time.perf_counter()
        while len(times) < calls and (len(times) < 3 or time.perf_counter() - start < budget_s):
            t = time.perf_counter()
            fn(ids)
            times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def _compile(module: torch.nn.Module, freezing: bool = False) -> tuple[Any, CompileCounterWithBackend]:
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(module, backend=counter, dynamic=True)
    hf = hasattr(module, "config")  # the float model: the prefill graph, as fxquant captures it

    def call(ids: torch.Tensor) -> Any:
        # freezing must be on while Inductor compiles (the first call per shape); options={} ignores it
        with torch._inductor.config.patch(freezing=freezing):
            return compiled(input_ids=ids, use_cache=False) if hf else compiled(input_ids=ids)
    return call, counter


def weight_targets(gm: torch.nn.Module) -> set[str]:
    """The constants that hold quantized sites' weights (codes, scales, zeros, code sums; the
    transformed float weight of a "fake" graph), found by the owner fxquant tags them with."""
    sites = {s.name for s in gm.meta["fxquant"]["plan"].active_sites()}
    return {n.target for n in gm.graph.nodes if n.op == "get_attr" and n.meta.get("fxquant", {}).get("owner") in sites
            and n.target.rsplit(".", 1)[-1].startswith("w")}


def weight_bytes(gm: torch.nn.Module) -> int:
    state = gm.state_dict()
    return sum(state[t].numel() * state[t].element_size() for t in weight_targets(gm))


def archive_weight_bytes(path: Path, targets: set[str]) -> int:
    """Bytes of the .pt2's tensor members that hold ``targets`` (4-bit ones are saved as <target>_packed),
    read from torch.export's weights config: which member holds which buffer."""
    with zipfile.ZipFile(path) as archive:
        config = next(n for n in archive.namelist() if n.endswith("data/weights/model_weights_config.json"))
        entries = json.loads(archive.read(config))["config"]
        sizes = {i.filename.rsplit("/", 1)[-1]: i.file_size for i in archive.infolist()
                 if "/data/weights/" in i.filename}
    return sum(sizes[e["path_name"]] for name, e in entries.items() if name.removesuffix("_packed") in targets)


RESIDENT = r"""
import gc, os, sys, torch, fxquant
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
torch.set_num_threads(int(sys.argv[2])); gc.collect(); before = rss()
gm = fxquant.load(sys.argv[1])
compiled = torch.compile(gm, dynamic=True)
ids = torch.randint(0, 100, (1, 16))
with torch.no_grad():
    compiled(input_ids=ids); compiled(input_ids=ids)
gc.collect(); print(rss() - before)
"""


def resident_mib(path: Path, threads: int) -> float:
    out = subprocess.run([sys.executable, "-c", RESIDENT, str(path), str(threads)], capture_output=True, text=True,
                         check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calib-windows", type=int, default=4, help="512-token calibration windows (speed does "
                        "not depend on them; the accuracy table uses 16)")
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--budget-s", type=float, default=20.0, help="stop timing a variant after this (>= 3 calls)")
    parser.add_argument("--shapes", nargs="+", default=[f"{b}x{t}" for b, t in SHAPES], help="batch x tokens")
    parser.add_argument("--variants", nargs="+", help="only these rows besides FP32 (names as in the table; "
                        "each costs a quantization and one Inductor compile per shape)")
    parser.add_argument("--out", type=Path, default=RESULTS / "speed.json")
    args = parser.parse_args()
    wanted = set(args.variants or [*CONFIGS, "FP32 freezing", "torchao-8da4w-ch", "torchao-8da4w-g32"])
    threads = realmodel.set_threads()
    torch.manual_seed(0)
    split = realmodel.protocol_windows(args.calib_windows, 1)
    model = realmodel.load_model()
    calib = realmodel.calib_batches(split.calib)
    variants: dict[str, torch.nn.Module] = {}
    rows: dict[str, dict[str, Any]] = {"FP32": {}} | ({"FP32 freezing": {}} if "FP32 freezing" in wanted else {})
    tmp = Path(tempfile.mkdtemp(prefix="fxquant-speed-"))
    fp32_gm = capture(model, (), calib[0])
    fxquant.save(fp32_gm, tmp / "fp32.pt2", calib[0])
    rows["FP32"]["resident_mib"] = resident_mib(tmp / "fp32.pt2", threads)
    for name, config in ((n, c) for n, c in CONFIGS.items() if n in wanted):
        t = time.perf_counter()
        gm = quantize_graph(model, calib, config)
        quantize_s = time.perf_counter() - t
        fp32_bytes = sum(4 * s.in_features * s.out_features for s in gm.meta["fxquant"]["plan"].active_sites())
        path = tmp / f"{len(variants)}.pt2"
        fxquant.save(gm, path, calib[0])
        rows[name] = {"quantize_s": quantize_s, "weights_fp32_bytes": fp32_bytes,
                      "weights_module_bytes": weight_bytes(gm),
                      "weights_pt2_bytes": archive_weight_bytes(path, weight_targets(gm)),
                      "pt2_bytes": path.stat().st_size, "resident_mib": resident_mib(path, threads)}
        variants[name] = gm
        print(f"{name}: quantized in {rows[name]['quantize_s']:.1f} s", flush=True)
    report = {"torch": torch.__version__, "threads": threads, "calls": args.calls,
              "command": "python " + " ".join(sys.argv), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "rows": rows}
    _write(report, args.out)
    reason = torchao_reason()
    if not reason:
        for method in ("torchao-8da4w-ch", "torchao-8da4w-g32"):
            if method in wanted:
                variants[method], rows[method] = torchao_model(model, method), {}
    compiled = {"FP32": _compile(model)} | ({"FP32 freezing": _compile(model, freezing=True)} if "FP32 freezing" in rows
                                            else {})
    compiled |= {name: _compile(module) for name, module in variants.items()}
    for batch, seq in (tuple(map(int, shape.split("x"))) for shape in args.shapes):
        ids = split.eval[0][: batch * seq].view(batch, seq)
        base = _median_ms(compiled["FP32"][0], ids, args.calls, args.budget_s)
        for name, (fn, counter) in compiled.items():
            ms = base if name == "FP32" else _median_ms(fn, ids, args.calls, args.budget_s)
            rows[name][f"{batch}x{seq}_ms"] = ms
            rows[name][f"{batch}x{seq}_ratio"] = ms / base
            rows[name]["compiles"] = counter.frame_count
        print(f"{batch}x{seq}: " + ", ".join(f"{n} {r[f'{batch}x{seq}_ratio']:.2f}" for n, r in rows.items()),
              flush=True)
        report["torchao"] = reason or "0.18"
        _write(report, args.out)
    print(table(report))
    print(f"\nwrote {args.out}")


def _write(report: dict[str, Any], out: Path) -> None:
    """The report so far (atomically), with the commit and the load average at this moment."""
    report["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                      text=True).stdout.strip()
    report["load_average"] = os.getloadavg()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=out.parent, delete=False, suffix=".tmp") as f:
        json.dump(report, f, indent=2)
    os.replace(f.name, out)


def table(report: dict[str, Any]) -> str:
    shapes = sorted({k.removesuffix("_ratio") for r in report["rows"].values() for k in r if k.endswith("_ratio")})
    lines = [f"torch {report['torch']}, CPU {report['cpu_capability']}, {report['threads']} threads, load average "
             f"{' '.join(f'{x:.2f}' for x in report['load_average'])}; time / compiled FP32 in the same run",
             "| variant | " + " | ".join(shapes) + " | compiles | quantized weights, module / .pt2 (x FP32) "
             "| resident MiB |", "|---" * (len(shapes) + 4) + "|"]
    for name, r in report["rows"].items():
        ratios = " | ".join(f"{r[f'{s}_ratio']:.2f}" if f"{s}_ratio" in r else "-" for s in shapes)
        memory = (f"{r['weights_module_bytes'] / r['weights_fp32_bytes']:.3f} / "
                  f"{r['weights_pt2_bytes'] / r['weights_fp32_bytes']:.3f}" if "weights_fp32_bytes" in r else "-")
        resident = f"{r['resident_mib']:.0f}" if "resident_mib" in r else "-"
        lines.append(f"| {name} | {ratios} | {r.get('compiles', '-')} | {memory} | {resident} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
