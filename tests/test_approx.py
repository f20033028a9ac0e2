"""The named approximations stay within their stated error bounds (plaintext)."""
import jax
import jax.numpy as jnp
import pytest

from spu_models.approx import (
    Approx,
    exp_limit,
    gelu,
    masked_softmax,
    sigmoid_poly,
    silu,
)

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


def test_silu_relu_poly_error_bound_over_smollm2_range():
    """SmolLM2-135M's gate pre-activations on MR prompts span about [-33, 50] (max |x| per layer
    measured in plaintext; 0.1% beyond |x| = 8, mostly in the last three layers): the bound holds
    over a wider range, and at the tails silu is relu."""
    from spu_models.approx import SILU_RELU_POLY_ERROR

    x = jnp.concatenate([jnp.linspace(-100.0, 100.0, 400001), jnp.array([-2.0e4, 2.0e4])])
    err = jnp.abs(silu(x, "relu_poly") - silu(x))
    assert float(err.max()) < SILU_RELU_POLY_ERROR
    assert float(err[jnp.abs(x) > 9].max()) < 1.3e-3


def test_silu_relu_poly_under_spu_matches_plaintext():
    """The same formula under ABY3 (FM64, 18 fraction bits), on the measured range and past it."""
    import numpy as np
    import spu.utils.simulation as spsim
    from spu import spu_pb2

    from spu_models.approx import SILU_RELU_POLY_ERROR

    rc = spu_pb2.RuntimeConfig(protocol=spu_pb2.ProtocolKind.ABY3, field=spu_pb2.FieldType.FM64,
                               fxp_fraction_bits=18)
    sim = spsim.Simulator(3, rc)
    x = np.concatenate([np.linspace(-60.0, 60.0, 2401), [-3000.0, 3000.0]]).astype(np.float32)
    got = np.asarray(spsim.sim_jax(sim, lambda v: silu(v, "relu_poly"))(x))
    want = np.asarray(silu(jnp.asarray(x)))
    assert np.abs(got - want).max() < SILU_RELU_POLY_ERROR + 2e-3  # + fixed-point rounding
