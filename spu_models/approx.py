"""Named, explicitly chosen approximations of the non-linear ops.

Every model calls its non-linearities through an :class:`Approx` instance held in its config,
never through ``jax.nn`` directly and never by monkeypatching. Under SPU, ``exact`` lowers to
SPU's own protocol implementation of the op (whose flavour, e.g. Taylor or Pade exp, is an SPU
runtime knob chosen by the policy); the other names are MPC-friendly formulas written in plain
jnp arithmetic (additions, multiplications, comparisons), so SPU runs exactly the formula named.

Masking: softmax takes a 0/1 mask and applies it *after* the exponential as a multiplication,
on top of a bounded additive bias (``MASK_BIAS``). A bounded bias keeps every value inside the
fixed-point range (``jnp.finfo.min`` does not), and the multiplication makes masked entries
exactly zero even where an approximate exp is inaccurate far from 0.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

MASK_BIAS = -1.0e4  # bounded; fits FM64 fixed point with room to spare

EXP_MODES = ("exact", "limit")
SOFTMAX_MODES = ("exact", "limit")
SILU_MODES = ("exact", "poly", "relu_poly")
GELU_MODES = ("exact", "tanh", "poly")
RSQRT_MODES = ("exact",)


# ---------------------------------------------------------------- exp
def exp_limit(x, steps: int = 8, lower: float = -14.0):
    """exp(x) ~ (1 + x / 2^steps)^(2^steps), set to 0 below ``lower`` (x <= 0 expected)."""
    y = 1.0 + jnp.maximum(x, lower) / (2.0 ** steps)
    for _ in range(steps):
        y = y * y
    return jnp.where(x < lower, 0.0, y)


# ---------------------------------------------------------------- sigmoid / silu
# Least-squares coefficients, fitted once in float64 (odd powers of x/8 for sigmoid - 1/2 on
# [-8, 8]; even powers of x/3 for gelu(x) - x/2 on [-3, 3]). Max abs errors are asserted in tests.
_SIG_ODD = (1.9788533173019969, -9.295453756810888, 39.299254329343924, -111.84452382033759,
            199.7475553826388, -212.7115933791758, 122.85924878562068, -29.53572599001877)
_GELU_EVEN = (0.00028344211878905695, 3.567029809357286, -5.0667748498905905, 5.625862615297451,
              -3.6382870128042044, 1.008739822552935)
_GELU_LEFT = (-0.5015376266693747, -0.4183563728676373, -0.11696112043997056, -0.01093922220316068)


def _horner(coeffs, t):
    acc = coeffs[-1]
    for c in reversed(coeffs[:-1]):
        acc = acc * t + c
    return acc


def sigmoid_poly(x):
    """sigmoid(x): odd degree-15 polynomial on [-8, 8] (max error 2.1e-3); 0 / 1 outside."""
    t = jnp.clip(x, -8.0, 8.0) / 8.0
    mid = jnp.clip(0.5 + t * _horner(_SIG_ODD, t * t), 0.0, 1.0)
    return jnp.where(x < -8.0, 0.0, jnp.where(x > 8.0, 1.0, mid))


def sigmoid_stable(x):
    """1 / (1 + exp(-x)) that only ever exponentiates values <= 0.

    ``jax.nn.sigmoid`` lowers to 1 / (1 + exp(-x)); under fixed point exp(-x) overflows for
    x < -31 or so (FM64, 18 fraction bits) and the result is garbage instead of 0.
    """
    e = jnp.exp(-jnp.abs(x))
    s = 1.0 / (1.0 + e)
    return jnp.where(x >= 0, s, 1.0 - s)


# silu(x) - relu(x) = -|x| sigmoid(-|x|): even, in [-0.28, 0], and below 0.003 in size past |x| = 8.
# Minimax (L-inf, fitted once in float64) degree-5 polynomial in |x|/8 on [0, 8]: max error 4.0e-3.
_SILU_RELU = (-0.0035882571558542853, -4.083097426819612, 20.24991978122866, -38.387401149260235,
              32.6016293854352, -10.384183281156112)
SILU_RELU_POLY_BOUND = 8.0  # beyond it silu = relu (error <= 8 sigmoid(-8) = 2.7e-3)
SILU_RELU_POLY_ERROR = 4.1e-3  # max |relu_poly - silu| over all x (asserted in the tests)


def silu_relu_poly(x):
    """silu(x) ~ relu(x) + p(|x|) for |x| < 8, relu(x) beyond: max error 4.0e-3 everywhere.

    Under MPC: two comparisons (the sign, which gives relu and |x| by two selects, and |x| < 8)
    and a degree-5 polynomial (Horner), against ``exact``'s exp, reciprocal and two comparisons,
    and ``poly``'s four comparisons and degree 15. Outside |x| < 8 the polynomial's value (large,
    even wrapped around in fixed point for huge |x|) is multiplied by an exact 0: harmless."""
    pos = x > 0
    relu = jnp.where(pos, x, 0.0)
    u = jnp.where(pos, x, -x)
    return relu + jnp.where(u < SILU_RELU_POLY_BOUND, _horner(_SILU_RELU, u / SILU_RELU_POLY_BOUND), 0.0)


def silu(x, mode: str = "exact"):
    if mode == "exact":
        return x * sigmoid_stable(x)
    if mode == "poly":
        return x * sigmoid_poly(x)
    if mode == "relu_poly":
        return silu_relu_poly(x)
    raise ValueError(f"unknown silu approximation {mode!r}; choose from {SILU_MODES}")


# ---------------------------------------------------------------- gelu
def gelu(x, mode: str = "exact"):
    if mode == "exact":
        return jax.nn.gelu(x, approximate=False)
    if mode == "tanh":
        return jax.nn.gelu(x, approximate=True)
    if mode == "poly":
        # PUMA-style piecewise: 0 below -4, a cubic on [-4, -1.95), x/2 + an even degree-10
        # polynomial on [-1.95, 3], and x above 3. Max error 4e-3 (just above 3),
        # 9e-4 elsewhere.
        t = x / 3.0
        mid = 0.5 * x + _horner(_GELU_EVEN, t * t)
        left = _horner(_GELU_LEFT, x)
        return jnp.where(x < -4.0, 0.0, jnp.where(x < -1.95, left, jnp.where(x <= 3.0, mid, x)))
    raise ValueError(f"unknown gelu approximation {mode!r}; choose from {GELU_MODES}")


# ---------------------------------------------------------------- rsqrt
def rsqrt(x, mode: str = "exact"):
    if mode == "exact":
        return jax.lax.rsqrt(x)
    raise ValueError(f"unknown rsqrt approximation {mode!r}; choose from {RSQRT_MODES}")


# ---------------------------------------------------------------- softmax
def masked_softmax(scores, mask=None, mode: str = "exact", axis: int = -1):
    """Softmax over ``axis``; ``mask`` (broadcastable 0/1 or bool) zeroes excluded entries."""
    if mode not in SOFTMAX_MODES:
        raise ValueError(f"unknown softmax approximation {mode!r}; choose from {SOFTMAX_MODES}")
    if mask is not None:
        mask = mask.astype(scores.dtype)
        scores = scores + (1.0 - mask) * MASK_BIAS
    scores = scores - jax.lax.stop_gradient(jnp.max(scores, axis=axis, keepdims=True))
    e = jnp.exp(scores) if mode == "exact" else exp_limit(scores)
    if mask is not None:
        e = e * mask
    denom = jnp.sum(e, axis=axis, keepdims=True)
    # one reciprocal per row and a multiply, not a divide per entry: much cheaper under MPC.
    # The floor guards rows that are fully masked (pad queries): zeros, never NaN.
    return e * (1.0 / jnp.maximum(denom, 1e-6))


# ---------------------------------------------------------------- valid input ranges
# Fixed point in a ring of ``ring`` bits with ``f`` fraction bits holds |x| < 2^(ring-2-f); a
# product of two such values carries 2f fraction bits before it is truncated, so it wraps around
# unless |x*y| < 2^(ring-2-2f). The model side must keep its values inside those limits:
ACTIVATION_BOUND = 2.0 ** 15  # design bound of |activations| that meet a secret product:
                              # SmolLM2-135M's massive activations reach |x| ~ 2.2e4 (docs/numerics.md)
EXP_LIMIT_RANGE = (-14.0, 0.0)  # exp_limit: accurate on [lower, 0]; 0 below lower; not for x > 0
SIGMOID_POLY_RANGE = (-8.0, 8.0)  # polynomial inside, exact 0 / 1 outside: valid everywhere
GELU_POLY_RANGE = (-4.0, 3.0)  # piecewise: 0 below, x above: valid everywhere
SILU_RELU_POLY_RANGE = (-8.0, 8.0)  # polynomial inside, relu outside: valid everywhere


def ring_bits(field: str) -> int:
    return {"FM32": 32, "FM64": 64, "FM128": 128}[field]


def fixed_point_ranges(field: str, fxp_bits: int) -> dict:
    """What this field and fraction-bit count can hold: ``value`` (largest |x|), ``product``
    (largest |x*y| of two secret values before truncation), ``exp_arg`` (largest x whose exp
    is representable), ``resolution`` (smallest step)."""
    import math

    ring = ring_bits(field)
    return {"value": 2.0 ** (ring - 2 - fxp_bits), "product": 2.0 ** (ring - 2 - 2 * fxp_bits),
            "exp_arg": (ring - 2 - fxp_bits) * math.log(2.0), "resolution": 2.0 ** -fxp_bits}


def approx_ranges(approx: "Approx") -> dict:
    """Each approximation's valid input range (None: all reals the field holds)."""
    return {"exp": EXP_LIMIT_RANGE if approx.exp == "limit" else None,
            "softmax": EXP_LIMIT_RANGE if approx.softmax == "limit" else None,
            "silu": None, "gelu": None, "rsqrt": (0.0, None)}


def fixed_point_problems(approx: "Approx", field: str, fxp_bits: int, max_exp_arg: float = 0.0,
                         activation_bound: float = ACTIVATION_BOUND) -> list[str]:
    """Why this configuration would leave an approximation's valid range or the field (empty: it
    does not). ``max_exp_arg``: the largest argument the model exponentiates (0 for softmax and
    sigmoid, which subtract the max / take -|x|; an attention stabilizer may allow more)."""
    r = fixed_point_ranges(field, fxp_bits)
    out = []
    need = max(activation_bound, abs(MASK_BIAS))
    if r["product"] < need:
        import math

        top = int((ring_bits(field) - 2 - math.log2(need)) // 2)
        out.append(f"fxp_fraction_bits {fxp_bits} under {field}: a product wraps above {r['product']:.3g}, below "
                   f"activations of {need:.3g} (massive activations, the mask bias); use at most {top}")
    if max_exp_arg > 0 and approx.exp == "limit":
        out.append(f"approx.exp limit is valid on {list(EXP_LIMIT_RANGE)} but this attention exponentiates "
                   f"arguments up to {max_exp_arg:g}; use exp exact")
    if max_exp_arg >= r["exp_arg"]:
        out.append(f"exp of arguments up to {max_exp_arg:g} overflows {field} with {fxp_bits} fraction bits "
                   f"(largest representable exp argument {r['exp_arg']:.3g})")
    if r["resolution"] > 2.0 ** -8:
        out.append(f"fxp_fraction_bits {fxp_bits} resolves only {r['resolution']:g}: exp_limit's first step "
                   "x/256 and the softmax normalisation need at least 8")
    return out


@dataclasses.dataclass(frozen=True)
class Approx:
    """Which approximation each non-linear op uses. Selected by the model config / policy."""

    softmax: str = "exact"
    exp: str = "exact"
    silu: str = "exact"
    gelu: str = "exact"
    rsqrt: str = "exact"

    def __post_init__(self):
        for name, allowed in (("softmax", SOFTMAX_MODES), ("exp", EXP_MODES), ("silu", SILU_MODES),
                              ("gelu", GELU_MODES), ("rsqrt", RSQRT_MODES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"approximation {name}={getattr(self, name)!r} is unknown; "
                                 f"choose from {allowed}")

    # bound helpers, so models call ``cfg.approx.silu(x)``
    def exp_fn(self, x):
        return jnp.exp(x) if self.exp == "exact" else exp_limit(x)

    def silu_fn(self, x):
        return silu(x, self.silu)

    def gelu_fn(self, x):
        return gelu(x, self.gelu)

    def rsqrt_fn(self, x):
        return rsqrt(x, self.rsqrt)

    def softmax_fn(self, scores, mask=None, axis: int = -1):
        return masked_softmax(scores, mask, self.softmax, axis)

    def activation(self, name: str) -> Callable:
        """Map an HF ``hidden_act`` name to the configured approximation."""
        if name in ("silu", "swish"):
            return self.silu_fn
        if name == "gelu":
            return self.gelu_fn
        if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
            return lambda x: gelu(x, "tanh" if self.gelu == "exact" else self.gelu)
        if name == "relu":
            return jax.nn.relu
        raise ValueError(f"unsupported activation {name!r}")
