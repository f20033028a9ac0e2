"""Per-iteration MPC cost of fine-tuning vs gradient prompt tuning vs our forward-only generation.

    secptune bench step [--policy aby3,cheetah] [--layers 2] [--seq 32] [--examples 4] [--popsize 20]
                        [--n-tokens 5] [--vocab 4096] [--check]

Side by side in one run, on the same model (SmolLM2-135M weights, first ``--layers`` layers, first
``--vocab`` rows of the tied embedding), the same policy, the same E examples of real MR text at
the same padded length, every input secret-shared, costs recorded by the ``sim`` back end:

- ``SFT``: one full fine-tuning step inside MPC: one-hot tokens -> embedding lookup (a matmul, as
  the table itself is trained), forward, CE loss over the verbalizer logits against secret one-hot
  labels, ``jax.grad`` w.r.t. every weight (tied embedding included), Adam update of all of them
  (``fixed_point_adam``: optax's Adam update, reordered for fixed point; see below). New weights
  and Adam moments are outputs that stay resident as shares.
- ``PT``: gradient prompt tuning: same loss, BBT placement (soft prompt, then text: ``score_full``),
  ``jax.grad`` w.r.t. the n x H soft prompt only, Adam on the prompt only; weights frozen.
- forward-only (ours): one generation = P candidate prompts scored on the E examples, only the
  [P, E, R] verbalizer logits opened; ``prefix`` (``score_full``, recomputed per candidate) and
  ``cached`` (``score_cached`` against a prefill done once; the prefill is reported separately).

SFT and PT: step 1 is the warm-up (and compiles), step 2 (non-zero Adam state) is measured;
forward-only: generation 1 warms up, generation 2 is measured. With ``--warmup 0`` the first run
is the measured one (ABY3 has no one-off run cost: warm-up and measured runs agree to within
the machine's noise); a small program with every op kind runs first in each session either way.
Compilation is never timed. ``--no-sft cheetah`` skips SFT under the listed policies (Cheetah:
Adam's sqrt + divide alone runs at ~1.5 ms per weight here, hours per step) and reports a lower
bound instead, clearly marked. ``--check`` compares SFT step 1 with plaintext. ``--from-json
a.json[,b.json]`` re-renders (and merges per-policy runs of one configuration) without measuring.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import time

import numpy as np

from bench.common import RESULTS, markdown_table, save, tag_suffix

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
    import jax
    import jax.numpy as jnp
    import optax

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
    import jax
    import jax.numpy as jnp

    return -jnp.mean(jnp.sum(labels * jax.nn.log_softmax(logits, axis=-1), axis=-1))


def _adam_state(step: int, mu, nu):
    """Adam's state before step ``step`` (1-based). The count is public (every party knows the
    iteration number), so the bias corrections are public constants: multiplications, no division."""
    import optax

    return optax.ScaleByAdamState(count=np.int32(step - 1), mu=mu, nu=nu)


def make_sft_program(config, step: int, lr: float = LR, eps: float = EPS, scale: float = LOSS_SCALE):
    """SFT step ``step``: ``program(params, tokens, select, rows, labels, p<i>, m<i>, v<i>)``.

    ``p<i>`` are the weights being trained (leaf ``i`` of the parameter tree; the resident model
    owner's weights ``params`` only give the tree structure), ``m<i>``/``v<i>`` Adam's moments.
    tokens [E, L, V] one-hot; select [E, L] one-hot of each last real token; rows [R, V] one-hot
    verbalizer rows; labels [E, R] one-hot. Returns the loss (before the update) and the new
    p<i>, m<i>, v<i> (moments in loss-scaled units: m = scale * m_adam, v = scale^2 * v_adam)."""
    import jax
    import jax.numpy as jnp
    import optax

    from spu_models.forward import build_model, embedding_table

    model = build_model(config)
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

    sft.__name__ = f"sft_step{step}"
    return sft


def make_pt_program(config, step: int, lr: float = LR, eps: float = EPS, scale: float = LOSS_SCALE):
    """PT step ``step``: ``program(params, text, select, head, labels, prompt, m, v)``: gradient
    w.r.t. the soft prompt [n, H] only (BBT placement via ``score_full``), Adam on it; weights
    frozen (they are not differentiated and not outputs)."""
    import jax
    import jax.numpy as jnp
    import optax

    from spu_models.forward import make_tuning_programs

    score_full = make_tuning_programs(config)["score_full"]
    tx = fixed_point_adam(lr, eps=eps * scale)

    def pt(params, text, select, head, labels, prompt, m, v):
        def loss_fn(pr):
            logits = score_full(params, text, select, head, p0=pr, delta=jnp.zeros((1,) + pr.shape))["logits"]
            return ce_loss(logits[0], labels) * scale

        loss, g = jax.value_and_grad(loss_fn)(prompt)
        loss = loss * (1.0 / scale)
        updates, adam = tx.update(g, _adam_state(step, m, v), prompt)
        return {"loss": loss, "prompt": optax.apply_updates(prompt, updates), "m": adam.mu, "v": adam.nu}

    pt.__name__ = f"pt_step{step}"
    return pt


# ------------------------------------------------------------------------------- data owner side
class RemappedTokenizer:
    """Token ids taken modulo ``n`` (the vocabulary cut to its first ``n`` rows). Shapes, and
    therefore costs, are those of real text; the remapped ids change which rows are looked up."""

    def __init__(self, tok, n: int):
        self.tok, self.n = tok, n

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [i % self.n for i in self.tok(text, add_special_tokens=add_special_tokens)["input_ids"]]}

    def __getattr__(self, name):
        return getattr(self.tok, name)


def vocab_truncated(bundle, n: int):
    """The model with only the first ``n`` rows of its (tied) embedding / LM head."""
    if not n or n >= bundle.config.vocab_size:
        return bundle
    m = bundle.params["model"]
    params = {**bundle.params, "model": {**m, "embed_tokens": {"embedding": np.asarray(m["embed_tokens"]["embedding"])[:n]}}}
    if "lm_head" in bundle.params:
        params["lm_head"] = {"kernel": np.asarray(bundle.params["lm_head"]["kernel"])[:, :n]}
    return dataclasses.replace(bundle, config=dataclasses.replace(bundle.config, vocab_size=n), params=params,
                               tokenizer=RemappedTokenizer(bundle.tokenizer, n))


def sft_inputs(bundle, task, examples, n_tokens: int) -> dict:
    """One-hot tokens [E, Lt, V] and select [E, Lt] of the prompts, laid out exactly like the
    ``prefix`` scorer's text (right-padded to the same Lt), rows [R, V] and labels [E, R]."""
    from tuning.encode import pad_length, verbalizer_ids

    tok, V = bundle.tokenizer, bundle.config.vocab_size
    seqs = [list(tok(task.prompt(t), add_special_tokens=False)["input_ids"]) for t, _ in examples]
    Lt = pad_length(max(len(s) for s in seqs) + n_tokens) - n_tokens
    ids = np.zeros((len(seqs), Lt), np.int64)
    select = np.zeros((len(seqs), Lt), np.float32)
    for e, s in enumerate(seqs):
        ids[e, : len(s)] = s
        select[e, len(s) - 1] = 1.0
    words = [task.verbalizer[l] for l in task.labels]
    rows = np.zeros((len(words), V), np.float32)
    rows[np.arange(len(words)), verbalizer_ids(tok, words)] = 1.0
    return {"tokens": np.eye(V, dtype=np.float32)[ids], "select": select, "rows": rows,
            "labels": one_hot_labels(task, examples)}


def one_hot_labels(task, examples) -> np.ndarray:
    idx = {l: i for i, l in enumerate(task.labels)}
    y = np.zeros((len(examples), len(task.labels)), np.float32)
    y[np.arange(len(examples)), [idx[l] for _, l in examples]] = 1.0
    return y


# --------------------------------------------------------------------------- session drivers
def sft_setup(session, bundle, inputs: dict) -> int:
    """Share the SFT inputs, the trainable copy of the weights and zero Adam moments."""
    import jax

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
    return session.run(make_sft_program(config, step, lr, eps, scale), inputs, {"loss": "sft_loss"} | state,
                       key=f"sft_step{step}")


def pt_setup(session, bundle, prompt0: np.ndarray, labels: np.ndarray):
    session.put("pt_prompt", prompt0)
    session.put("pt_m", np.zeros_like(prompt0))
    session.put("pt_v", np.zeros_like(prompt0))
    session.put("pt_labels", labels)


def pt_run(session, config, set_name: str, step: int, lr=LR, eps=EPS, scale=LOSS_SCALE):
    """One PT step on the example set ``set_name`` shared by a ``prefix`` SecureScorer."""
    inputs = {"text": f"{set_name}_text", "select": f"{set_name}_select", "head": "head", "labels": "pt_labels",
              "prompt": "pt_prompt", "m": "pt_m", "v": "pt_v"}
    return session.run(make_pt_program(config, step, lr, eps, scale), inputs,
                       {"loss": "pt_loss", "prompt": "pt_prompt", "m": "pt_m", "v": "pt_v"}, key=f"pt_step{step}")


def _session_warmup(session):
    """One small program with every kind of op the methods use (matmul, exp, reciprocal, sqrt,
    comparison), run once before anything is measured, so that one-off protocol set-up (e.g.
    Cheetah's OT / HE keys) is not charged to whichever method happens to run first."""
    import jax.numpy as jnp

    session.put("warm_x", np.linspace(0.1, 2.0, 64, dtype=np.float32).reshape(8, 8))
    cost = session.run(lambda params, x: {"y": jnp.sqrt(x) / (1.0 + jnp.exp(-jnp.abs(x @ x))) + jnp.maximum(x, 0.5)},
                       {"x": "warm_x"}, {"y": "warm_y"}, key="session_warmup")
    session.drop("warm_x", "warm_y")
    return cost


def _peak_rss_gb() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


def _timed(fn):
    t0 = time.perf_counter()
    cost = fn()
    return cost, time.perf_counter() - t0


def _summary(cost, div: int = 1) -> dict:
    from tuning.cost import NETWORKS

    d = {"wall_s": cost.wall_s / div, "send_bytes": cost.send_bytes / div, "rounds": cost.rounds / div}
    d.update({f"est_{n}_s": cost.estimate(n) / div for n in NETWORKS})
    return d


def measure_policy(policy_name: str, args, task, log=print) -> dict:
    """Every method under one policy, in one sim session. Returns raw figures (JSON-ready)."""
    from spu_models.forward import embedding_table
    from tuning.backends import make_backend
    from tuning.encode import verbalizer_ids
    from tuning.models import load_model, with_policy
    from tuning.policy import load_policy
    from tuning.scorer import SecureScorer
    from bench.cache import text_of_tokens, truncated

    policy = load_policy(policy_name)
    full = with_policy(load_model(args.model), policy)
    bundle = vocab_truncated(truncated(full, args.layers), args.vocab)
    cfg, n, P = bundle.config, args.n_tokens, args.popsize
    examples = [(text_of_tokens(bundle.tokenizer, t, args.seq), l) for t, l in task.train[: args.examples]]
    p0_ids = list(range(100, 100 + n))
    words = [task.verbalizer[l] for l in task.labels]
    rng = np.random.default_rng(0)
    delta = rng.normal(size=(P, n, cfg.hidden_size)).astype(np.float32) * 0.02
    res = {"policy": policy.name, "protocol": policy.protocol, "layers": cfg.num_hidden_layers,
           "vocab": cfg.vocab_size, "full_vocab": full.config.vocab_size,
           "verbalizer_ids": verbalizer_ids(full.tokenizer, words), "methods": {}, "warm": {}, "compile_s": {}, "shapes": {}}
    t0 = time.perf_counter()
    session = make_backend("sim", bundle, policy)
    res["share_weights_s"] = time.perf_counter() - t0
    log(f"[{policy.name}] weights shared in {res['share_weights_s']:.1f}s "
        f"({cfg.num_hidden_layers} layers, vocab {cfg.vocab_size})")
    res["session_warmup"] = _session_warmup(session).to_json()

    def record(name, first, first_s, measured):
        """``first``: cost of the first run (``first_s``: its call time, compile included);
        ``measured``: the run after it, or None with --warmup 0 (then the first run is measured)."""
        res["compile_s"][name] = round(first_s - first.wall_s, 2)
        if measured is None:
            measured = first
        else:
            res["warm"][name] = first.to_json()
        res["methods"][name] = measured.to_json()
        log(f"[{policy.name}] {name}: first run {first.wall_s:.1f}s, measured {measured.wall_s:.1f}s, "
            f"{measured.send_bytes / 1e6:.1f} MB, {measured.rounds} rounds (compile ~{res['compile_s'][name]:.0f}s)")

    # forward-only, both placements
    for mode in ("prefix", "cached"):
        sc = SecureScorer(session, bundle, task, mode, n, p0_ids=p0_ids)
        n0 = len(session.costs)
        sc.add_examples(f"ex_{mode}", examples)
        if mode == "cached":
            setup = session.costs[n0:]
            res["prefill"] = {"wall_s": sum(c.wall_s for c in setup), "send_bytes": sum(c.send_bytes for c in setup),
                              "rounds": sum(c.rounds for c in setup),
                              "estimate_s": {k: sum(c.estimate(k) for c in setup) for k in setup[0].to_json()["estimate_s"]}}
            res["shapes"]["cached"] = {"prefix_len": session.shapes[f"ex_{mode}_mask"][1],
                                       "tokens_per_candidate": n + session.shapes["tail"][0]}
        else:
            res["shapes"]["prefix"] = {"text_len": session.shapes["ex_prefix_text"][1], "seq_len": n + session.shapes["ex_prefix_text"][1]}
        t = time.perf_counter()
        sc.score(f"ex_{mode}", delta)
        first_s = time.perf_counter() - t
        first = session.costs[-1]
        if args.warmup:
            sc.score(f"ex_{mode}", delta)
        record(f"gen_{mode}", first, first_s, session.costs[-1] if args.warmup else None)

    # PT: on the prefix scorer's shared texts, prompt initialised at P0
    pt_setup(session, bundle, np.asarray(embedding_table(cfg, bundle.params))[p0_ids], one_hot_labels(task, examples))
    hp = {"lr": args.lr, "eps": args.eps, "scale": args.loss_scale}
    first, first_s = _timed(lambda: pt_run(session, cfg, "ex_prefix", 1, **hp))
    record("pt", first, first_s, pt_run(session, cfg, "ex_prefix", 2, **hp) if args.warmup else None)
    res["pt_loss"] = float(session.open("pt_loss"))  # the check only; a real run would keep it secret

    res["peak_rss_gb"] = _peak_rss_gb()
    if policy.name in args.no_sft or "all" in args.no_sft:
        res["sft_skipped"] = adam_probe(session, bundle, log, policy.name)
        session.close()
        return res
    # SFT
    sin = sft_inputs(bundle, task, examples, n)
    res["shapes"]["sft"] = {"seq_len": sin["tokens"].shape[1], "onehot": list(sin["tokens"].shape)}
    assert sin["tokens"].shape[1] == res["shapes"]["prefix"]["text_len"], "SFT and prefix text layouts differ"
    n_leaves = sft_setup(session, bundle, sin)
    res["n_params"] = int(sum(int(np.prod(session.shapes[f"sft_p{i}"])) for i in range(n_leaves)))
    res["n_params_full_vocab"] = res["n_params"] + (res["full_vocab"] - cfg.vocab_size) * cfg.hidden_size
    first, first_s = _timed(lambda: sft_run(session, cfg, n_leaves, 1, **hp))
    if args.check:
        res["check"] = check_against_plaintext(session, bundle, policy, sin, n_leaves, hp, log)
    record("sft", first, first_s, sft_run(session, cfg, n_leaves, 2, **hp) if args.warmup else None)
    res["peak_rss_gb"] = _peak_rss_gb()
    session.close()
    del session
    gc.collect()
    return res


def adam_probe(session, bundle, log=print, tag="", n: int = 10000) -> dict:
    """When SFT is skipped: the cost of Adam's element-wise part alone (m * k / (sqrt(v) + e), the
    sqrt and the divide every weight needs) on ``n`` elements, scaled to the model's weight count.
    A lower bound on the SFT step (no forward, no backward), not a measurement of it."""
    import jax

    rng = np.random.default_rng(0)
    session.put("probe_m", rng.normal(size=n).astype(np.float32))
    session.put("probe_v", rng.random(size=n).astype(np.float32))
    cost = session.run(lambda params, m, v: {"u": 0.3 * m / (jax.numpy.sqrt(v) + 0.004)},
                       {"m": "probe_m", "v": "probe_v"}, {"u": "probe_u"}, key="adam_probe")
    session.drop("probe_m", "probe_v", "probe_u")
    n_params = sum(int(np.prod(np.shape(x))) for x in jax.tree_util.tree_leaves(bundle.params))
    out = {"probe_elements": n, "probe_wall_s": cost.wall_s, "probe_send_bytes": cost.send_bytes,
           "n_params": n_params, "lower_bound_wall_s": cost.wall_s * n_params / n,
           "lower_bound_send_bytes": cost.send_bytes * n_params / n}
    log(f"[{tag}] SFT skipped; Adam's sqrt+divide: {cost.wall_s / n * 1e6:.0f} us and "
        f"{cost.send_bytes / n:.0f} B per weight -> >= {out['lower_bound_wall_s'] / 3600:.1f} h and "
        f">= {out['lower_bound_send_bytes'] / 1e9:.0f} GB per SFT step ({n_params / 1e6:.1f}M weights)")
    return out


def check_against_plaintext(session, bundle, policy, sin, n_leaves, hp: dict, log=print) -> dict:
    """After SFT step 1 in MPC: the same step in plaintext, compared leaf by leaf (opens the new
    weights to the data owner: a check only, never part of a measured run)."""
    import jax

    from tuning.backends import make_backend

    plain = make_backend("plaintext", bundle, policy)
    sft_setup(plain, bundle, sin)
    sft_run(plain, bundle.config, n_leaves, 1, **hp)
    w0 = [np.asarray(x, np.float32) for x in jax.tree_util.tree_leaves(bundle.params)]
    dw = dstep = pstep = gmax = dg = 0.0
    num = den_a = den_b = 0.0
    for i in range(n_leaves):
        mp, pp = session.open(f"sft_p{i}"), plain.open(f"sft_p{i}")
        um, up = mp - w0[i], pp - w0[i]
        dw = max(dw, float(np.abs(mp - pp).max()))
        pstep = max(pstep, float(np.abs(up).max()))
        num, den_a, den_b = num + float((um * up).sum()), den_a + float((um * um).sum()), den_b + float((up * up).sum())
        g_m, g_p = (session.open(f"sft_m{i}") / (0.1 * hp["scale"]), plain.open(f"sft_m{i}") / (0.1 * hp["scale"]))
        gmax, dg = max(gmax, float(np.abs(g_p).max())), max(dg, float(np.abs(g_m - g_p).max()))
    out = {"loss_mpc": float(session.open("sft_loss")), "loss_plain": float(plain.open("sft_loss")),
           "max_abs_diff_new_weights": dw, "max_abs_plain_step": pstep, "max_abs_step_diff_over_lr": dw / hp["lr"],
           "cosine(update_mpc, update_plain)": num / max(np.sqrt(den_a * den_b), 1e-30),
           "max_abs_grad_plain": gmax, "max_abs_grad_diff": dg}
    log("SFT step 1, MPC vs plaintext: " + ", ".join(f"{k} {v:.3g}" for k, v in out.items()))
    plain.close()
    return out


# ------------------------------------------------------------------------------------------ main
METHOD_ROWS = [  # (key, label, what one iteration is, divide by P)
    ("sft", "SFT step", "1 Adam step, all weights, E examples", False),
    ("pt", "PT step (prefix)", "1 Adam step, prompt only, E examples", False),
    ("gen_prefix", "forward-only prefix: generation", "P candidates x E examples", False),
    ("gen_prefix", "forward-only prefix: per candidate", "generation / P", True),
    ("gen_cached", "forward-only cached: generation", "P candidates x E examples", False),
    ("gen_cached", "forward-only cached: per candidate", "generation / P", True),
]


def build_rows(results: list, P: int) -> list:
    from tuning.cost import NETWORKS

    rows = []
    for r in results:
        if "sft_skipped" in r:
            sk = r["sft_skipped"]
            rows.append({"policy": r["policy"], "method": "SFT step: NOT RUN, lower bound",
                         "one iteration": "Adam sqrt+divide only, probed, scaled to all weights",
                         "wall s": ">= " + _fmt(sk["lower_bound_wall_s"]),
                         "MB (busiest party)": ">= " + _fmt(sk["lower_bound_send_bytes"] / 1e6)})
        for key, label, what, per in METHOD_ROWS:
            if key not in r["methods"]:
                continue
            c = r["methods"][key]
            div = P if per else 1
            row = {"policy": r["policy"], "method": label, "one iteration": what,
                   "wall s": _fmt(c["wall_s"] / div), "MB (busiest party)": _fmt(c["send_bytes"] / 1e6 / div),
                   "rounds": _fmt(c["rounds"] / div)}
            row.update({f"{n} s": _fmt(c["estimate_s"][n] / div) for n in NETWORKS})
            rows.append(row)
        pf = r["prefill"]
        row = {"policy": r["policy"], "method": "cached: one-off prefill", "one iteration": "once per example set",
               "wall s": _fmt(pf["wall_s"]), "MB (busiest party)": _fmt(pf["send_bytes"] / 1e6),
               "rounds": _fmt(pf["rounds"])}
        row.update({f"{n} s": _fmt(pf["estimate_s"][n]) for n in NETWORKS})
        rows.append(row)
    return rows


def build_ratios(results: list, P: int) -> list:
    rows = []
    for r in results:
        m = r["methods"]
        if "sft_skipped" in r:
            sk, row = r["sft_skipped"], {"policy": r["policy"], "method": "SFT step (lower bound, not run)"}
            for ref in ("cached", "prefix"):
                g = m[f"gen_{ref}"]
                for unit, div in (("gen", 1), ("cand", P)):
                    row[f"time / {ref} {unit}"] = ">= " + _fmt(sk["lower_bound_wall_s"] / (g["wall_s"] / div))
                    row[f"MB / {ref} {unit}"] = ">= " + _fmt(sk["lower_bound_send_bytes"] / (g["send_bytes"] / div))
            rows.append(row)
        for key, label in (("sft", "SFT step"), ("pt", "PT step")):
            if key not in m:
                continue
            row = {"policy": r["policy"], "method": label}
            for ref in ("cached", "prefix"):
                g = m[f"gen_{ref}"]
                for unit, div in (("gen", 1), ("cand", P)):
                    row[f"time / {ref} {unit}"] = _fmt(m[key]["wall_s"] / (g["wall_s"] / div))
                    row[f"MB / {ref} {unit}"] = _fmt(m[key]["send_bytes"] / (g["send_bytes"] / div))
                    row[f"WAN-100 / {ref} {unit}"] = _fmt(m[key]["estimate_s"]["wan-100mbps"]
                                                         / (g["estimate_s"]["wan-100mbps"] / div))
            rows.append(row)
    return rows


def _fmt(x: float) -> str:
    if x == 0:
        return "0"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    if abs(x) >= 0.01:
        return f"{x:.2f}"
    return f"{x:.2g}"


def main(argv=None):
    ap = argparse.ArgumentParser(prog="secptune bench step")
    ap.add_argument("--policy", default="aby3,cheetah", help="comma list of policies")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layers", type=int, default=2, help="keep only the first N layers (0: all)")
    ap.add_argument("--seq", type=int, default=32, help="text tokens per example (real MR text, repeated)")
    ap.add_argument("--examples", type=int, default=4, help="E: examples per step / generation")
    ap.add_argument("--popsize", type=int, default=20, help="P: candidates per generation")
    ap.add_argument("--n-tokens", type=int, default=5, help="soft prompt tokens")
    ap.add_argument("--vocab", type=int, default=4096,
                    help="keep the first N embedding rows (0: full vocabulary); token ids are taken mod N")
    ap.add_argument("--lr", type=float, default=LR, help="Adam learning rate (SFT and PT)")
    ap.add_argument("--eps", type=float, default=EPS, help="Adam eps (unscaled units)")
    ap.add_argument("--loss-scale", type=float, default=LOSS_SCALE, help="loss scaling for fixed-point Adam")
    ap.add_argument("--warmup", type=int, default=1, choices=[0, 1],
                    help="1: measure the run after a warm-up run; 0: measure the first run (compile excluded)")
    ap.add_argument("--no-sft", default="", type=lambda v: [p.strip() for p in v.split(",") if p.strip()],
                    help="comma list of policies (or 'all') under which the SFT step is skipped (too slow)")
    ap.add_argument("--check", action="store_true",
                    help="compare SFT step 1 in MPC against plaintext (opens the new weights; not timed)")
    ap.add_argument("--tag", default="", type=tag_suffix, help="suffix of the output name")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--from-json", help="re-render the table, note and chart of a saved run (no measuring)")
    args = ap.parse_args(argv)

    if args.from_json:  # one saved run, or several (same configuration, e.g. one per policy) merged
        import json

        runs = [json.load(open(p)) for p in args.from_json.split(",")]
        keys = ("model", "layers", "seq", "examples", "popsize", "n_tokens", "vocab", "lr", "eps", "loss_scale")
        for r in runs[1:]:
            diff = [k for k in keys if r["args"].get(k) != runs[0]["args"].get(k)]
            if diff:
                raise SystemExit(f"cannot merge runs with different {', '.join(diff)}")
        out, tag = args.out, args.tag
        args = argparse.Namespace(**runs[0]["args"])
        args.out, args.tag = out, tag
        args.warmup = min(r["args"].get("warmup", 1) for r in runs)
        envs = [e for r in runs for e in (r.get("measured_environment") or [r["environment"]])]
        return render([x for r in runs for x in r["results"]], args, sum(r["total_wall_s"] for r in runs), envs)

    from tuning.tasks import load_task

    task = load_task("mr", max_words=None)
    policies = [p.strip() for p in args.policy.split(",") if p.strip()]
    t_start = time.perf_counter()
    results = []
    for pol in policies:
        t = time.perf_counter()
        results.append(measure_policy(pol, args, task, log=lambda s: print(s, flush=True)))
        results[-1]["policy_wall_s"] = time.perf_counter() - t
        if len(results) < len(policies):  # keep what is measured if a later policy fails (e.g. out of memory)
            render(results, argparse.Namespace(**{**vars(args), "tag": args.tag + "_partial"}),
                   time.perf_counter() - t_start)
    render(results, args, time.perf_counter() - t_start)


def render(results: list, args, total: float, environment=None):
    """Table (markdown), note, JSON and chart of measured ``results``."""
    policies = [r["policy"] for r in results]
    r0 = results[0]
    rows = build_rows(results, args.popsize)
    ratios = build_ratios(results, args.popsize)
    cols = ["policy", "method", "one iteration", "wall s", "MB (busiest party)", "rounds", "lan s",
            "wan-100mbps s", "wan-200mbps s"]
    rcols = ["policy", "method"] + [f"{q} / {ref} {u}" for ref in ("cached", "prefix") for u in ("gen", "cand")
                                    for q in ("time", "MB", "WAN-100")]
    sh = r0["shapes"]
    ids = "/".join(map(str, r0["verbalizer_ids"]))
    if r0["vocab"] >= r0["full_vocab"]:
        vocab_note = f"the full {r0['vocab']}-row vocabulary"
    else:
        vocab_note = (f"only the first {r0['vocab']} rows of the tied {r0['full_vocab']}-row embedding (token ids "
                      f"taken mod {r0['vocab']}; the verbalizer ids {ids} are "
                      + ("in range, unchanged)" if max(r0["verbalizer_ids"]) < r0["vocab"] else "remapped too)"))
        if "n_params_full_vocab" in r0 and "sft" in r0["methods"]:
            nf = r0["n_params_full_vocab"]
            ops = r0["methods"]["sft"]["ops"]
            adam_s = sum(ops.get(k, {}).get("seconds", 0.0) for k in ("pphlo.sqrt", "pphlo.divide"))
            table = r0["full_vocab"] * (nf - r0["n_params"]) // (r0["full_vocab"] - r0["vocab"])  # V x H
            share_b = {"ABY3": 48, "SEMI2K": 16, "CHEETAH": 16}.get(r0["protocol"], 16)  # all parties, per value
            vocab_note += (f". With the full table SFT would train {nf / 1e6:.1f}M weights instead of "
                           f"{r0['n_params'] / 1e6:.1f}M: 4 resident shared copies (weights, trained copy, 2 Adam "
                           f"moments) alone are ~{4 * nf * share_b / 1e9:.1f} GB under {r0['protocol']}, before the "
                           f"update's sqrt/divide temporaries over the {table / 1e6:.1f}M-element table (peak RSS of this run: "
                           f"{r0.get('peak_rss_gb', float('nan')):.1f} GB), more than this machine has free next to the "
                           f"other jobs; and Adam's sqrt + divide ran at {adam_s / r0['n_params'] * 1e6:.0f} us per "
                           f"weight here: ~{adam_s / r0['n_params'] * nf / 60:.0f} min per step for that part alone")
    sft_note = (f"{r0['n_params'] / 1e6:.2f}M weights trained by SFT" if "n_params" in r0 else "SFT not run")
    for r in results:
        if "sft_skipped" in r:
            sk = r["sft_skipped"]
            sft_note += (f". SFT not run under {r['policy']} (--no-sft): Adam's element-wise sqrt + divide alone, "
                         f"probed on {sk['probe_elements']} elements, costs {sk['probe_wall_s'] / sk['probe_elements'] * 1e6:.0f} us "
                         f"and {sk['probe_send_bytes'] / sk['probe_elements']:.0f} B per weight, i.e. at least "
                         f"{sk['lower_bound_wall_s'] / 60:.0f} min and {sk['lower_bound_send_bytes'] / 1e9:.1f} GB per "
                         f"step for its {sk['n_params'] / 1e6:.2f}M weights (a lower bound: no forward/backward)")
    if args.warmup:
        runs = ("SFT/PT: step 2 measured after step 1 (warm-up, non-zero Adam state); forward-only: generation 2 "
                "measured after generation 1.")
    else:
        runs = ("No warm-up (--warmup 0): the first run of each program is measured (SFT/PT: step 1, zero Adam "
                "state, same program and cost as any later step; forward-only: generation 1)"
                + (", after a small session warm-up program that absorbs one-off protocol set-up"
                   if "session_warmup" in r0 else "") + "; under ABY3 first and second runs "
                "agree within the machine's noise (measured with 1 layer, ~16 tokens, E 4, P 20: generation "
                "prefix 358/357 s, cached 86/82 s, PT 23/21 s, SFT 285/339 s), bytes and rounds are identical.")
    note = (f"\n{args.model}, first {r0['layers']} layers, {vocab_note}; {sft_note}. Same E = {args.examples} "
            f"real MR training examples (text repeated to ~{args.seq} tokens) in every method; n = {args.n_tokens} "
            f"soft-prompt tokens; P = {args.popsize}. Shapes: "
            + (f"SFT {sh['sft']['seq_len']} tokens per example (one-hot [E, L, V] shared; the lookup is a matmul "
               "in MPC because the table is trained); " if "sft" in sh else "")
            + f"PT and forward-only prefix {sh['prefix']['seq_len']} tokens (prompt + the same right-padded text); "
            f"forward-only cached: text prefilled once ({sh['cached']['prefix_len']} tokens), "
            f"{sh['cached']['tokens_per_candidate']} tokens per candidate. PT and forward-only share text "
            "embeddings (policy embedding: data_owner).\n\n"
            f"One iteration: SFT = one Adam step (optax.adam's update, bias correction of v after the sqrt; lr "
            f"{args.lr:g}, eps {args.eps:g}, loss scale {args.loss_scale:g} for fixed point) of all weights on the "
            "E examples (forward, CE over the verbalizer logits against secret one-hot labels, jax.grad, update; "
            "weights and moments stay secret and resident); PT = the same on the n x H soft prompt only (BBT "
            "placement: prompt then text); forward-only = one generation: P candidates scored on the E examples, "
            "only the [P, E, R] verbalizer logits opened. 'per candidate' = generation / P (amortised, rounds "
            f"included). {runs} Compilation never timed. MB and rounds (send actions) of the busiest party; "
            "LAN/WAN = wall + bytes/bandwidth + rounds x latency (tuning.cost.NETWORKS); wall times are the SPU "
            "simulator's, all parties on one 2-core machine shared with other jobs (inflated by contention; bytes "
            f"and rounds are not). "
            + (f"Measured in {len(environment)} runs (one process per policy), {total / 60:.1f} min in all.\n"
               if isinstance(environment, list) and len(environment) > 1 else f"Whole run {total / 60:.1f} min.\n"))
    table = (markdown_table(rows, cols) + "\nRatios (SFT or PT step over forward-only; gen = one generation of P, "
             "cand = per candidate):\n\n" + markdown_table(ratios, rcols) + note)
    config = {"model": args.model, "layers": r0["layers"], "vocab": r0["vocab"], "seq": args.seq,
              "examples": args.examples, "popsize": args.popsize, "n_tokens": args.n_tokens, "policy": policies,
              "lr": args.lr, "eps": args.eps, "loss_scale": args.loss_scale, "warmup": args.warmup, "shapes": sh}
    name = "step_" + "_".join(policies) + args.tag
    payload = {"config": config, "rows": rows, "ratios": ratios, "results": results, "total_wall_s": total,
               "args": vars(args)}
    if environment:  # re-rendered: keep the measuring runs' environment (date, versions)
        payload["measured_environment"] = environment
    save(name, payload, table, args.out)
    _plot(results, args.popsize, f"{args.out}/{name}.png",
          f"{args.model} ({r0['layers']} layers, vocab {r0['vocab']}), E={args.examples}, ~{args.seq} tokens, "
          f"P={args.popsize}")


def _plot(results, P, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [("SFT step", "sft", 1), ("PT step", "pt", 1), ("gen prefix", "gen_prefix", 1),
            ("gen cached", "gen_cached", 1), ("cand prefix", "gen_prefix", P), ("cand cached", "gen_cached", P)]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    width = 0.8 / len(results)
    x = np.arange(len(bars))
    for j, r in enumerate(results):
        m = r["methods"]
        get = lambda k, f, d: f(m[k]) / d if k in m else np.nan  # noqa: E731  (missing: --no-sft)
        vals = [[get(k, lambda c: c["wall_s"], d) for _, k, d in bars],
                [get(k, lambda c: c["send_bytes"] / 1e6, d) for _, k, d in bars],
                [get(k, lambda c: c["estimate_s"]["wan-100mbps"], d) for _, k, d in bars]]
        for ax, v in zip(axes, vals):
            ax.bar(x + (j - (len(results) - 1) / 2) * width, v, width, label=r["policy"], color=f"C{j}")
        if "sft_skipped" in r:  # not measured: the lower bound, hatched
            sk = r["sft_skipped"]
            for ax, v in zip(axes[:2], (sk["lower_bound_wall_s"], sk["lower_bound_send_bytes"] / 1e6)):
                ax.bar(x[0] + (j - (len(results) - 1) / 2) * width, v, width, color=f"C{j}", alpha=0.35,
                       hatch="//", label=f"{r['policy']} SFT: lower bound, not run")
    for ax, yl in zip(axes, ["wall s (sim)", "MB sent (busiest party)", "WAN 100 Mbps estimate s"]):
        ax.set_yscale("log")
        ax.set_ylabel(yl)
        ax.set_xticks(x, [b[0] for b in bars], rotation=30, ha="right", fontsize=8)
    axes[0].legend(fontsize=8)
    fig.suptitle(title + " (per iteration)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
