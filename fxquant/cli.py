"""The ``fxquant`` command line (also ``python -m fxquant``): quantize, plan, dump.

    fxquant quantize --hf DIR [--gguf FILE] --calib TEXT.txt --out model.pt2 [config flags]
    fxquant quantize --factory my_models:build --out model.pt2 [config flags]
    fxquant plan --hf DIR --calib TEXT.txt --dry-run
    fxquant dump model.pt2 --format html -o report.html

``--factory MODULE:FUNCTION`` (or ``path/to/file.py:FUNCTION``) names a function called with no
arguments that returns ``(model, calib_batches)``: an ``nn.Module`` and a non-empty list (or other
re-iterable) of calibration batches, each a Tensor (``model(batch)``), a tuple (``model(*batch)``)
or a dict (``model(**batch)``), as for ``quantize_graph``. The first batch is also the example
the saved graph is exported with: give it at least 2 rows (torch.export fixes a size-1 dim).
The current directory is searched for MODULE first.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import importlib.util
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

FORMATS = ("code", "table", "dot", "html")
FACTORY_CONTRACT = """\
--factory MODULE:FUNCTION (or path/to/file.py:FUNCTION), MODULE searched in the current directory first:
  FUNCTION() -> (model, calib_batches)
  model: a torch.nn.Module; calib_batches: a non-empty list of batches, each a Tensor (model(batch)),
  a tuple (model(*batch)) or a dict (model(**batch)). The first batch is also the example the saved
  graph is exported with: give it at least 2 rows (torch.export fixes a dim of size 1).

--hf DIR: AutoTokenizer / AutoModelForCausalLM from the local directory DIR (never downloads);
  --calib text is tokenized and cut into --calib-samples windows of --seq-len tokens, --batch-size per batch.
"""


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fxquant`` script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quiet:  # before transformers / tqdm are imported: they read these at import time
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    with _progress_bars(enabled=not args.quiet), _logging(quiet=args.quiet):
        try:
            return args.run(args, parser)
        except (ValueError, TypeError, OSError) as err:  # user mistakes, unwritable paths: the message says
            print(f"fxquant {args.command}: error: {err}", file=sys.stderr)
            return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxquant", description="DuQuant W4A8 quantization as FX graph passes.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    quantize = commands.add_parser("quantize", help="calibrate, quantize and save a model (.pt2)",
                                   description="Calibrate and quantize a model, write the rewritten graph "
                                   "with torch.export.save, and print the plan table.",
                                   epilog=FACTORY_CONTRACT, formatter_class=argparse.RawDescriptionHelpFormatter)
    _model_flags(quantize)
    _config_flags(quantize)
    quantize.add_argument("--out", required=True, metavar="FILE.pt2", help="where to write the quantized graph")
    quantize.add_argument("--summary", metavar="FILE", help="also write the plan table to FILE")
    _common_flags(quantize)
    quantize.set_defaults(run=_quantize)

    plan = commands.add_parser("plan", help="print the quantization plan",
                               description="Print which layers are quantized, in which transform groups and "
                               "with which settings. Without --dry-run the model is also calibrated, so the "
                               "table includes the measured statistics; nothing is written.",
                               epilog=FACTORY_CONTRACT, formatter_class=argparse.RawDescriptionHelpFormatter)
    _model_flags(plan)
    _config_flags(plan)
    plan.add_argument("--dry-run", action="store_true", help="stop before calibration (capture and plan only)")
    _common_flags(plan)
    plan.set_defaults(run=_plan)

    dump = commands.add_parser("dump", help="review a saved quantized graph (code, table, dot, html)",
                               description="Render a graph written by 'fxquant quantize' for review.")
    dump.add_argument("model", metavar="MODEL.pt2", help="a file written by 'fxquant quantize'")
    dump.add_argument("--format", choices=FORMATS, default="code", help="view to write (default: code)")
    dump.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of standard output")
    _common_flags(dump)
    dump.set_defaults(run=_dump)
    return parser


def _common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars and no summary output")


def _model_flags(parser: argparse.ArgumentParser) -> None:
    source = parser.add_argument_group("model (one of --hf or --factory)")
    which = source.add_mutually_exclusive_group(required=True)
    which.add_argument("--hf", metavar="DIR", help="a local Hugging Face causal LM directory (save_pretrained)")
    which.add_argument("--factory", metavar="MODULE:FUNCTION",
                       help="FUNCTION() in MODULE (or file.py) returns (model, calib_batches); see below")
    source.add_argument("--gguf", metavar="FILE", help="with --hf: load weights from this GGUF file in DIR")
    source.add_argument("--calib", metavar="TEXTFILE", help="with --hf: plain text to calibrate on")
    source.add_argument("--seq-len", type=_positive, default=128, help="with --hf: tokens per window (default 128)")
    source.add_argument("--batch-size", type=_positive, default=4, help="with --hf: windows per batch (default 4)")
    source.add_argument("--calib-samples", type=_positive, default=32,
                        help="with --hf: at most this many windows from the text (default 32)")


def _config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per QuantConfig field; a flag left out keeps QuantConfig's default (SUPPRESS)."""
    c = parser.add_argument_group("quantization (QuantConfig fields; defaults as in QuantConfig)")
    off = argparse.SUPPRESS
    c.add_argument("--w-bits", type=_bits, default=off, help="weight bits, 2-8, or 16/float to keep weights float")
    c.add_argument("--a-bits", type=_bits, default=off, help="activation bits, 2-8, or 16/float")
    c.add_argument("--a-granularity", choices=("tensor", "channel", "token"), default=off)
    c.add_argument("--a-percentile", type=float, default=off, help="percentile of |x| for static scales")
    c.add_argument("--w-group-size", type=_group_size, default=off, help="weight group size, or 'channel'")
    c.add_argument("--w-clip", type=_clip, default=off, help="mse, minmax, or a ratio in (0, 1]")
    c.add_argument("--w-method", choices=("rtn", "gptq"), default=off)
    c.add_argument("--w-asymmetric", dest="w_symmetric", action="store_false", default=off)
    c.add_argument("--smooth-alpha", type=_alpha, default=off, help="smoothing strength in [0, 1], or 'none'")
    c.add_argument("--block-size", type=int, default=off, help="rotation block size (power of two)")
    c.add_argument("--rotation-steps", type=int, default=off, help="greedy rotation steps (0: no rotation)")
    c.add_argument("--no-permute", dest="permute", action="store_false", default=off)
    c.add_argument("--calib-tokens", type=int, default=off, help="rows kept per group for the rotation search")
    c.add_argument("--include", action="append", default=off, metavar="REGEX", help="only layers matching")
    c.add_argument("--exclude", action="append", default=off, metavar="REGEX",
                   help="skip layers matching (replaces the default, lm_head)")
    c.add_argument("--weight-format", choices=("fake", "packed"), default=off)
    c.add_argument("--execution", choices=("fake", "int"), default=off,
                   help="int: integer GEMMs (torch._int_mm; fbgemm on x86 CPUs without AVX512), 4-bit weights packed")
    c.add_argument("--capture", choices=("export", "symbolic_trace"), default=off)
    c.add_argument("--seed", type=int, default=off)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def _bits(text: str) -> int:
    return 16 if text.lower() in ("16", "float", "none") else int(text)


def _group_size(text: str) -> int | None:
    return None if text.lower() in ("channel", "none") else int(text)


def _clip(text: str) -> str | float:
    return text if text in ("mse", "minmax") else float(text)


def _alpha(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def _config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Any:
    from .config import QuantConfig

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(QuantConfig) if hasattr(args, f.name)}
    try:
        return QuantConfig(**given)
    except (TypeError, ValueError) as err:  # QuantConfig's message names the field and the fix
        parser.error(str(err))


def _model_and_batches(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[Any, list]:
    if args.hf is not None:
        return _hf_model(args, parser)
    if args.gguf or args.calib:
        parser.error("--gguf and --calib go with --hf; a --factory function returns its own batches")
    return _factory_model(args.factory, parser, _outputs(args))


def _outputs(args: argparse.Namespace) -> dict[str, str | None]:
    """The files a command writes, by flag."""
    if args.command == "dump":
        return {"-o": args.output}
    if args.command == "quantize":
        return {"--out": args.out, "--summary": args.summary}
    return {}


def _check_outputs(args: argparse.Namespace, inputs: dict[str, str | None]) -> None:
    """Before any work: no output is an input or another output (the same file by any name: relative,
    symlinked, hard-linked), and each output can be written, so no run ends in a traceback or
    overwrites what it read. ``inputs`` maps a label ("--calib") to a path."""
    from .files import check_writable

    model_dir = getattr(args, "hf", None)
    taken = {label: path for label, path in inputs.items() if path}
    for flag, path in _outputs(args).items():
        if not path:
            continue
        for label, other in taken.items():
            if _same_file(path, other):
                kind = "output" if label in _outputs(args) else "input"
                raise ValueError(f"{flag} {path} is the same file as {label} {other}; writing it would overwrite "
                                 f"that {kind}: choose another path")
        in_model_dir = model_dir and _same_file(os.path.dirname(os.path.abspath(path)), model_dir)
        if in_model_dir and os.path.exists(path) and not path.endswith(".pt2"):  # the loader reads DIR's files
            raise ValueError(f"{flag} {path} would overwrite a file of the --hf model directory {model_dir}; "
                             "write it elsewhere or under a new name")
        check_writable(path, flag)
        taken[flag] = path


def _same_file(a: str, b: str) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)  # hard links


def _hf_model(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[Any, list]:
    if not Path(args.hf).is_dir():
        parser.error(f"--hf: directory not found: {args.hf}")
    if args.calib is None:
        parser.error("--hf needs --calib TEXTFILE (plain text to calibrate on)")
    if not Path(args.calib).is_file():
        parser.error(f"--calib: file not found: {args.calib}")
    if args.gguf and not (Path(args.hf) / args.gguf).is_file():
        parser.error(f"--gguf: file not found: {Path(args.hf) / args.gguf}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    extra = {"gguf_file": args.gguf} if args.gguf else {}
    # local_files_only: DIR is a local directory, and the command never downloads anything
    tokenizer = AutoTokenizer.from_pretrained(args.hf, local_files_only=True, **extra)
    model = AutoModelForCausalLM.from_pretrained(args.hf, local_files_only=True, **extra).eval()
    tokenizer.model_max_length = sys.maxsize  # the text is cut into windows below, not truncated
    ids = torch.tensor(tokenizer(Path(args.calib).read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"])
    windows = min(len(ids) // args.seq_len, args.calib_samples)
    if windows == 0:
        raise ValueError(f"--calib {args.calib} has {len(ids)} tokens, fewer than --seq-len {args.seq_len}; "
                         "give more text or a smaller --seq-len")
    ids = ids[: windows * args.seq_len].view(windows, args.seq_len)
    batches = [{"input_ids": ids[i:i + args.batch_size]} for i in range(0, windows, args.batch_size)]
    if len(batches[0]["input_ids"]) == 1:
        logging.getLogger("fxquant").warning("the first batch has one window: torch.export fixes that size, so the "
                                             "saved graph takes batch size 1 only (use --batch-size 2 or more)")
    _say(args, f"calibrating on {windows} windows of {args.seq_len} tokens in {len(batches)} batches")
    return model, batches


def _factory_model(spec: str, parser: argparse.ArgumentParser,
                   outputs: dict[str, str | None]) -> tuple[Any, list]:
    module_name, _, function_name = spec.rpartition(":")
    if not module_name or not function_name:
        parser.error(f"--factory {spec!r}: expected MODULE:FUNCTION, e.g. my_models:build")
    try:
        if module_name.endswith(".py"):
            if not Path(module_name).is_file():
                parser.error(f"--factory: file not found: {module_name}")
            loaded = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
            module = importlib.util.module_from_spec(loaded)
            loaded.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:  # like `python -m`: modules in the current directory first
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_name)
    except ImportError as err:
        parser.error(f"--factory {spec!r}: cannot import {module_name!r} ({err})")
    function = getattr(module, function_name, None)
    if not callable(function):
        parser.error(f"--factory {spec!r}: {module_name!r} has no function {function_name!r}")
    source = getattr(module, "__file__", None)
    for flag, path in outputs.items():  # known only once imported; still before the function runs
        if path and source and _same_file(path, source):
            raise ValueError(f"{flag} {path} is the same file as the --factory module {source}; writing it would "
                             "overwrite that input: choose another path")
    result = function()
    import torch

    if (not isinstance(result, tuple) or len(result) != 2 or not isinstance(result[0], torch.nn.Module)):
        raise TypeError(f"--factory {spec}: the function must return (model, calib_batches) with an nn.Module "
                        f"first; it returned {type(result).__name__}")
    model, batches = result
    batches = list(batches)
    if not batches:
        raise ValueError(f"--factory {spec}: calib_batches is empty; return at least one batch")
    return model.eval(), batches


def _quantize(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    config = _config(args, parser)
    gguf = str(Path(args.hf) / args.gguf) if args.hf and args.gguf else None
    _check_outputs(args, {"--calib": args.calib, "--gguf": gguf})  # the --factory module: once imported
    model, batches = _model_and_batches(args, parser)
    from .api import quantize_graph
    from .files import write_atomic
    from .passes.common import META
    from .serialize import save

    gm = quantize_graph(model, batches, config)
    save(gm, args.out, batches[0])
    table = gm.meta[META]["plan"].table()
    if args.summary:
        write_atomic(args.summary, lambda tmp: Path(tmp).write_text(table + "\n", encoding="utf-8"), "--summary")
    _say(args, table)
    _say(args, f"wrote {args.out}")
    return 0


def _plan(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    config = _config(args, parser)
    model, batches = _model_and_batches(args, parser)
    from .api import quantize_graph
    from .passes.common import META

    result = quantize_graph(model, batches, config, dry_run=args.dry_run)
    plan = result if args.dry_run else result.meta[META]["plan"]
    print(plan.table())  # the command's output: printed even with --quiet
    return 0


def _dump(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if not Path(args.model).is_file():
        parser.error(f"model file not found: {args.model}")
    _check_outputs(args, {"the input model": args.model})
    from .dump import dump
    from .serialize import load

    try:
        gm = load(args.model)  # refuses a damaged file, pickles and modules off its allow-list
    except ImportError as err:  # a module the file's output types need is not installed: one line too
        raise ValueError(str(err)) from err
    text = dump(gm, path=args.output, fmt=args.format)
    if args.output is None:
        print(text)
    else:
        _say(args, f"wrote {args.output}")
    return 0


def _say(args: argparse.Namespace, text: str) -> None:
    if not args.quiet:
        print(text)


@contextlib.contextmanager
def _logging(quiet: bool) -> Iterator[None]:
    """fxquant's log messages on stderr (INFO, or WARNING with --quiet); --quiet also silences
    other libraries' warnings (import-time notices), keeping errors."""
    ours, root = logging.getLogger("fxquant"), logging.getLogger()
    saved = ours.level, root.level
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    ours.addHandler(handler)
    ours.setLevel(logging.WARNING if quiet else logging.INFO)
    if quiet:
        root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        ours.removeHandler(handler)
        ours.setLevel(saved[0])
        root.setLevel(saved[1])


@contextlib.contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """--quiet: fxquant's progress bars off for the run (calibrate.progress honours TQDM_DISABLE)."""
    saved = os.environ.get("TQDM_DISABLE")
    if not enabled:
        os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = saved
