"""``bench step`` / ``bench e2e``: the SFT and PT baselines driven through a session (shares in,
a step run, resident state updated in place), the warm-up program and the plaintext check."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from bench.baselines import EPS, LOSS_SCALE, LR, make_pt_program, make_sft_program
from tuning.transports import make_backend


def sft_setup(session, bundle, inputs: dict) -> int:
    """Share the SFT inputs, the trainable copy of the weights and zero Adam moments."""
    leaves = jax.tree_util.tree_leaves(bundle.params)
    for k, v in inputs.items():
        session.put(f"sft_{k}", v)
    for i, x in enumerate(leaves):
        session.put(f"sft_p{i}", np.asarray(x, np.float32))
        session.put(f"sft_m{i}", np.zeros(np.shape(x), np.float32))
        session.put(f"sft_v{i}", np.zeros(np.shape(x), np.float32))
    return len(leaves)


def sft_run(session, config, n_leaves: int, step: int, lr=LR, eps=EPS, scale=LOSS_SCALE):
    """One SFT step; the new weights and moments overwrite the resident ones (in place)."""
    state = {f"{k}{i}": f"sft_{k}{i}" for k in "pmv" for i in range(n_leaves)}
    inputs = {k: f"sft_{k}" for k in ("tokens", "select", "rows", "labels")} | state
    return session.run(make_sft_program(config, session.execution, step, lr, eps, scale), inputs,
                       {"loss": "sft_loss"} | state, key=f"sft_step{step}")


def pt_setup(session, bundle, prompt0: np.ndarray, labels: np.ndarray):
    session.put("pt_prompt", prompt0)
    session.put("pt_m", np.zeros_like(prompt0))
    session.put("pt_v", np.zeros_like(prompt0))
    session.put("pt_labels", labels)


def pt_run(session, config, set_name: str, step: int, lr=LR, eps=EPS, scale=LOSS_SCALE):
    """One PT step on the example chunk ``set_name`` (e.g. ``"ex0"``) shared by a ``prefix`` SecureScorer."""
    inputs = {"text": f"{set_name}_text", "select": f"{set_name}_select", "head": "head", "labels": "pt_labels",
              "prompt": "pt_prompt", "m": "pt_m", "v": "pt_v"}
    return session.run(make_pt_program(config, session.execution, step, lr, eps, scale), inputs,
                       {"loss": "pt_loss", "prompt": "pt_prompt", "m": "pt_m", "v": "pt_v"}, key=f"pt_step{step}")


def session_warmup(session):
    """One small program with every kind of op the methods use (matmul, exp, reciprocal, sqrt,
    comparison), run once before anything is measured, so that one-off protocol set-up (e.g.
    Cheetah's OT / HE keys) is not charged to whichever method happens to run first."""
    session.put("warm_x", np.linspace(0.1, 2.0, 64, dtype=np.float32).reshape(8, 8))
    cost = session.run(lambda params, x: {"y": jnp.sqrt(x) / (1.0 + jnp.exp(-jnp.abs(x @ x))) + jnp.maximum(x, 0.5)},
                       {"x": "warm_x"}, {"y": "warm_y"}, key="session_warmup")
    session.drop("warm_x", "warm_y")
    return cost


def adam_probe(session, bundle, log=print, tag="", n: int = 10000) -> dict:
    """When SFT is skipped: the cost of Adam's element-wise part alone (m * k / (sqrt(v) + e), the
    sqrt and the divide every weight needs) on ``n`` elements, scaled to the model's weight count.
    A lower bound on the SFT step (no forward, no backward), not a measurement of it."""
    rng = np.random.default_rng(0)
    session.put("probe_m", rng.normal(size=n).astype(np.float32))
    session.put("probe_v", rng.random(size=n).astype(np.float32))
    cost = session.run(lambda params, m, v: {"u": 0.3 * m / (jnp.sqrt(v) + 0.004)},
                       {"m": "probe_m", "v": "probe_v"}, {"u": "probe_u"}, key="adam_probe")
    session.drop("probe_m", "probe_v", "probe_u")
    n_params = sum(int(np.prod(np.shape(x))) for x in jax.tree_util.tree_leaves(bundle.params))
    out = {"probe_elements": n, "probe_wall_s": cost.wall_s, "probe_send_bytes": cost.send_bytes,
           "n_params": n_params, "lower_bound_wall_s": cost.wall_s * n_params / n,
           "lower_bound_send_bytes": cost.send_bytes * n_params / n}
    log(f"[{tag}] Adam's sqrt+divide alone: {cost.wall_s / n * 1e6:.0f} us and "
        f"{cost.send_bytes / n:.0f} B per weight -> >= {out['lower_bound_wall_s'] / 3600:.1f} h and "
        f">= {out['lower_bound_send_bytes'] / 1e9:.0f} GB per SFT step ({n_params / 1e6:.1f}M weights)")
    return out


CHECK = "SFT step 1 under MPC against plaintext (bench step --check)"


def check_against_plaintext(session, bundle, policy, sin, n_leaves, hp: dict, log=print) -> dict:
    """After SFT step 1 in MPC: the same step in plaintext, compared leaf by leaf (opens the new
    weights to the data owner: a check only, never part of a measured run)."""
    plain = make_backend("plaintext", bundle, policy)
    sft_setup(plain, bundle, sin)
    sft_run(plain, bundle.config, n_leaves, 1, **hp)
    w0 = [np.asarray(x, np.float32) for x in jax.tree_util.tree_leaves(bundle.params)]
    dw = pstep = gmax = dg = 0.0
    num = den_a = den_b = 0.0
    for i in range(n_leaves):
        mp, pp = session.unsafe_open(f"sft_p{i}", CHECK), plain.unsafe_open(f"sft_p{i}", CHECK)
        um, up = mp - w0[i], pp - w0[i]
        dw = max(dw, float(np.abs(mp - pp).max()))
        pstep = max(pstep, float(np.abs(up).max()))
        num, den_a, den_b = num + float((um * up).sum()), den_a + float((um * um).sum()), den_b + float((up * up).sum())
        g_m = session.unsafe_open(f"sft_m{i}", CHECK) / (0.1 * hp["scale"])
        g_p = plain.unsafe_open(f"sft_m{i}", CHECK) / (0.1 * hp["scale"])
        gmax, dg = max(gmax, float(np.abs(g_p).max())), max(dg, float(np.abs(g_m - g_p).max()))
    out = {"loss_mpc": float(session.unsafe_open("sft_loss", CHECK)),
           "loss_plain": float(plain.unsafe_open("sft_loss", CHECK)),
           "max_abs_diff_new_weights": dw, "max_abs_plain_step": pstep, "max_abs_step_diff_over_lr": dw / hp["lr"],
           "cosine(update_mpc, update_plain)": num / max(np.sqrt(den_a * den_b), 1e-30),
           "max_abs_grad_plain": gmax, "max_abs_grad_diff": dg}
    log("SFT step 1, MPC vs plaintext: " + ", ".join(f"{k} {v:.3g}" for k, v in out.items()))
    plain.close()
    return out
