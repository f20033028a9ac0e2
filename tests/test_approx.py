"""The named approximations stay within their stated error bounds (plaintext)."""
import jax
import jax.numpy as jnp
import pytest

from spu_models.approx import Approx, exp_limit, gelu, masked_softmax, sigmoid_poly, silu

X = jnp.linspace(-12.0, 12.0, 24001)


def test_sigmoid_silu_poly():
    assert float(jnp.abs(sigmoid_poly(X) - jax.nn.sigmoid(X)).max()) < 2.2e-3
    assert float(jnp.abs(silu(X, "poly") - silu(X)).max()) < 1.8e-2


def test_gelu_poly_and_tanh():
    assert float(jnp.abs(gelu(X, "poly") - gelu(X)).max()) < 4.1e-3
    inner = jnp.abs(X) < 2.9
    assert float(jnp.abs(gelu(X, "poly") - gelu(X))[inner].max()) < 1e-3
    assert float(jnp.abs(gelu(X, "tanh") - gelu(X)).max()) < 1e-3


def test_exp_limit():
    xn = jnp.linspace(-30.0, 0.0, 30001)
    assert float(jnp.abs(exp_limit(xn) - jnp.exp(xn)).max()) < 1.1e-3


@pytest.mark.parametrize("mode", ["exact", "limit"])
def test_masked_softmax_zeroes_masked_and_guards_empty_rows(mode):
    s = jax.random.normal(jax.random.PRNGKey(0), (3, 5)) * 4
    mask = jnp.array([[1, 1, 0, 1, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    p = masked_softmax(s, mask, mode)
    assert float(jnp.abs(p * (1 - mask)).max()) == 0.0
    ref = jax.nn.softmax(jnp.where(mask[:2] > 0, s[:2], -jnp.inf), axis=-1)
    assert float(jnp.abs(p[:2] - ref).max()) < (1e-6 if mode == "exact" else 5e-3)
    assert bool(jnp.all(jnp.isfinite(p)))  # fully masked row: zeros, not NaN


def test_unknown_names_rejected():
    with pytest.raises(ValueError, match="silu"):
        Approx(silu="nope")
    with pytest.raises(ValueError, match="gelu"):
        gelu(X, "nope")
