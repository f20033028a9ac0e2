"""The gradient baselines' MPC programs: one SFT step and one gradient prompt-tuning step.

Pure JAX, like every program that runs inside MPC (``spu_models.forward``): ``bench step`` and
``bench e2e`` price them against forward-only tuning under the same policy. Adam is
``fixed_point_adam``, optax's update reordered for SPU's fixed point (see below). They live in
bench, not in ``spu_models``: the product never runs them, only the benchmarks that price them.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from spu_models.forward import build_model, embedding_table, make_tuning_programs

# Adam hyper-parameters (the cost does not depend on them). SPU's fixed point (FM64, 18 fraction
# bits: resolution 2^-18 ~ 3.8e-6; its sqrt returns 0 for inputs >= 2^18; x * x wraps for
# |x| > ~11585) has too little range for Adam's second moment v ~ g^2 as written in optax:
# - v = (1 - b2) g^2 underflows to 0 for every |g| < ~0.06 (most of them; SmolLM2's median |g| is
#   1.4e-4) and the step becomes lr * g / eps (60x too large on tiny-llama). Loss scaling fixes
#   it: the loss is multiplied by LOSS_SCALE before jax.grad (free: a scalar) and Adam is given
#   eps * LOSS_SCALE, which is exactly Adam(lr, eps) on the unscaled gradient;
# - optax divides v by its bias correction (1 - b2^t) before the sqrt (x1000 at step 1), so any
#   LOSS_SCALE * |g| > 512 hits sqrt's limit (SmolLM2, 1 layer: max |g| 15.8): the step blew up
#   (cosine 0.1 with plaintext). ``fixed_point_adam`` applies that correction after the sqrt
#   (sqrt(v / c2) = sqrt(v) / sqrt(c2)): the same Adam, one constant multiply fewer.
# - optax's eps 1e-8 rounds to 0 (a division by ~0 where v is 0): eps = 1e-3.
# With (128, 1e-3) a numpy emulation of the quantization gives cosine 0.998 with float Adam on
# SmolLM2's step-1 gradients; ``--check`` measures it under MPC.
LR, EPS, LOSS_SCALE = 1e-4, 1e-3, 128.0


def fixed_point_adam(lr: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
    """``optax.adam`` (same state, same update in exact arithmetic), with the second moment's bias
    correction moved after the square root: step = -lr * (m * sqrt(c2) / c1) / (sqrt(v) + eps * sqrt(c2)),
    c_i = 1 - b_i^t. ``t`` must be concrete (public): the corrections are public constants."""
    def init(params):
        zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
        return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=zeros, nu=zeros)

    def update(grads, state, params=None):
        del params
        t = int(state.count) + 1  # public iteration number
        c1, c2 = 1.0 - b1 ** t, 1.0 - b2 ** t
        k, e = float(np.sqrt(c2) / c1), float(eps * np.sqrt(c2))
        mu = jax.tree_util.tree_map(lambda m, g: b1 * m + (1.0 - b1) * g, state.mu, grads)
        nu = jax.tree_util.tree_map(lambda v, g: b2 * v + (1.0 - b2) * (g * g), state.nu, grads)
        # divide first, then scale by lr: lr * m would underflow the fixed point before the division
        upd = jax.tree_util.tree_map(lambda m, v: -lr * ((k * m) / (jnp.sqrt(v) + e)), mu, nu)
        return upd, optax.ScaleByAdamState(count=jnp.asarray(t, jnp.int32), mu=mu, nu=nu)

    return optax.GradientTransformation(init, update)


# ------------------------------------------------------------------------------------ programs
def ce_loss(logits, labels):
    """Mean cross-entropy of logits [E, R] against one-hot labels [E, R] (both secret)."""
    return -jnp.mean(jnp.sum(labels * jax.nn.log_softmax(logits, axis=-1), axis=-1))


def _adam_state(step: int, mu, nu):
    """Adam's state before step ``step`` (1-based). The count is public (every party knows the
    iteration number), so the bias corrections are public constants: multiplications, no division."""
    return optax.ScaleByAdamState(count=np.int32(step - 1), mu=mu, nu=nu)


def make_sft_program(config, execution, step: int, lr: float = LR, eps: float = EPS,
                     scale: float = LOSS_SCALE):
    """SFT step ``step``: ``program(params, tokens, select, rows, labels, p<i>, m<i>, v<i>)``.

    ``p<i>`` are the weights being trained (leaf ``i`` of the parameter tree; the resident model
    owner's weights ``params`` only give the tree structure), ``m<i>``/``v<i>`` Adam's moments.
    tokens [E, L, V] one-hot; select [E, L] one-hot of each last real token; rows [R, V] one-hot
    verbalizer rows; labels [E, R] one-hot. Returns the loss (before the update) and the new
    p<i>, m<i>, v<i> (moments in loss-scaled units: m = scale * m_adam, v = scale^2 * v_adam)."""
    model = build_model(config, execution)
    tx = fixed_point_adam(lr, eps=eps * scale)

    def sft(params, tokens, select, rows, labels, **state):
        leaves, tree = jax.tree_util.tree_flatten(params)
        n = len(leaves)
        unflat = lambda k: jax.tree_util.tree_unflatten(tree, [state[f"{k}{i}"] for i in range(n)])  # noqa: E731
        weights = unflat("p")

        def loss_fn(w):
            embeds = tokens @ embedding_table(config, w)  # the lookup: the table is trained too
            E, L, _ = embeds.shape
            pos = jnp.broadcast_to(jnp.arange(L), (E, L))
            h = model.apply({"params": w}, inputs_embeds=embeds, position_ids=pos, method=model.hidden)
            picked = jnp.einsum("el,elh->eh", select, h)
            logits = model.apply({"params": w}, picked, rows, method=model.head_select)
            return ce_loss(logits, labels) * scale

        loss, grads = jax.value_and_grad(loss_fn)(weights)
        loss = loss * (1.0 / scale)
        updates, adam = tx.update(grads, _adam_state(step, unflat("m"), unflat("v")), weights)
        new = optax.apply_updates(weights, updates)
        out = {"loss": loss}
        for k, tree_ in (("p", new), ("m", adam.mu), ("v", adam.nu)):
            out.update({f"{k}{i}": x for i, x in enumerate(jax.tree_util.tree_leaves(tree_))})
        return out

    return sft


def make_pt_program(config, execution, step: int, lr: float = LR, eps: float = EPS,
                    scale: float = LOSS_SCALE):
    """PT step ``step``: ``program(params, text, select, head, labels, prompt, m, v)``: gradient
    w.r.t. the soft prompt [n, H] only (BBT placement via ``score_full``), Adam on it; weights
    frozen (they are not differentiated and not outputs)."""
    score_full = make_tuning_programs(config, execution)["score_full"]
    tx = fixed_point_adam(lr, eps=eps * scale)

    def pt(params, text, select, head, labels, prompt, m, v):
        def loss_fn(pr):
            logits = score_full(params, text, select, head, p0=pr, delta=jnp.zeros((1,) + pr.shape))["logits"]
            return ce_loss(logits[0], labels) * scale

        loss, g = jax.value_and_grad(loss_fn)(prompt)
        loss = loss * (1.0 / scale)
        updates, adam = tx.update(g, _adam_state(step, m, v), prompt)
        return {"loss": loss, "prompt": optax.apply_updates(prompt, updates), "m": adam.mu, "v": adam.nu}

    return pt
