"""observe + calibrate: observer nodes that only record, and the loop over the loader.

The graph being measured is never edited: observers go into a copy of the graph that shares
the module's tensors, and are thrown away with it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import fx, nn

from .capture import batch_to_call
from .passes.common import copy_graph_module
from .quant import percentile_from_histogram

log = logging.getLogger(__name__)
_GRAM_BLOCK = 128  # columns per block row of the Gram matrix

try:
    from tqdm.auto import tqdm
except ImportError:  # progress bars are optional
    tqdm = None


class GramBudget:
    """The bytes of Gram statistics (kept rows or matrices) one calibration pass may hold:
    config.calib_gram_gb. A group whose statistics would go over it while others hold some stops
    collecting (what it held is freed) and is measured in a later pass; a group alone may exceed it."""

    def __init__(self, limit: float) -> None:
        self.limit, self.used = limit, 0

    def take(self, owner: GramStats, nbytes: int) -> bool:
        if self.used - owner.held and self.used + nbytes > self.limit:  # others hold some, and it would not fit
            return False
        self.used += nbytes
        return True

    def release(self, owner: GramStats) -> None:
        self.used -= owner.held


class GramStats:
    """X^T X (D, D) in float64 over every token of one group's input: what output-error clipping
    and GPTQ read. D^2 x 8 bytes: a 16384-wide input holds 2 GiB, so the memory of these is what
    config.calib_gram_gb bounds.

    While the rows seen take fewer bytes than the matrix would (float32 rows: fewer than 2 D
    tokens), the rows are kept instead and the matrix is made from them when it is first needed,
    chunk by chunk as they came, so the sums are the same: pi0's 16384-wide down_proj input over
    ~5000 calibration tokens keeps 0.3 GiB instead of 2 GiB."""

    def __init__(self, layers: str, dim: int, budget: GramBudget | None = None) -> None:
        self.layers, self.dim, self.budget = layers, dim, budget
        self._gram: torch.Tensor | None = None
        self._kept: list[torch.Tensor] = []
        self.held = 0  # bytes of _kept or _gram while measuring: what the budget counts
        self.dropped = False  # over the budget: nothing held, measure again in another pass
        self._mirrored = False
        edges = list(range(0, dim, _GRAM_BLOCK)) if dim > 2 * _GRAM_BLOCK else [0]
        self._rows = [slice(a, b) for a, b in zip(edges, [*edges[1:], dim], strict=True)]

    @staticmethod
    def nbytes(dim: int) -> int:
        return dim * dim * 8

    @staticmethod
    def expected_bytes(dim: int, tokens: int) -> int:
        """What the statistics of ``tokens`` rows hold: the kept rows or the matrix, the smaller."""
        return min(tokens * dim * 4, GramStats.nbytes(dim))

    def update(self, x: torch.Tensor) -> None:
        if self.dropped:
            return
        x = _rows(x, self.dim)
        if self._gram is None:
            rows_bytes = self.held + x.numel() * 4
            if not self._hold(min(rows_bytes, self.nbytes(self.dim))):
                return
            if rows_bytes <= self.nbytes(self.dim):  # a copy: the graph may reuse or mutate its activation later
                self._check_finite(x.square().sum(0), x)  # X^T X's diagonal bounds every entry
                self._kept.append(x.clone())
                return
            self._make_matrix()
        self._accumulate(x)

    def _hold(self, nbytes: int) -> bool:
        """Grow what this holds to ``nbytes``; False (and everything dropped) when the budget refuses."""
        if self.budget is not None and not self.budget.take(self, nbytes - self.held):
            self.free()
            self.dropped = True
            return False
        self.held = nbytes
        return True

    def free(self) -> None:
        """Let go of what this holds, and of its share of the budget."""
        if self.budget is not None:
            self.budget.release(self)
        self._gram, self._kept, self.held = None, [], 0

    def _make_matrix(self, transform: Callable[[torch.Tensor], torch.Tensor] = lambda x: x) -> None:
        """The matrix, from the kept rows (each chunk through ``transform`` first), freed as it goes."""
        self._gram = torch.zeros(self.dim, self.dim, dtype=torch.float64)
        while self._kept:
            self._accumulate(transform(self._kept.pop(0)))

    def _accumulate(self, x: torch.Tensor) -> None:
        # X^T X is symmetric: only block rows right of the diagonal are accumulated (a third fewer
        # flops, and each entry is the same float32 dot product as in the full product), the
        # rest is mirrored when read
        for rows in self._rows:
            block = x[:, rows].T @ x[:, rows.start:]
            self._check_finite(block, x)
            self._gram[rows, rows.start:] += block.double()
        self._mirrored = False

    def _check_finite(self, sums: torch.Tensor, x: torch.Tensor) -> None:
        if not torch.isfinite(sums).all():  # |x| ~1e19: x^2 overflows float32 (NaN and Inf stopped before)
            raise ValueError(f"calibration activation read by {self.layers} reaches |x| = "
                             f"{float(x.abs().max()):.3g}: its X^T X (for w_method='gptq' and "
                             "w_clip='mse') overflows float32. Activations this large are out of range: "
                             "check the calibration data and the layers before it")

    def transformed(self, transform: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor | None:
        """While the rows are kept: the Gram matrix of transform(rows), summed chunk by chunk as they came
        (no D x D product with the transform, and no raw matrix beside it), then let go; else None."""
        if self._gram is not None or self.dropped:
            return None
        self._make_matrix(transform)
        matrix = self.value
        self.free()
        return matrix

    @property
    def value(self) -> torch.Tensor:
        if self.dropped:
            raise RuntimeError(f"the Gram statistics of {self.layers} were dropped over the budget; measure them again")
        if self._gram is None:
            self._make_matrix()
        if not self._mirrored:
            for rows in self._rows[1:]:
                self._gram[rows, : rows.start] = self._gram[: rows.start, rows].T
            self._mirrored = True
        return self._gram


class InputStats:
    """What the transform search needs from one group's input activation X (tokens x D).

    Per-channel max|x| over every token of every batch; a bounded, seeded uniform sample of token
    rows (reservoir by random keys), so memory stays fixed however long the loader is; and, when
    ``gram`` is a budget, the Gram matrix X^T X (for the weight quantizer: output-error clipping
    and GPTQ), held within that budget.
    """

    def __init__(self, layers: str, dim: int, sample_rows: int, seed: int, gram: GramBudget | None,
                 cache: ActivationCache | None = None) -> None:
        self.layers, self.dim, self.sample_rows, self.cache = layers, dim, sample_rows, cache
        self.absmax = torch.zeros(dim)
        self.gram_stats = GramStats(layers, dim, gram) if gram is not None else None
        self.rows = torch.empty(0, dim)
        self.keys = torch.empty(0)
        self.tokens = 0
        self.generator = torch.Generator().manual_seed(seed)

    def update(self, x: torch.Tensor) -> None:
        if self.cache is not None:
            self.cache.keep(self, x)
        x = _rows(x, self.dim)
        self.tokens += x.shape[0]
        self.absmax = torch.maximum(self.absmax, _finite_absmax(x.abs(), self.layers))
        if self.gram_stats is not None:
            self.gram_stats.update(x)
        keys = torch.cat([self.keys, torch.rand(x.shape[0], generator=self.generator)])
        rows = torch.cat([self.rows, x])
        if rows.shape[0] > self.sample_rows:
            keep = keys.topk(self.sample_rows).indices.sort().values
            keys, rows = keys[keep], rows[keep]
        self.keys, self.rows = keys, rows

    @property
    def gram(self) -> torch.Tensor | None:
        """X^T X (D, D) float64 over every calibration token; None when not collected (or freed)."""
        return None if self.gram_stats is None else self.gram_stats.value

    def drop_gram(self) -> None:
        if self.gram_stats is not None:
            self.gram_stats.free()
        self.gram_stats = None


class ActivationCache:
    """Raw group inputs kept from the first calibration pass (on the CPU, in their own dtype), up to
    a byte budget, so static scales can be measured on them instead of running the model again.
    Over budget, everything kept is dropped and ``complete`` is False: the second pass runs."""

    def __init__(self, budget_bytes: float) -> None:
        self.budget, self.used = budget_bytes, 0
        self.inputs: dict[InputStats, list[torch.Tensor]] | None = {}

    def keep(self, stats: InputStats, x: torch.Tensor) -> None:
        if self.inputs is None:
            return
        self.used += x.numel() * x.element_size()
        if self.used > self.budget:
            self.inputs = None
            return
        # a copy: the graph may reuse or mutate its activation later
        self.inputs.setdefault(stats, []).append(x.detach().to("cpu", copy=True))

    @property
    def complete(self) -> bool:
        return self.inputs is not None


class RangeStats:
    """Histogram of |x| per tensor (channels=1) or per channel, for static activation scales.

    The range [0, upper] doubles when a larger value arrives (bins merge in pairs, so the edges
    stay aligned); a percentile is then exact to one bin width, upper / bins.
    """

    def __init__(self, layers: str, dim: int, per_channel: bool, bins: int = 2048) -> None:
        self.layers, self.dim, self.bins = layers, dim, bins
        self.channels = dim if per_channel else 1
        self.counts = torch.zeros(self.channels, bins, dtype=torch.int64)
        self.absmax = torch.zeros(self.channels)
        self.upper = 0.0

    def update(self, x: torch.Tensor) -> None:
        x = _rows(x, self.dim).abs()
        if self.channels == 1:
            x = x.reshape(-1, 1)
        self.absmax = torch.maximum(self.absmax, _finite_absmax(x, self.layers))
        peak = float(self.absmax.max())
        if self.upper == 0.0:
            self.upper = 2.0 ** torch.tensor(max(peak, 1e-8)).log2().ceil().item()
        while peak > self.upper:
            merged = self.counts.view(self.channels, self.bins // 2, 2).sum(-1)
            self.counts = torch.cat([merged, torch.zeros_like(merged)], dim=1)
            self.upper *= 2
        # x * (bins / upper) is exact (both powers of two), and x is this call's own copy
        index = x.mul_(self.bins / self.upper).to(torch.int32).clamp_(max=self.bins - 1)
        if self.channels > 1:
            index += torch.arange(self.channels, dtype=torch.int32) * self.bins
        self.counts += torch.bincount(index.flatten(), minlength=self.channels * self.bins).view_as(self.counts)

    def percentile(self, q: float) -> torch.Tensor:
        """Per channel, the q-th percentile of |x| (never above the exact max)."""
        values = [percentile_from_histogram(c, self.upper, q) for c in self.counts]
        return torch.minimum(torch.tensor(values, dtype=torch.float32), self.absmax)


def _rows(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x.detach().reshape(-1, dim).float().cpu()  # statistics live on the CPU, in float32


def _finite_absmax(x_abs: torch.Tensor, layers: str) -> torch.Tensor:
    """Per-channel max of |x| (tokens, channels); NaN and Inf propagate into it, so checking the max checks all."""
    peak = x_abs.amax(0)
    if not torch.isfinite(peak).all():
        raise ValueError(f"calibration activation read by {layers} holds NaN or Inf; check the calibration "
                         "data and the layers before it (fxquant cannot compute scales from non-finite values)")
    return peak


class Observer(nn.Module):
    """Records its input into ``stats`` and returns it unchanged."""

    def __init__(self, stats: InputStats | RangeStats | GramStats) -> None:
        super().__init__()
        self.stats = stats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.stats.update(x)
        return x


def observed_copy(gm: fx.GraphModule, watch: Sequence[tuple[fx.Node, InputStats | RangeStats | GramStats]]
                  ) -> fx.GraphModule:
    """A GraphModule sharing gm's tensors whose graph also feeds each watched node to an Observer."""
    observed, mapping = copy_graph_module(gm)
    graph = observed.graph
    for i, (node, stats) in enumerate(watch):
        observed.add_submodule(f"fxquant_observer_{i}", Observer(stats))
        copy = mapping[node]
        with graph.inserting_after(copy):
            graph.call_module(f"fxquant_observer_{i}", (copy,))
    _drop_after_last_observer(graph)
    observed.recompile()
    return observed


def _drop_after_last_observer(graph: fx.Graph) -> None:
    """Calibration needs no output: what runs after the last observer (the final norm and the
    vocabulary projection of an LLM, a fifth of its forward) is cut, and the output holds None
    there. Nodes run in order, so nothing after the last observer can change what one records."""
    nodes = list(graph.nodes)
    last = max((i for i, n in enumerate(nodes) if n.op == "call_module" and isinstance(n.target, str)
                and n.target.startswith("fxquant_observer_")), default=len(nodes))
    late = {n for n in nodes[last + 1:] if n.op not in ("placeholder", "get_attr", "output")}
    output = nodes[-1]
    output.args = fx.node.map_arg(output.args, lambda n: None if n in late else n)
    for node in reversed(nodes[last + 1:]):
        if node in late and not node.users:
            graph.erase_node(node)


def progress(items: Iterable[Any], desc: str, unit: str, total: int | None = None) -> Iterable[Any]:
    """A tqdm bar on a terminal; none when tqdm is missing, output is not a terminal, or the
    environment sets TQDM_DISABLE=1 (the CLI's --quiet)."""
    if tqdm is None or os.environ.get("TQDM_DISABLE", "0") not in ("", "0"):
        return items
    return tqdm(items, desc=desc, unit=unit, total=total, disable=None)


def run_loader(gm: fx.GraphModule, loader: Iterable[Any], desc: str) -> int:
    """Run every batch through gm (no_grad); returns how many batches ran."""
    batches = 0
    with torch.no_grad():
        for batch in progress(loader, desc, unit="batch"):
            args, kwargs = batch_to_call(batch)
            try:
                gm(*args, **kwargs)
            except ValueError:
                raise
            except Exception as err:
                raise RuntimeError(f"calibration batch {batches} could not run through the captured graph "
                                   f"({type(err).__name__}: {err}); {_batch_hint(gm, args, kwargs, batches)}") from err
            batches += 1
    if batches == 0:
        raise ValueError("calib_loader yielded no batches: give it at least one batch of representative inputs")
    _warn_zero_inputs(gm)
    return batches


def _batch_hint(gm: fx.GraphModule, args: tuple, kwargs: dict, number: int) -> str:
    """What to check when a batch fails: its dtype and device against the model's weights, else
    (after the first batch) that it is called like the first one."""
    weights = [t for t in (*gm.parameters(), *gm.buffers()) if t.is_floating_point()]
    inputs = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
    dtypes, devices = {t.dtype for t in weights}, {t.device for t in weights}
    odd = [t for t in inputs if (t.is_floating_point() and dtypes and t.dtype not in dtypes)
           or (devices and t.device not in devices)]
    if odd:
        want = ", ".join(sorted({str(d).removeprefix("torch.") for d in dtypes}))
        where = ", ".join(sorted({str(d) for d in devices}))
        got = str(odd[0].dtype).removeprefix("torch.")
        return (f"the batch holds {got} on {odd[0].device} but the model's weights are {want} on {where}: "
                "give batches in the model's dtype and on its device (e.g. batch.to(dtype, device))")
    if number == 0:
        return "check that the batch is what the model takes (argument names, shapes, dtype and device)"
    return "every batch must call the model the same way as the first one (same argument names and ranks)"


def _warn_zero_inputs(gm: fx.GraphModule) -> None:
    """All-zero calibration data leaves nothing to measure: scales and transforms would be made up."""
    for module in gm.modules():
        stats = getattr(module, "stats", None)
        if isinstance(module, Observer) and isinstance(stats, InputStats) and not stats.absmax.any():
            log.warning("fxquant calibrate: every calibration input of %s is zero, so its activation scales "
                        "and transform are not measured; calibrate on representative, non-zero data", stats.layers)


class LoaderPasses:
    """The user's loader, iterated once per calibration pass. A pass with fewer batches than one
    before it means the loader can be iterated only once: that is said, instead of "yielded no
    batches" or a calibration on part of the data."""

    def __init__(self, loader: Iterable[Any]) -> None:
        self.loader, self.most = loader, 0

    def __len__(self) -> int:  # for the progress bar; a TypeError (no len) is what tqdm expects
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        count = 0
        for batch in self.loader:
            count += 1
            self.most = max(self.most, count)
            yield batch
        if count < self.most:
            raise ValueError(f"calib_loader yielded {count} batches when iterated again, after {self.most} before: "
                             "fxquant reads it more than once (capture, calibration, scales). Pass a list of "
                             "batches, or a loader that starts over on each iter() as a DataLoader does")
