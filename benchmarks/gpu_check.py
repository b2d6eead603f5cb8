"""GPU check (CUDA graphs): the float model, the lazy-style seed module and the fxquant graph.

All under torch.compile(mode="reduce-overhead") (CUDA graphs), the way a VLA policy runs its
action expert: a flow-matching loop of --steps calls with the same weights, each call's output
feeding the next, a copy of every output kept (as a policy keeps its action chunk). For each module
and dtype: whether a call raised "accessing tensor output of CUDAGraphs that has been overwritten
by a subsequent run", the compile count, the median time of one call, and its ratio to the float
model compiled the same way; the fxquant graph both simulated (execution="fake") and integer
(execution="int": torch._int_mm on CUDA). Then each fxquant graph compiled with dynamic=True under CUDA graphs
over several token counts (compile count), and its compiled output against the eager GraphModule.

One short call on a lent GPU:  python benchmarks/gpu_check.py --out results.json  (a few minutes).
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
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lazy_seed import lazy_copy  # noqa: E402

from fxquant import QuantConfig, quantize_graph  # noqa: E402

OVERWRITTEN = "overwritten by a subsequent run"
DEVICE = "cuda"  # --cpu-smoke runs the same code on the CPU, small, to check the script itself


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


class ActionExpert(nn.Module):
    """A small pre-norm MLP block stack, called once per flow-matching step."""

    def __init__(self, dim: int = 1024, hidden: int = 4096, blocks: int = 2) -> None:
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(blocks))
        self.ups = nn.ModuleList(nn.Linear(dim, hidden) for _ in range(blocks))
        self.downs = nn.ModuleList(nn.Linear(hidden, dim) for _ in range(blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for norm, up, down in zip(self.norms, self.ups, self.downs, strict=True):
            x = x + down(nn.functional.gelu(up(norm(x))))
        return x


def compile_counted(module: nn.Module, **kwargs: object) -> nn.Module:
    """torch.compile(mode="reduce-overhead") from a clean Dynamo state; compiles() counts its graphs."""
    torch._dynamo.reset()
    counters.clear()
    return torch.compile(module, mode="reduce-overhead", **kwargs)


def compiles() -> int:
    return int(counters["stats"]["unique_graphs"])


def flow_loop(name: str, module: nn.Module, noise: list[torch.Tensor], steps: int) -> dict:
    """Episodes of `steps` Euler steps x <- x + dt * f(x), each output used before the next call
    (as CUDA graphs require of outputs) and a copy kept. A module that stores a tensor computed in
    forward on itself (the lazy seed's activation scale) reads it in a later replay that has
    already overwritten it: that is the error this loop looks for."""
    compiled = compile_counted(module)
    kept, times, error, calls = [], [], "", 0
    with torch.no_grad():
        try:
            for x in noise:
                for _ in range(steps):
                    sync()
                    start = time.perf_counter()
                    v = compiled(x)
                    x = x + v / steps
                    sync()
                    times.append(time.perf_counter() - start)
                    calls += 1
                    kept.append(v.clone())  # a policy keeps its actions; CUDA graphs own `v` itself
        except RuntimeError as err:
            error = f"call {calls}: {str(err).splitlines()[0][:200]}"
    steady = times[len(times) // 2:] or [float("nan")]
    return {"module": name, "calls_done": calls, "calls": len(noise) * steps, "compiles": compiles(),
            "overwritten_error": OVERWRITTEN in error, "error": error, "median_ms": 1000 * statistics.median(steady)}


def dynamic_check(name: str, gm: nn.Module, dtype: torch.dtype, token_counts: list[int]) -> dict:
    """An fxquant graph compiled once with dynamic=True under CUDA graphs, over token counts;
    and its compiled output against the eager GraphModule."""
    compiled = compile_counted(gm, dynamic=True)
    worst, error = 0.0, ""
    with torch.no_grad():
        try:
            for tokens in token_counts:
                x = torch.randn(tokens, 1024, device=DEVICE, dtype=dtype)
                eager, fast = gm(x).float(), compiled(x).float()
                worst = max(worst, float((fast - eager).norm() / eager.norm()))
        except RuntimeError as err:
            error = str(err).splitlines()[0][:200]
    return {"module": f"{name}, dynamic=True", "token_counts": token_counts, "compiles": compiles(),
            "compiled_vs_eager_rel_err": worst, "error": error}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="flow-matching steps per episode")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here too")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny CPU run (no CUDA graphs): checks the script")
    args = parser.parse_args()
    global DEVICE
    if args.cpu_smoke:
        DEVICE, args.episodes, args.steps, args.tokens = "cpu", 1, 3, 32
    elif not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run it on a machine with a GPU (it needs CUDA graphs).")
        return
    torch.manual_seed(0)
    results = []
    for dtype in (torch.float16, torch.bfloat16):
        label = str(dtype).removeprefix("torch.")
        model = ActionExpert().to(DEVICE, dtype).eval()
        calib = [torch.randn(args.tokens, 1024, device=DEVICE, dtype=dtype) for _ in range(4)]
        graphs, quantize_s = {}, {}
        for name, config in (("fxquant graph", QuantConfig()), ("fxquant int graph", QuantConfig(execution="int"))):
            start = time.perf_counter()
            graphs[name] = quantize_graph(model, calib, config)
            quantize_s[name] = time.perf_counter() - start
        noise = [torch.randn(args.tokens, 1024, device=DEVICE, dtype=dtype) for _ in range(args.episodes)]
        rows = [flow_loop(name, module, noise, args.steps) for name, module in
                (("float", model), ("lazy-style seed", lazy_copy(model)), *graphs.items())]
        for row in rows:
            row |= {"dtype": label, "ratio_to_float": row["median_ms"] / rows[0]["median_ms"]}
        rows += [dynamic_check(name, gm, dtype, [64, 128, 256, 96]) | {"dtype": label, "quantize_s": quantize_s[name]}
                 for name, gm in graphs.items()]
        for row in rows:
            print(json.dumps(row), flush=True)
        results += rows
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (smoke run)"
    print(f"\ndevice: {name}, torch {torch.__version__}")
    print("| module | dtype | calls done | 'overwritten' error | compiles | median ms | / float |\n"
          "|---|---|---|---|---|---|---|")
    for r in results:
        if "median_ms" in r:
            print(f"| {r['module']} | {r['dtype']} | {r['calls_done']}/{r['calls']} | {r['overwritten_error']} | "
                  f"{r['compiles']} | {r['median_ms']:.3f} | {r['ratio_to_float']:.2f} |")
        else:
            print(f"| {r['module']} | {r['dtype']} | tokens {r['token_counts']} | {bool(r['error'])} | "
                  f"{r['compiles']} | rel. err compiled vs eager {r['compiled_vs_eager_rel_err']:.2e} | |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
