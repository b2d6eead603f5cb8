"""Speed of the quantized graph under torch.compile, as ratios measured in one process.

For each model and prefill shape: torch.compile(fp32 model), torch.compile(fxquant graph) and
the eager lazy-style seed module, same inputs, after warm-up, median of --calls calls. Also the
compile time and compile count of both compiled models. Writes benchmarks/results/speed.json
and prints a markdown table. Goal: compiled fxquant / compiled fp32 <= 1.10.

    python benchmarks/speed.py [--threads 2] [--calls 20]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lazy_seed import lazy_copy  # noqa: E402

from fxquant import QuantConfig, quantize_graph  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def small_llama() -> tuple[nn.Module, str]:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4)
    return LlamaForCausalLM(cfg).eval(), "input_ids"


class MLPStack(nn.Module):
    """Residual MLP blocks, wide enough that the GEMMs dominate."""

    def __init__(self, dim: int = 1024, hidden: int = 4096, blocks: int = 2) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(),
                                                  nn.Linear(hidden, dim)) for _ in range(blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return x


def _inputs(kind: str, shape: tuple[int, int], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "input_ids":
        return torch.randint(0, 512, shape, generator=g)
    return torch.randn(*shape, 1024, generator=g)


def _call(fn, kind: str, x: torch.Tensor):
    return fn(input_ids=x) if kind == "input_ids" else fn(x)


def _median_ms(fn, kind: str, x: torch.Tensor, calls: int) -> float:
    with torch.no_grad():
        for _ in range(3):
            _call(fn, kind, x)
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            _call(fn, kind, x)
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def _compiled(module: nn.Module, kind: str, x: torch.Tensor):
    counter = CompileCounterWithBackend("inductor")
    fn = torch.compile(module, backend=counter)
    start = time.perf_counter()
    with torch.no_grad():
        _call(fn, kind, x)
    return fn, counter, time.perf_counter() - start


def measure(name: str, model: nn.Module, kind: str, shapes: list[tuple[int, int]], calls: int) -> list[dict]:
    # calibrate (and capture) with batch 4: torch.export fixes a dim of size 1 in the graph
    calib = [_inputs(kind, (4, 128), seed) for seed in range(4)]
    batches = [{"input_ids": c} for c in calib] if kind == "input_ids" else calib
    start = time.perf_counter()
    gm = quantize_graph(model, batches, QuantConfig())
    quantize_s = time.perf_counter() - start
    lazy = lazy_copy(model)
    with torch.no_grad():
        for c in calib:  # the lazy module calibrates on its first calls
            _call(lazy, kind, c)
    rows = []
    for shape in shapes:
        x = _inputs(kind, shape, seed=100)
        torch._dynamo.reset()
        fp32, fp32_count, fp32_compile = _compiled(model, kind, x)
        quant, quant_count, quant_compile = _compiled(gm, kind, x)
        t_fp32 = _median_ms(fp32, kind, x, calls)
        t_quant = _median_ms(quant, kind, x, calls)
        t_lazy = _median_ms(lazy, kind, x, calls)
        rows.append({"model": name, "shape": f"{shape[0]}x{shape[1]}", "fp32_compiled_ms": t_fp32,
                     "fxquant_compiled_ms": t_quant, "lazy_eager_ms": t_lazy, "ratio_fxquant_fp32": t_quant / t_fp32,
                     "ratio_lazy_fp32": t_lazy / t_fp32, "compile_s_fp32": fp32_compile,
                     "compile_s_fxquant": quant_compile, "compiles_fp32": fp32_count.frame_count,
                     "compiles_fxquant": quant_count.frame_count, "quantize_s": quantize_s})
        print(_row(rows[-1]), flush=True)
    return rows


HEADER = ("| model | tokens | fp32 compiled ms | fxquant compiled ms | lazy eager ms | fxquant/fp32 | lazy/fp32 "
          "| compile s fp32 / fxquant | compiles fp32 / fxquant |\n|---|---|---|---|---|---|---|---|---|")


def _row(r: dict) -> str:
    return (f"| {r['model']} | {r['shape']} | {r['fp32_compiled_ms']:.2f} | {r['fxquant_compiled_ms']:.2f} | "
            f"{r['lazy_eager_ms']:.2f} | {r['ratio_fxquant_fp32']:.2f} | {r['ratio_lazy_fp32']:.2f} | "
            f"{r['compile_s_fp32']:.1f} / {r['compile_s_fxquant']:.1f} | "
            f"{r['compiles_fp32']} / {r['compiles_fxquant']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--out", type=Path, default=RESULTS / "speed.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.calls} calls after warm-up\n{HEADER}")
    llama, kind = small_llama()
    rows = measure("llama 4x256", llama, kind, [(1, 512), (8, 128)], args.calls)
    rows += measure("mlp 2x(1024->4096->1024)", MLPStack().eval(), "x", [(1, 512), (8, 128)], args.calls)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    report = {"torch": torch.__version__, "threads": args.threads, "calls": args.calls, "commit": commit,
              "command": "python " + " ".join(sys.argv), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=args.out.parent, delete=False, suffix=".tmp") as tmp:
        json.dump(report, tmp, indent=2)
    os.replace(tmp.name, args.out)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
