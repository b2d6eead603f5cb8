"""The run-time operations fxquant inserts into graphs: plain PyTorch, no state.

Each is a pure function of its inputs and constants, so torch.compile traces straight through
it and Inductor fuses the pointwise parts into their neighbours.
"""

from __future__ import annotations

import torch


def block_rotate(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """x @ blockdiag(R, ..., R) along the last dim (R is B x B; one GEMM over all blocks).

    Computed in R's dtype (float32) and returned in x's: half-precision rotations lose orthogonality."""
    size = rotation.shape[0]
    return (x.unflatten(-1, (-1, size)).to(rotation.dtype) @ rotation).flatten(-2).to(x.dtype)


def permute_channels(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """x[..., perm]: works for any number of leading (batch, sequence) dims."""
    return torch.index_select(x, -1, perm)


def fake_quant_static(x: torch.Tensor, scale: torch.Tensor, qmax: int) -> torch.Tensor:
    """Symmetric fake quantization with a calibrated scale (per tensor: shape (1,), per channel: (D,))."""
    return torch.clamp(torch.round(x / scale), -qmax - 1, qmax) * scale


def fake_quant_per_token(x: torch.Tensor, qmax: int, clip: float = 1.0) -> torch.Tensor:
    """Symmetric fake quantization with one scale per token, from the token's own max |x| x clip."""
    scale = x.abs().amax(-1, keepdim=True).clamp(min=1e-8) * (clip / qmax)
    return torch.clamp(torch.round(x / scale), -qmax - 1, qmax) * scale


def fake_quant_per_token_asym(x: torch.Tensor, levels: int, clip: float = 1.0) -> torch.Tensor:
    """Asymmetric per-token fake quantization: the grid spans [clip*min, clip*max] of the token
    (0 always inside), ``levels`` = 2**bits - 1 steps, integer zero point."""
    low = x.amin(-1, keepdim=True).clamp(max=0) * clip
    high = x.amax(-1, keepdim=True).clamp(min=0) * clip
    scale = ((high - low) / levels).clamp(min=1e-8)
    zero = torch.round(-low / scale)
    return (torch.clamp(torch.round(x / scale) + zero, 0, levels) - zero) * scale


def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                      group_size: int | None) -> torch.Tensor:
    """Integer weight codes (out, in) -> float, with per-channel or per-group scale and zero."""
    out_features, in_features = codes.shape
    grouped = codes.view(out_features, scale.shape[1], -1).to(scale.dtype)
    if zero is not None:
        grouped = grouped - zero.unsqueeze(-1)
    return (grouped * scale.unsqueeze(-1)).view(out_features, in_features)


def unpack_int4(packed: torch.Tensor, signed: bool) -> torch.Tensor:
    """uint8 (out, in/2) holding two 4-bit codes per byte (low nibble first) -> int8 (out, in)."""
    low = (packed & 0x0F).to(torch.int8)
    high = (packed >> 4).to(torch.int8)
    codes = torch.stack([low, high], dim=-1).flatten(-2)
    return codes - 16 * (codes > 7).to(torch.int8) if signed else codes
