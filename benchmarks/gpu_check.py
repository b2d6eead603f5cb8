"""GPU check (CUDA graphs): the lazy-style seed module against the fxquant graph of the same weights.

Both under torch.compile(mode="reduce-overhead") (CUDA graphs), called --calls times with every
output kept alive between calls (the way a policy loop keeps its actions). Reports, for each:
whether a call raised "accessing tensor output of CUDAGraphs that has been overwritten by a
subsequent run", the compile count, and the median latency in float16 and bfloat16.
One short call on a lent GPU:  python benchmarks/gpu_check.py  (about a minute).
Elsewhere it exits with a message and status 0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lazy_seed import lazy_copy  # noqa: E402

from fxquant import QuantConfig, quantize_graph  # noqa: E402

OVERWRITTEN = "overwritten by a subsequent run"


class Policy(nn.Module):
    """A small action head, as a VLA policy calls it in its flow-matching loop."""

    def __init__(self, dim: int = 1024, hidden: int = 4096) -> None:
        super().__init__()
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(nn.functional.gelu(self.up(self.norm(x))))


def run(name: str, module: nn.Module, inputs: list[torch.Tensor]) -> dict:
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(module, backend=counter, mode="reduce-overhead")
    kept, times, error = [], [], ""
    with torch.no_grad():
        for i, x in enumerate(inputs):
            try:
                torch.cuda.synchronize()
                start = time.perf_counter()
                y = compiled(x)
                checksum = float(y.float().sum())  # read this call's output now
                torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
                kept.append(y)
                if i > 0:
                    float(kept[-2].float().sum())  # and the previous one, kept alive
            except RuntimeError as err:
                error = f"call {i}: {str(err).splitlines()[0]}"
                break
    steady = times[len(times) // 2:] or [float("nan")]
    return {"module": name, "calls_done": len(times), "overwritten_error": OVERWRITTEN in error, "error": error,
            "compiles": counter.frame_count, "median_ms": 1000 * statistics.median(steady),
            "checksum_last": checksum if times else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here too")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run it on a machine with a GPU (it needs CUDA graphs).")
        return
    torch.manual_seed(0)
    results = []
    for dtype in (torch.float16, torch.bfloat16):
        model = Policy().cuda().to(dtype).eval()
        calib = [torch.randn(args.tokens, 1024, device="cuda", dtype=dtype) for _ in range(4)]
        gm = quantize_graph(model, calib, QuantConfig())
        inputs = [torch.randn(args.tokens, 1024, device="cuda", dtype=dtype) for _ in range(args.calls)]
        for name, module in (("lazy-style seed", lazy_copy(model)), ("fxquant graph", gm)):
            row = run(name, module, inputs) | {"dtype": str(dtype).removeprefix("torch.")}
            results.append(row)
            print(json.dumps(row), flush=True)
    print(f"\ndevice: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| module | dtype | calls done | 'overwritten' error | compiles | median ms |\n|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['module']} | {r['dtype']} | {r['calls_done']}/{args.calls} | {r['overwritten_error']} | "
              f"{r['compiles']} | {r['median_ms']:.3f} |")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
