"""fxquant: DuQuant W4A8 quantization as FX graph passes, for torch.compile."""

from .api import quantize_graph
from .config import QuantConfig
from .dump import dump
from .plan import QuantPlan

__all__ = ["QuantConfig", "QuantPlan", "dump", "quantize_graph"]
__version__ = "0.1.0"
