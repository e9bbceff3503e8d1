"""Bit-width specifications: `W/A` (weights/activations) or `fp32`, parsed once and validated.

Kept torch-free so the CLI can reject a bad `--bits` before importing torch or brevitas.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from edgeseg.errors import UserError

MIN_BITS = 2  # 1-bit (binary) layers need different quantizers (sign, no zero); not offered
MAX_BITS = 8  # deployment containers are int8/uint8 (QCDQ); wider needs int16 kernels nobody ships
FLOAT_NAMES = ("fp32", "float", "float32")
_PATTERN = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


@dataclass(frozen=True)
class BitWidths:
    """Weight and activation bit widths; both None means full precision (fp32)."""

    weight: int | None
    act: int | None

    @property
    def is_float(self) -> bool:
        return self.weight is None and self.act is None

    def __str__(self) -> str:
        return "fp32" if self.is_float else f"{self.weight}/{self.act}"


FP32 = BitWidths(None, None)


def parse_bits(text: str, source: str = "--bits") -> BitWidths:
    """Parse `W/A` (each in 2..8, e.g. `4/6`) or `fp32`; anything else is one clear UserError naming `source`."""
    if not isinstance(text, str):
        raise UserError(f"{source}: expected a string like 4/6 or fp32, got {text!r}")
    if text.strip().lower() in FLOAT_NAMES:
        return FP32
    match = _PATTERN.match(text)
    if match is None:
        raise UserError(f"{source} '{text}': expected W/A with W and A in {MIN_BITS}..{MAX_BITS} "
                        f"(e.g. 4/6, 8/8, 2/4) or fp32")
    weight, act = int(match.group(1)), int(match.group(2))
    for what, value in (("weight", weight), ("activation", act)):
        if not MIN_BITS <= value <= MAX_BITS:
            raise UserError(f"{source} '{text}': {what} bits must be within {MIN_BITS}..{MAX_BITS}, got {value}")
    return BitWidths(weight, act)


def first_last_widths(value: int | None, bits: BitWidths, source: str = "quant.first_last_bits") -> BitWidths:
    """Bit widths of the first and last convolutions.

    None keeps them at `bits`; 2..8 sets both weight and activation width; 32 keeps them in
    floating point, as AskariHemmat et al. (2019) did (their first and last convs were float).
    """
    if value is None:
        return bits
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{source}: expected an integer (2..8, or 32 for float), got {value!r}")
    if value == 32:
        return FP32
    if not MIN_BITS <= value <= MAX_BITS:
        raise UserError(f"{source}: must be within {MIN_BITS}..{MAX_BITS}, 32 (float) or null, got {value}")
    return BitWidths(value, value)
