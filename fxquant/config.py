"""QuantConfig and per-layer rules: every field is validated here, with an error that names it."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

GRANULARITIES = ("tensor", "channel", "token")
CLIPS = ("mse", "minmax")
W_METHODS = ("rtn", "gptq")
CAPTURES = ("export", "symbolic_trace")
WEIGHT_FORMATS = ("fake", "packed")
EXECUTIONS = ("fake", "int")

# Fields a per-layer override may set. The transform and activation fields apply to the whole
# group of layers that read one activation, so the members of a group must agree on them.
SITE_FIELDS = ("w_bits", "w_group_size", "w_clip", "w_method", "w_symmetric", "skip")
GROUP_FIELDS = ("a_bits", "a_granularity", "a_percentile", "a_symmetric", "a_clip", "smooth_alpha", "block_size",
                "rotation_steps", "permute")


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how. ``None`` or 16 bits leaves that side exactly as it was.

    Activation granularity: "tensor" and "channel" are static scales measured during
    calibration (graph constants); "token" is dynamic, one scale per token at run time.
    """

    w_bits: int | None = 4
    w_group_size: int | None = None  # None: one scale per output channel
    w_clip: str | float = "mse"  # "mse" (output-error search), "minmax", or a ratio in (0, 1]
    w_method: str = "gptq"  # "gptq" (error compensation from the calibration Gram matrix) or "rtn"
    w_symmetric: bool = True
    a_bits: int | None = 8
    a_granularity: str = "tensor"
    a_percentile: float = 99.9
    a_symmetric: bool | None = None  # None: asymmetric (a zero point per token) for "token", as DuQuant
    # and torchao quantize dynamic activations; symmetric for static scales (they have no zero point)
    a_clip: float = 1.0  # "token": the grid spans clip x the token's range (DuQuant's official 0.9)
    smooth_alpha: float | None = 0.6  # None: no smoothing
    block_size: int = 128
    rotation_steps: int = 256  # 0: no rotation and no permutation
    permute: bool = True
    calib_tokens: int = 2048  # rows kept per group for the rotation search
    calib_cache_gb: float = 4.0  # inputs of static-scale layers kept from the first calibration pass, up
    # to this size, so the static scales need no second run of the model; 0: always run it again
    calib_gram_gb: float = 8.0  # Gram matrices X^T X (float64, D^2 x 8 bytes per group: GPTQ and clip "mse")
    # held at once, up to this size; further groups are measured in another pass over the loader each
    include: tuple[str, ...] = ()  # regexes on the layer name; empty: every linear
    exclude: tuple[str, ...] = ("lm_head",)
    overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    seed: int = 0
    capture: str = "export"  # "export" (torch.export, dynamic dims) or "symbolic_trace"
    weight_format: str = "fake"  # "fake": dequantized float constant; "packed": int4/int8 codes + scales
    execution: str = "fake"  # "fake": float ops on the integer grid (any device, for accuracy work); "int":
    # int8 activation codes times the weight codes in an integer GEMM (torch._int_mm; fbgemm on AVX2 CPUs)
    skip: bool = False  # only meaningful in overrides: leave the matching layers in float
    keep_float_weights: bool = False  # keep each transformed float weight in the plan (never in the
    # module), so fxquant.dump can report a site's SQNR against float weights; costs a float copy

    def __post_init__(self) -> None:
        object.__setattr__(self, "include", _as_tuple("include", self.include))
        object.__setattr__(self, "exclude", _as_tuple("exclude", self.exclude))
        object.__setattr__(self, "overrides", dict(self.overrides))
        _validate(self, "QuantConfig")
        for pattern, fields in self.overrides.items():
            _compile(f"overrides[{pattern!r}]", pattern)
            if not isinstance(fields, Mapping):
                raise TypeError(f"overrides[{pattern!r}] must be a dict of QuantConfig fields, "
                                f"got {type(fields).__name__}")
            unknown = sorted(set(fields) - set(SITE_FIELDS + GROUP_FIELDS))
            if unknown:
                raise ValueError(f"overrides[{pattern!r}] sets {unknown}, which cannot vary per layer; "
                                 f"allowed: {', '.join(SITE_FIELDS + GROUP_FIELDS)}")
            try:
                dataclasses.replace(self, overrides={}, **fields)
            except (TypeError, ValueError) as err:  # name the override, not the top-level field
                raise type(err)(str(err).replace("QuantConfig.", f"overrides[{pattern!r}].", 1)) from None

    def for_layer(self, name: str) -> QuantConfig:
        """The config with every override whose regex matches ``name`` applied, in order."""
        fields: dict[str, Any] = {}
        for pattern, values in self.overrides.items():
            if re.search(pattern, name):
                fields.update(values)
        return dataclasses.replace(self, overrides={}, **fields) if fields else self

    def selects(self, name: str) -> bool:
        included = not self.include or any(re.search(p, name) for p in self.include)
        return included and not any(re.search(p, name) for p in self.exclude)

    @property
    def w_quantized(self) -> bool:
        return self.w_bits not in (None, 16)

    @property
    def a_quantized(self) -> bool:
        return self.a_bits not in (None, 16)

    @property
    def a_static(self) -> bool:
        """Whether activations use scales measured in calibration (quantized, not per token)."""
        return self.a_quantized and self.a_granularity != "token"

    @property
    def a_zero_point(self) -> bool:
        """Whether activations are quantized asymmetrically (a_symmetric resolved)."""
        return self.a_granularity == "token" if self.a_symmetric is None else not self.a_symmetric


def _as_tuple(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, Iterable):
        raise TypeError(f"QuantConfig.{name}={value!r} is invalid: use a regex string or a list of them, "
                        f"e.g. {name}=[r'mlp\\.']")
    value = tuple(value)
    for pattern in value:
        _compile(name, pattern)
    return value


def _compile(where: str, pattern: Any) -> None:
    if not isinstance(pattern, str):
        raise TypeError(f"{where}: expected a regex string, got {type(pattern).__name__} {pattern!r}")
    try:
        re.compile(pattern)
    except re.error as err:
        raise ValueError(f"{where}: {pattern!r} is not a valid regex ({err}); fix the pattern") from None


def _bad(where: str, name: str, value: Any, fix: str) -> ValueError:
    return ValueError(f"{where}.{name}={value!r} is invalid: {fix}")


def _validate(c: QuantConfig, where: str) -> None:
    for name in ("w_bits", "a_bits"):
        bits = getattr(c, name)
        if bits is not None and (isinstance(bits, bool) or not isinstance(bits, int)
                                 or not (2 <= bits <= 8 or bits == 16)):
            raise _bad(where, name, bits, "use an integer from 2 to 8, or 16 / None to leave it in float")
    if c.w_group_size is not None and (not isinstance(c.w_group_size, int) or c.w_group_size < 2):
        raise _bad(where, "w_group_size", c.w_group_size, "use None (per output channel) or an integer >= 2")
    if isinstance(c.w_clip, str):
        if c.w_clip not in CLIPS:
            raise _bad(where, "w_clip", c.w_clip, f"use one of {CLIPS} or a float ratio in (0, 1]")
    elif isinstance(c.w_clip, bool) or not isinstance(c.w_clip, (int, float)) or not 0 < c.w_clip <= 1:
        raise _bad(where, "w_clip", c.w_clip, f"use one of {CLIPS} or a float ratio in (0, 1]")
    _choice(where, "w_method", c.w_method, W_METHODS)
    _choice(where, "a_granularity", c.a_granularity, GRANULARITIES)
    _choice(where, "capture", c.capture, CAPTURES)
    _choice(where, "weight_format", c.weight_format, WEIGHT_FORMATS)
    _choice(where, "execution", c.execution, EXECUTIONS)
    if c.execution == "int":
        if c.weight_format != "fake":
            raise _bad(where, "weight_format", c.weight_format, 'execution="int" always stores integer codes; '
                       'leave weight_format at its default ("packed" is a storage form of execution="fake")')
        if c.a_granularity == "channel" and c.a_quantized:
            raise _bad(where, "a_granularity", c.a_granularity, 'a per-channel activation scale does not factor '
                       'out of an integer GEMM: use "tensor" or "token" with execution="int", or execution="fake"')
    if c.a_symmetric is False and c.a_granularity != "token":
        raise _bad(where, "a_symmetric", c.a_symmetric, 'asymmetric activations need a_granularity="token" '
                   "(static scales are symmetric); set a_granularity='token' or a_symmetric=True")
    if isinstance(c.a_clip, bool) or not isinstance(c.a_clip, (int, float)) or not 0 < c.a_clip <= 1:
        raise _bad(where, "a_clip", c.a_clip, "use a ratio in (0, 1], e.g. 0.9")
    if not isinstance(c.a_percentile, (int, float)) or not 0 < c.a_percentile <= 100:
        raise _bad(where, "a_percentile", c.a_percentile, "use a percentile in (0, 100], e.g. 99.9")
    if c.smooth_alpha is not None and (not isinstance(c.smooth_alpha, (int, float)) or not 0 <= c.smooth_alpha <= 1):
        raise _bad(where, "smooth_alpha", c.smooth_alpha, "use a float in [0, 1] (0.6 is DuQuant's default) or None")
    b = c.block_size
    if isinstance(b, bool) or not isinstance(b, int) or b < 2 or b & (b - 1):
        raise _bad(where, "block_size", b, "use a power of two >= 2, e.g. 128")
    for name in ("rotation_steps", "calib_tokens", "seed"):
        value = getattr(c, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise _bad(where, name, value, "use a non-negative integer")
    if c.seed >= 2**32:  # seeds torch generators as seed * 1_000_003 + index, which must fit in 64 bits
        raise _bad(where, "seed", c.seed, "use an integer from 0 to 2**32 - 1")
    if c.calib_tokens < 1:
        raise _bad(where, "calib_tokens", c.calib_tokens, "keep at least one row, e.g. 2048")
    budget = c.calib_cache_gb
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 <= budget < math.inf:
        raise _bad(where, "calib_cache_gb", budget, "use a size in GB >= 0 (0 runs the model again for static scales)")
    budget = c.calib_gram_gb
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget < math.inf:
        raise _bad(where, "calib_gram_gb", budget, "use a size in GB > 0 (a smaller one costs more passes over "
                   "the calibration data)")
    for name in ("permute", "w_symmetric", "skip", "keep_float_weights"):
        if not isinstance(getattr(c, name), bool):
            raise _bad(where, name, getattr(c, name), "use True or False")
    if c.a_symmetric is not None and not isinstance(c.a_symmetric, bool):
        raise _bad(where, "a_symmetric", c.a_symmetric, "use True, False, or None (asymmetric only per token)")


def _choice(where: str, name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise _bad(where, name, value, f"use one of {allowed}")
