"""quantize_graph time on SmolLM2-135M, and the pruned transform search against the exhaustive one.

1. quantize_graph(SmolLM2-135M, 16 x 512 calibration tokens, default QuantConfig), timed end to
   end, with its stage times (gm.meta["fxquant"]["seconds"]; "transforms" is the construction of
   every group's smoothing + rotation + permutation + rotation, and inserting them).
2. For the first --groups groups, the same transforms built again with the exhaustive search
   (prune=False: every row screened in float64 at every step, as the official code does) and
   with the pruned search, single-threaded, timed, and compared bit for bit.

    python benchmarks/transform_speed.py [--groups 8]

Writes benchmarks/results/transform_speed.json and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import realmodel  # noqa: E402
from accuracy import git_commit, write_atomic  # noqa: E402

from fxquant import QuantConfig, quantize_graph, solve  # noqa: E402
from fxquant.duquant import build_transforms  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def record_solver_inputs() -> list[tuple]:
    """Keep what quantize_graph hands the transform solver (groups, statistics, weights), so that a
    subset can be solved again exhaustively on exactly the same inputs."""
    seen: list[tuple] = []
    original = solve.solve_transforms

    def recording(groups, inputs, weights):
        seen.append((groups, inputs, weights))
        return original(groups, inputs, weights)

    solve.solve_transforms = recording
    return seen


def rebuild(group, stats, weights, index: int, prune: bool) -> tuple[float, object]:
    start = time.perf_counter()
    t = build_transforms([solve.group_sample(group, stats, [weights[s] for s in group.sites], index)], prune=prune)[0]
    return time.perf_counter() - start, t


def same(a, b) -> bool:
    def eq(x, y) -> bool:
        return (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
    return all(eq(getattr(a, f), getattr(b, f)) for f in ("smooth", "rot1", "perm", "rot2"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", type=int, default=8, help="groups to solve exhaustively too")
    args = parser.parse_args()
    threads = realmodel.set_threads()
    model = realmodel.load_model()
    split = realmodel.protocol_windows(realmodel.CALIB_WINDOWS, 1)
    seen = record_solver_inputs()
    start = time.perf_counter()
    gm = quantize_graph(model, realmodel.calib_batches(split.calib), QuantConfig())
    total = time.perf_counter() - start
    stages = {k: round(v, 1) for k, v in gm.meta["fxquant"]["seconds"].items()}
    print(f"quantize_graph: {total:.1f} s end to end ({threads} threads): {stages}", flush=True)

    groups, inputs, weights = seen[0]
    torch.set_num_threads(1)
    rows = []
    for index, group in enumerate(groups[: args.groups]):
        t_exh, exhaustive = rebuild(group, inputs[group.name], weights, index, prune=False)
        t_pruned, pruned = rebuild(group, inputs[group.name], weights, index, prune=True)
        rows.append({"group": group.name, "dim": group.dim, "rows": int(inputs[group.name].rows.shape[0]),
                     "exhaustive_s": round(t_exh, 2), "pruned_s": round(t_pruned, 2),
                     "identical": same(exhaustive, pruned)})
        print(json.dumps(rows[-1]), flush=True)
    exh, pru = sum(r["exhaustive_s"] for r in rows), sum(r["pruned_s"] for r in rows)
    result = {"git_commit": git_commit(), "torch": torch.__version__, "threads": threads,
              "calib_tokens": len(split.calib) * realmodel.WINDOW, "groups_total": len(groups),
              "quantize_graph_s": round(total, 1), "stages_s": stages,
              "subset": rows, "subset_exhaustive_s": round(exh, 1), "subset_pruned_s": round(pru, 1),
              "subset_speedup": round(exh / pru, 1), "all_identical": all(r["identical"] for r in rows)}
    RESULTS.mkdir(exist_ok=True)
    write_atomic(RESULTS / "transform_speed.json", json.dumps(result, indent=1) + "\n")
    print(f"\n{len(rows)} of {len(groups)} groups, one thread: exhaustive {exh:.1f} s, pruned {pru:.1f} s "
          f"({exh / pru:.1f}x), transforms identical: {result['all_identical']}")


if __name__ == "__main__":
    main()
