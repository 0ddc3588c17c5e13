"""Scalar math shared by the numba kernels (imported by them only, so numba loads lazily).

exp(x) = 2^k * e^r with k = round(x / ln 2) (each kernel picks its rounding of k) and
r = x - k ln 2, ln 2 split in a short exact head and a tail so that k * head is exact; e^r by its
degree-7 Taylor polynomial (|r| <= ln(2)/2: truncation ~5e-9 relative, below fp32's 6e-8); the
caller writes 2^k as exponent bits. No libm call and no table gather, so LLVM vectorizes loops
around it. Arguments are clamped to [EXP_MIN, EXP_MAX], where 2^k stays a normal float.
"""

import math

import numpy as np
from numba import njit

LOG2E = np.float32(1.4426950408889634)
LN2_HI = np.float32(0.693359375)
LN2_LO = np.float32(-2.12194440e-4)
EXP_MIN, EXP_MAX = np.float32(-87.0), np.float32(88.0)
_TAYLOR = tuple(np.float32(1.0 / math.factorial(i)) for i in range(8))
SOFTPLUS_THRESHOLD = np.float32(20.0)  # torch.nn.functional.softplus's default


@njit(cache=True, fastmath=False, inline="always")
def exp_reduced(x, k):
    """exp(x - k ln 2), the polynomial half of exp(x) = 2^k * exp(x - k ln 2)."""
    r = (x - k * LN2_HI) - k * LN2_LO
    c0, c1, c2, c3, c4, c5, c6, c7 = _TAYLOR
    return c0 + r * (c1 + r * (c2 + r * (c3 + r * (c4 + r * (c5 + r * (c6 + r * c7))))))


@njit(cache=True, fastmath=False, inline="always")
def exponent_bits(k):
    """The int32 bits of the float32 2^k (k an integral float, -126 <= k <= 127)."""
    return (np.int32(k) + np.int32(127)) << np.int32(23)


@njit(cache=True, fastmath=False)
def softplus(x):
    """torch's F.softplus: x above the threshold, else log1p(exp(x))."""
    if x > SOFTPLUS_THRESHOLD:
        return x
    return np.float32(math.log1p(math.exp(x)))
