"""Target values as sources give them: missing markers, and derived log-scale moduli."""

from __future__ import annotations

import math
from typing import Any


def clean_label(value: Any) -> float | None:
    """A finite float, or None for a missing label (NaN, None, JARVIS's "na", empty text)."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, str):
        value = value.strip()
        if value.lower() in ("", "na", "nan", "none", "null"):
            return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def log10_positive(value: float | None) -> float | None:
    """log10 of a modulus in GPa; None when missing or not positive (never a made-up value)."""
    if value is None or value <= 0:
        return None
    return math.log10(value)
