"""Tiny models for the tests (random weights, CPU, seconds)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from lazy_seed import lazy_copy  # noqa: E402  the seed module lives with the benchmarks


def mlp(dim: int = 64, hidden: int = 128, outliers: tuple[int, ...] = ()) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim)).eval()
    return model


class OutlierMLP(nn.Module):
    """An MLP whose input has a few channels 50x larger than the rest, as trained LMs have."""

    def __init__(self, dim: int = 128, hidden: int = 256, channels: tuple[int, ...] = (3, 40, 77)) -> None:
        super().__init__()
        torch.manual_seed(0)
        gain = torch.ones(dim)
        gain[list(channels)] = 50.0
        self.register_buffer("gain", gain)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x * self.gain)))


class FunctionalAttention(nn.Module):
    """A hand-written attention block that calls F.linear on raw parameters (no nn.Linear)."""

    def __init__(self, dim: int = 64, heads: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.heads = heads
        self.wq, self.wk, self.wv, self.wo = (nn.Parameter(torch.randn(dim, dim) / dim**0.5) for _ in range(4))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        b, t, d = h.shape
        q, k, v = (F.linear(h, w).view(b, t, self.heads, -1).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        return x + F.linear(o, self.wo)


class FlowLoop(nn.Module):
    """pi0-like: an encoder, then the same action expert called several times in a loop."""

    def __init__(self, dim: int = 64, steps: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.steps = steps
        self.encoder = nn.Linear(dim, dim)
        self.expert = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        ctx = self.encoder(obs)
        action = torch.zeros_like(ctx)
        for _ in range(self.steps):
            action = action + 0.1 * self.expert(ctx + action)
        return action


def lazy_mlp(model: nn.Sequential) -> nn.Module:
    """The seed failure (benchmarks/lazy_seed.py): every Linear calibrates lazily in forward."""
    return lazy_copy(model)


def with_outliers(model: nn.Module, channels: tuple[int, ...] = (3, 17, 42), gain: float = 20.0) -> nn.Module:
    """Give every norm a few large weights: persistent outlier channels, as trained LMs have."""
    with torch.no_grad():
        for _name, module in model.named_modules():
            weight = getattr(module, "weight", None)
            if "norm" in type(module).__name__.lower() and weight is not None and weight.dim() == 1:
                weight[list(channels)] *= gain
    return model


def tiny_llama(layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return with_outliers(LlamaForCausalLM(cfg).eval())


def tiny_gemma():
    from transformers import GemmaConfig, GemmaForCausalLM

    torch.manual_seed(0)
    cfg = GemmaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=256)
    return with_outliers(GemmaForCausalLM(cfg).eval())


def tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=64)
    return with_outliers(BertModel(cfg, add_pooling_layer=False).eval())


def token_batches(n: int = 4, batch: int = 2, seq: int = 16, vocab: int = 128, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab, (batch, seq), generator=g)} for _ in range(n)]


def tensor_batches(n: int = 4, shape: tuple[int, ...] = (8, 64), seed: int = 0,
                   outliers: tuple[int, ...] = (3, 17, 42), gain: float = 20.0) -> list[torch.Tensor]:
    """Gaussian batches whose ``outliers`` channels are ``gain`` times larger."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.ones(shape[-1])
    scale[list(outliers)] = gain
    return [torch.randn(*shape, generator=g) * scale for _ in range(n)]


class CountingLoader(list):
    """A list of batches that counts the batches calibration reads from it."""

    passes = 0  # batches read / batches

    def __iter__(self):
        for batch in super().__iter__():
            self.passes += 1 / len(self)
            yield batch
