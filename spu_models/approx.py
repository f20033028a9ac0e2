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
SILU_MODES = ("exact", "poly")
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
def _sigmoid_poly(x):
    """Piecewise sigmoid: 0 below -8, 1 above 8, degree-? odd polynomial of tanh(x/2) in between.

    Uses sigmoid(x) = 0.5 + 0.5 * tanh(x/2) with tanh approximated by a clipped rational-free
    odd polynomial fitted on [-4, 4] (tanh(4) ~ 0.9993).
    """
    t = jnp.clip(x * 0.5, -4.0, 4.0)
    # least-squares odd polynomial of degree 9 for tanh on [-4, 4]
    c1, c3, c5, c7, c9 = 0.9519, -0.2105, 2.402e-2, -1.302e-3, 2.641e-5
    t2 = t * t
    th = t * (c1 + t2 * (c3 + t2 * (c5 + t2 * (c7 + t2 * c9))))
    return jnp.clip(0.5 + 0.5 * th, 0.0, 1.0)


def silu(x, mode: str = "exact"):
    if mode == "exact":
        return x * jax.nn.sigmoid(x)
    if mode == "poly":
        return x * _sigmoid_poly(x)
    raise ValueError(f"unknown silu approximation {mode!r}; choose from {SILU_MODES}")


# ---------------------------------------------------------------- gelu
def gelu(x, mode: str = "exact"):
    if mode == "exact":
        return jax.nn.gelu(x, approximate=False)
    if mode == "tanh":
        return jax.nn.gelu(x, approximate=True)
    if mode == "poly":
        # PUMA-style piecewise: 0 for x < -4, cubic on [-4, -1.95), degree-6 on [-1.95, 3], x above.
        a = (-0.5054031199708174, -0.42226581151983866, -0.11807612951181953, -0.011034134030615728)
        b = (0.008526321541038084, 0.5, 0.3603292692789629, 0.0,
             -0.037688200365904236, 0.0, 0.0018067462606141187)
        p3 = a[0] + x * (a[1] + x * (a[2] + x * a[3]))
        p6 = b[0] + x * (b[1] + x * (b[2] + x * (b[3] + x * (b[4] + x * (b[5] + x * b[6])))))
        return jnp.where(x < -4.0, 0.0, jnp.where(x < -1.95, p3, jnp.where(x <= 3.0, p6, x)))
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
    return e / jnp.maximum(denom, 1e-6)  # guard rows that are fully masked (pad queries)


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
