"""fxquant: DuQuant W4A8 quantization as FX graph passes, for torch.compile."""

from . import backend  # noqa: F401  registers torch.compile(backend="fxquant") even without the entry point
from .api import quantize_graph, quantize_module
from .capture import mark_batch_unbacked
from .config import QuantConfig
from .dump import dump
from .plan import QuantPlan
from .serialize import load, save

__all__ = ["QuantConfig", "QuantPlan", "dump", "load", "mark_batch_unbacked", "quantize_graph", "quantize_module",
           "save"]
__version__ = "0.1.0"
