"""The diverging colour scale of excess loss, shared by the HTML report and the PNG.

Blue: the model already does better than the reference (negative excess, little to learn); white:
no difference; red: the reference predicts the token much better (high excess: what Rho-1 trains
on). The scale is symmetric around 0 and clipped at ``limit`` (by default the 95th percentile of
|excess| over everything shown, so one outlier does not wash out the rest). Unscored tokens (no
reference loss) are grey.
"""

from __future__ import annotations

import math

import numpy as np

NEGATIVE = (33, 102, 172)  # blue
ZERO = (247, 247, 247)
POSITIVE = (178, 24, 43)  # red
UNSCORED = (200, 200, 200)


def scale_limit(excess_arrays, quantile: float = 0.95) -> float:
    """Symmetric clip of the scale: the ``quantile`` of |excess| over all finite values."""
    finite = [np.abs(e[np.isfinite(e)]) for e in excess_arrays]
    values = np.concatenate(finite) if finite else np.zeros(0)
    if values.size == 0:
        return 1.0
    limit = float(np.quantile(values, quantile))
    return limit if limit > 0 else max(float(values.max()), 1e-6)


def excess_rgb(excess: float, limit: float) -> tuple[int, int, int]:
    """RGB (0-255) of one excess value on the scale clipped at ``limit``."""
    if not math.isfinite(excess):
        return UNSCORED
    t = max(-1.0, min(1.0, excess / limit))
    end = POSITIVE if t > 0 else NEGATIVE
    a = abs(t)
    return tuple(round(z + (e - z) * a) for z, e in zip(ZERO, end))


def rgb_hex(rgb) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)
