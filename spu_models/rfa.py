"""Random feature attention (RFA; Peng et al. 2021, as SecP-Tuning uses it), shaped for MPC.

Softmax attention needs exp(q.k / sqrt(D)) for every query-key pair: L^2 exponentials per head,
each costing a multi-round protocol under MPC. RFA replaces the kernel by an inner product of
feature maps, exp(q.k') ~ phi(q).phi(k') with q' = q / D^(1/4), k' = k / D^(1/4), so that

    out_i = sum_j phi(q_i).phi(k_j) v_j / sum_j phi(q_i).phi(k_j)
          = phi(q_i) S / phi(q_i) z,     S = sum_j phi(k_j) v_j^T,   z = sum_j phi(k_j)

and the non-linear work is per token (L x features), not per pair. Two feature maps:

* ``trig`` (Rahimi-Recht): phi(x) = exp(|x|^2/2) [cos(Wx), sin(Wx)] / sqrt(m) with m frequencies
  w ~ N(0, I); E[phi(q).phi(k)] = exp(q.k), unbiased. The query's exp(|q|^2/2) is the same for
  every key and cancels in the ratio, so it is never computed; the key's factor is one exp per
  key and KV head, shared by all features and all query heads of the group (GQA).
  Accurate only for small q, k: the weights phi(q).phi(k) are signed, so the denominator can
  reach zero or go negative (floored at ``eps``) and the output explodes. At head dim 64, L=64,
  q, k ~ N(0, s^2): mean error 0.05-0.006 at s=0.3, 775 (m=8) to 68 (m=128) at s=0.6, worse above;
  SmolLM2-135M's q, k have RMS 1.2-2.8. Policies refuse it (``tuning/policy.py``); it is kept
  as a cost baseline (``bench/attention.py``).
* ``positive`` (FAVOR+, Choromanski et al.): phi(x) = exp(Wx - |x|^2/2) / sqrt(m), also unbiased,
  always positive (a denominator that cannot vanish), at one exp per feature.
* ``learned`` (Hedgehog, Zhang et al. 2024): phi(x) = softmax over features of (x W + b), with W, b
  fitted per layer and head so that linear attention imitates the pretrained softmax attention
  (``secptune convert-attention``). Not an estimate of exp(q.k): a trained kernel. W, b are the
  model owner's weights (secret-shared like the others); queries and keys have separate maps.
  Under MPC the query's softmax normaliser is a per-query factor and cancels, so a query costs
  exp only; a key costs exp plus one reciprocal (its row normaliser), per key and KV head.
  With ``window`` W (LoLCATs-style): each query's last W keys use the exact kernel
  exp(q.k / sqrt(D) - c) on a banded [T, W] layout, older keys the learned map, in one
  normalisation; the query map then keeps its scale (offset taken before the bias, so the
  bias's mean weighs the linear part against the window).

Frequencies are orthogonal random features (blocks of D orthogonal directions with chi-distributed
norms: lower variance than i.i.d.), fixed by ``seed`` and the layer index: public constants of
the compiled program, so they cost nothing under MPC.

Cost shaping for MPC (see ``bench/attention.py`` for measurements):

* every feature-map constant that cancels in the ratio is dropped (query norm factor) or turned
  into a max-subtraction (key norm factor, positive features), which keeps exponent arguments
  <= 0, the range where fixed-point exp approximations are accurate;
* ``sincos="double"``: cos/sin of t = w.x are computed without range reduction: a degree-8/9
  Taylor polynomial of a = t / 2^s (|a| <= 1 when |t| <= ``bound`` = 2^s), then s angle
  doublings (cos 2a = 1 - 2s^2, sin 2a = 2sc). Only multiplications, no comparisons;
* causal mode is *chunked* (chunk c): within a chunk a masked c x c product, across chunks the
  running state S, z (one small matmul per chunk, then a prefix sum over chunks, which is local
  on shares). The naive per-position prefix sum of outer products phi(k_j) v_j^T costs L x m x D
  secret products and loses to softmax below L ~ 512; the chunked form uses matmuls only, whose
  communication scales with their output;
* one reciprocal per query row and head, then a multiply; the denominator is floored at
  ``eps`` (a trig estimate can be <= 0).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("trig", "positive", "learned")
SINCOS = ("exact", "double")


@dataclasses.dataclass(frozen=True)
class RFAConfig:
    features: int = 32  # m: random frequencies (trig: cos and sin each, so 2m feature columns);
    #                     learned: the fitted map's width (set from the converted model)
    kind: str = "positive"
    sincos: str = "double"  # trig only: "exact" = SPU's sin/cos; "double" = Taylor + doublings
    bound: float = 32.0  # "double": accurate for |w.x| <= bound (rounded up to a power of two)
    chunk: int = 32  # causal chunk length
    seed: int = 0
    stabilizer: str = "max"  # exponent offsets: "max" (exact, comparison trees) or "mean" (local
    #                          sums, no comparisons; exponents capped at CLIP: approximate when the
    #                          spread of w.x exceeds CLIP)
    eps: float = 1e-3  # denominator floor (after the key-norm max-subtraction, the largest
    #                    key weight is 1, so a healthy denominator is O(1))
    window: int = 0  # learned only: >0 = sliding-window hybrid (LoLCATs): each query's last
    #                  ``window`` keys (itself included) get the exact kernel exp(q.k / sqrt(D)),
    #                  older keys the linear one; set from the converted checkpoint

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown RFA kind {self.kind!r}; choose from {KINDS}")
        if self.stabilizer not in ("max", "mean"):
            raise ValueError(f"unknown RFA stabilizer {self.stabilizer!r}; choose 'max' or 'mean'")
        if self.sincos not in SINCOS:
            raise ValueError(f"unknown RFA sincos {self.sincos!r}; choose from {SINCOS}")
        if self.features < 1 or self.chunk < 1 or self.bound <= 0 or self.eps <= 0:
            raise ValueError("RFA features, chunk, bound and eps must be positive")
        if self.window < 0 or (self.window and self.kind != "learned"):
            raise ValueError("an RFA window needs the learned feature map (and window >= 0)")


@functools.lru_cache(maxsize=256)
def frequencies(head_dim: int, n_heads: int, features: int, seed: int, layer: int) -> np.ndarray:
    """Orthogonal random features W [n_heads, head_dim, features] (float32, deterministic)."""
    rng = np.random.default_rng([seed, layer])
    out = np.empty((n_heads, head_dim, features), np.float32)
    for h in range(n_heads):
        blocks, left = [], features
        while left > 0:
            q, _ = np.linalg.qr(rng.standard_normal((head_dim, head_dim)))
            norms = np.sqrt(rng.chisquare(head_dim, size=head_dim))
            blocks.append((q * norms[None, :])[:, : min(left, head_dim)])
            left -= head_dim
        out[h] = np.concatenate(blocks, axis=1)
    return out


def sincos_double(t, bound: float):
    """(cos t, sin t) for |t| <= bound with multiplications only (see the module docstring).

    Degree-8/9 Taylor polynomials of a = t / 2^s with |a| <= 1, then s doublings at 2 products
    each: cos 2a = 1 - 2 sin^2 a, sin 2a = 2 sin a cos a; 10 + 2s products per element. Errors
    grow about 2x per doubling: max 2.4e-5 on |t| <= 32 in float32 (degree 6/7 would save two
    products but reach 1.5e-3)."""
    s = max(0, int(np.ceil(np.log2(bound))))
    a = t * (1.0 / 2.0 ** s)
    a2 = a * a
    c = 1.0 + a2 * (-1 / 2 + a2 * (1 / 24 + a2 * (-1 / 720 + a2 * (1 / 40320))))
    sn = a * (1.0 + a2 * (-1 / 6 + a2 * (1 / 120 + a2 * (-1 / 5040 + a2 * (1 / 362880)))))
    for _ in range(s):
        c, sn = 1.0 - 2.0 * (sn * sn), 2.0 * (sn * c)
    return c, sn


def _offset(x, mask, axes, how: str = "max"):
    """The offset subtracted before an exp: max over ``axes`` of x where mask (0/1), or (``how=
    "mean"``) the masked mean, which needs no comparisons under MPC (sums are local)."""
    if how == "mean":
        if mask is None:
            return jnp.mean(x, axis=axes, keepdims=True)
        m = jnp.broadcast_to(mask, x.shape)
        return jnp.sum(x * m, axis=axes, keepdims=True) / jnp.maximum(jnp.sum(m, axis=axes, keepdims=True), 1.0)
    big = x + (mask - 1.0) * 1.0e4 if mask is not None else x
    return jnp.max(big, axis=axes, keepdims=True)


CLIP = 12.0  # exponent cap where an offset is not this set's max (mean offsets, a prefix's offset)
SHIFT = 4.0  # under the mean stabilizer the capped exponents of the query's features, a window's
#             weights and the learned keys' map are also lowered by SHIFT. The scale cancels
#             (numerator and denominator are both linear in the query's features and the window's
#             weights; the key map is normalised), but it keeps MPC's products in range: a product
#             of secrets carries 2 x 18 fraction bits before truncation, so it must stay below
#             2^26, and exp(12) x a sum over keys of |v| did not (the converted SmolLM2's opened
#             logits were up to 1.0 off under ABY3). Lower values lose the small terms to 2^-18:
#             4 was measured best of 0 / 4 / 6 (0.006 vs 1.0 / 0.02 on that model).
#             That was at MR's 24-64 keys; a query's sums grow with its number of keys, so
#             its features and a window's weights are lowered by ln(keys / 64) more beyond 64
#             keys (``query_shift``): at 512 keys and the cap, SHIFT alone left 1.8-3% errors
#             under ABY3, 6.08 leaves 5e-4. The key map's sum is over features: SHIFT always.
SHIFT_KEYS = 64


def query_shift(n_keys: int) -> float:
    """The exponent shift of a query's features (and a window's weights) that attend to ``n_keys``
    keys (a public shape): SHIFT, plus ln(n_keys / SHIFT_KEYS) beyond SHIFT_KEYS keys."""
    return SHIFT + max(0.0, float(np.log(n_keys / SHIFT_KEYS)))


def _cexp(e, cfg, exp_fn, shift: float = SHIFT):
    """exp of a stabilised exponent: exact under the max stabilizer (every argument <= 0), else
    capped at CLIP and lowered by ``shift``."""
    if cfg.stabilizer == "max":
        return exp_fn(e)
    return exp_fn(jnp.minimum(e, CLIP) - shift)


def _floor(cfg, shift: float = SHIFT) -> float:
    """The denominator floor on the scale _cexp leaves: eps x exp(-shift) where the query's
    features (and a window's weights) are exps under the mean stabilizer."""
    return cfg.eps if cfg.stabilizer == "max" or cfg.kind == "trig" else cfg.eps * float(np.exp(-shift))


def ratio(num, den, eps: float):
    """num / max(den, eps), den broadcast over num's last axis: one reciprocal per den (not a
    division per element of num, which MPC prices like a reciprocal each), then one Newton step on
    the quotient. Without it, a den of 10^4 leaves 1/den ~26 units of a 2^-18 fixed point: 2%
    off, in every output of the row. The step costs two products per element; in float it is a
    no-op (the residual num - q * den is rounding)."""
    d = jnp.maximum(den, eps)
    r = 1.0 / d
    q = num * r
    return q + (num - q * d) * r


def _scaled(x, D):
    return x * D ** -0.25


def _project(x, W, axis: int):
    """x [..., KV, (G,) D] times the per-head constant W [KV, D, m], head by head.

    Not one batched einsum: SPU 0.9.3b0 miscomputes a dot_general whose *constant* operand has
    a batch dimension (max error ~10 on N(0, 1) inputs; secret operands are fine). Plain
    matmuls against a constant are exact, and cost the same."""
    heads = [jnp.take(x, h, axis=axis) @ jnp.asarray(W[h]) for h in range(W.shape[0])]
    return jnp.stack(heads, axis=axis)


def query_features(q, W, cfg: RFAConfig, exp_fn, shift: float = SHIFT):
    """phi(q) [..., T, KV, G, F] for q [..., T, KV, G, D] (query heads grouped by KV head), up to a
    per-query factor that cancels in the attention ratio (``shift``: see ``query_shift``)."""
    if cfg.kind == "learned":  # the softmax normaliser over features is per query: it cancels
        pq = jnp.einsum("...kgd,kgdf->...kgf", _scaled(q, q.shape[-1]), W["q_kernel"])
        if cfg.window:
            # beside a window's exact part nothing cancels: the linear part's scale against the
            # window's is learned, as the bias's mean (the offset is taken before the bias)
            return _cexp(jnp.minimum(pq - _offset(pq, None, axes=-1, how=cfg.stabilizer) + W["q_bias"], CLIP), cfg,
                         exp_fn, shift)
        tq = pq + W["q_bias"]
        return _cexp(tq - _offset(tq, None, axes=-1, how=cfg.stabilizer), cfg, exp_fn, shift)
    tq = _project(_scaled(q, q.shape[-1]), W, axis=-3)
    if cfg.kind == "trig":
        c, s = (jnp.cos(tq), jnp.sin(tq)) if cfg.sincos == "exact" else sincos_double(tq, cfg.bound)
        return jnp.concatenate([c, s], axis=-1)
    # positive: a per-row offset cancels
    return _cexp(tq - _offset(tq, None, axes=-1, how=cfg.stabilizer), cfg, exp_fn, shift)


def key_features(k, key_mask, W, cfg: RFAConfig, exp_fn, offset=None):
    """(phi(k) [..., S, KV, F], offset) for k [..., S, KV, D], key_mask [..., S] or None.

    The key-norm factor is scaled by exp(-offset), one constant per KV head (it cancels): by
    default offset = the max over these keys, so every exponent argument is <= 0. Pass another
    key set's offset (a prefix cache's) to put two key sets on one scale; exponents are then
    capped at ``CLIP``."""
    k = _scaled(k, k.shape[-1])
    if cfg.kind == "learned":  # softmax over features per key: any per-key offset cancels exactly
        tk = jnp.einsum("...kd,kdf->...kf", k, W["k_kernel"]) + W["k_bias"]
        e = tk - _offset(tk, None, axes=-1, how=cfg.stabilizer)
        ek = _cexp(e, cfg, exp_fn)  # the sum is >= exp(-SHIFT) (mean) or >= 1 (max): a max exponent is >= 0
        fk = ratio(ek, jnp.sum(ek, axis=-1, keepdims=True), float(np.exp(-SHIFT)))
        if key_mask is not None:
            fk = fk * key_mask[..., None, None].astype(k.dtype)
        return fk, None
    tk = _project(k, W, axis=-2)
    ksq = 0.5 * jnp.sum(k * k, axis=-1)  # [..., S, KV]
    km = None if key_mask is None else key_mask[..., None].astype(k.dtype)  # [..., S, 1]
    cap = offset is not None or cfg.stabilizer == "mean"  # else every exponent is <= 0 already
    clip = (lambda e: jnp.minimum(e, CLIP)) if cap else (lambda e: e)  # noqa: E731
    if cfg.kind == "trig":
        if offset is None:
            offset = _offset(ksq, km, axes=-2, how=cfg.stabilizer)  # [..., 1, KV]
        w = exp_fn(clip(ksq - offset))
        c, s = (jnp.cos(tk), jnp.sin(tk)) if cfg.sincos == "exact" else sincos_double(tk, cfg.bound)
        fk = jnp.concatenate([c, s], axis=-1) * w[..., None]
    else:
        lk = tk - ksq[..., None]
        if offset is None:
            offset = _offset(lk, None if km is None else km[..., None], axes=(-3, -1),
                                 how=cfg.stabilizer)  # [..., 1, KV, 1]
        fk = exp_fn(clip(lk - offset))
    if km is not None:
        fk = fk * km[..., None]
    return fk, offset


def _with_ones(v):
    """v [..., D] -> [..., D + 1]: the ones column accumulates the attention denominator."""
    return jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), v.dtype)], axis=-1)


def _causal_chunked(fq, fk, va, chunk: int):
    """sum_{j<=i} (fq_i . fk_j) va_j for fq [..., T, KV, G, F], fk [..., T, KV, F], va [..., T, KV, E]."""
    T = fq.shape[-4]
    c = min(chunk, T)
    n = -(-T // c)
    pad = n * c - T
    if pad:
        padw = lambda x, axis: jnp.pad(x, [(0, pad) if a == x.ndim + axis else (0, 0)  # noqa: E731
                                           for a in range(x.ndim)])
        fq, fk, va = padw(fq, -4), padw(fk, -3), padw(va, -3)
    lead = fq.shape[:-4]
    fq = fq.reshape(*lead, n, c, *fq.shape[-3:])
    fk = fk.reshape(*lead, n, c, *fk.shape[-2:])
    va = va.reshape(*lead, n, c, *va.shape[-2:])
    tril = jnp.tril(jnp.ones((c, c), fq.dtype))
    scores = jnp.einsum("...ckgf,...skf->...kgcs", fq, fk) * tril  # public mask: local
    out = jnp.einsum("...kgcs,...ske->...ckge", scores, va)
    if n > 1:  # running state across chunks: one matmul per chunk + a local prefix sum
        state = jnp.einsum("...skf,...ske->...kfe", fk, va)  # [..., n, KV, F, E]
        prev = jnp.cumsum(state, axis=-4) - state
        out = out + jnp.einsum("...ckgf,...kfe->...ckge", fq, prev)
    out = out.reshape(*lead, n * c, *out.shape[-3:])
    return out[..., :T, :, :, :]


def _shift(x, n: int, axis: int):
    """x moved ``n`` places later along ``axis``, zeros entering at the front (public indexing:
    local on shares)."""
    if n == 0:
        return x
    return jax.lax.slice_in_dim(_pad_time(x, n, 0, axis), 0, x.shape[axis], axis=axis % x.ndim)


def _pad_time(x, front: int, back: int, axis: int):
    axis %= x.ndim
    return jnp.pad(x, [(front, back) if a == axis else (0, 0) for a in range(x.ndim)])


def _window_part(qg, k, va, key_mask, cfg: RFAConfig, exp_fn, shift: float = SHIFT):
    """sum over each query's last ``cfg.window`` keys of exp(q.k / sqrt(D) - c) [v, 1], for
    qg [..., T, KV, G, D], k [..., S, KV, D], va [..., S, KV, D + 1], key_mask [..., S] or None
    (the queries are the last T of the S key positions). c is a per-query offset over the window
    (the stabilizer).

    Blocked for MPC: queries in chunks of W, each chunk against its own and the previous chunk
    of keys ([W, 2W] scores under a public band mask). A per-query banded layout would need a
    matmul batched over every position, which SPU issues as one exchange per position; blocks
    need one per chunk, at twice the exps (2W per query instead of W)."""
    T, D, w = qg.shape[-4], qg.shape[-1], cfg.window
    S = k.shape[-3]
    first = S - T  # key index of the first query
    front = (-first) % w + w  # zeros in front: queries start a chunk, which has a previous chunk
    nq = -(-T // w)
    back = nq * w - T
    km = jnp.ones(k.shape[:-2], qg.dtype) if key_mask is None else key_mask.astype(qg.dtype)
    lead = qg.shape[:-4]
    c0 = (front + first) // w  # chunk index of the first query chunk (>= 1)

    def pairs(x, axis):  # [..., S, *rest] -> [..., nq, 2w, *rest]: (previous, own) key chunks
        xp = _pad_time(x, front, back, axis)
        axis %= xp.ndim
        xc = xp.reshape(xp.shape[:axis] + (xp.shape[axis] // w, w) + xp.shape[axis + 1:])
        prev = jax.lax.slice_in_dim(xc, c0 - 1, c0 - 1 + nq, axis=axis)
        own = jax.lax.slice_in_dim(xc, c0, c0 + nq, axis=axis)
        return jnp.concatenate([prev, own], axis=axis + 1)

    qc = _pad_time(qg, 0, back, -4).reshape(*lead, nq, w, *qg.shape[-3:])  # [..., n, w, KV, G, D]
    r, j = np.arange(w)[:, None], np.arange(2 * w)[None, :]
    band = jnp.asarray(((w + r - j >= 0) & (w + r - j < w)).astype(np.float32))  # [w, 2w], public
    mb = band * pairs(km, -1)[..., :, None, None, None, :]  # [..., n, 1, 1, w, 2w]
    s = jnp.einsum("...nckgd,...nskd->...nkgcs", qc, pairs(k, -3)) * (1.0 / np.sqrt(D))
    e = (s - _offset(s, mb, axes=-1, how=cfg.stabilizer)) * mb  # masked slots: exp(0), then x 0
    p = _cexp(e, cfg, exp_fn, shift) * mb  # on the query features' scale: one normalisation
    out = jnp.einsum("...nkgcs,...nske->...nckge", p, pairs(va, -3))
    return out.reshape(*lead, nq * w, *out.shape[-3:])[..., :T, :, :, :]


def rfa_attention(q, k, v, key_mask, W, cfg: RFAConfig, exp_fn=jnp.exp, causal: bool = True, past=None):
    """Linear attention with random features. Shapes:

    q [..., T, H, D]; k, v [..., T, KV, D] (H = KV x G); key_mask [..., T] (1 = real) or None;
    ``past`` = (pk, pv, pmask) with pk, pv [E, Lp, KV, D], pmask [E, Lp], for q of shape
    [P, E, T, H, D]: every query also attends to its example's whole prefix (a prefix cache).
    ``W``: the random frequencies [KV, D, m] (trig, positive) or, for ``learned``, the fitted map
    {"q_kernel" [KV, G, D, m], "q_bias" [KV, G, m], "k_kernel" [KV, D, m], "k_bias" [KV, m]}.
    With ``cfg.window`` (learned, causal): the last ``window`` keys of each query use the exact
    kernel (a sliding window), older keys the linear one, in one normalisation. Returns [..., T, H, D].
    """
    *lead, T, H, D = q.shape
    KV = k.shape[-2]
    w = cfg.window
    if w and not causal:
        raise ValueError("a sliding-window RFA is causal only")
    qg = q.reshape(*lead, T, KV, H // KV, D)
    va = _with_ones(v)
    sh = query_shift(T + (0 if past is None else past[0].shape[1]))  # cancels in each query's ratio
    fq = query_features(qg, W, cfg, exp_fn, sh)
    if past is None:
        fk, _ = key_features(k, key_mask, W, cfg, exp_fn)
        if w:  # exact over the window; linear over keys >= w places back (keys shifted w later)
            out = _window_part(qg, k, va, key_mask, cfg, exp_fn, sh) + \
                _causal_chunked(fq, _shift(fk, w, -3), _shift(va, w, -3), cfg.chunk)
        elif causal:
            out = _causal_chunked(fq, fk, va, cfg.chunk)
        else:
            out = jnp.einsum("...tkgf,...kfe->...tkge", fq, jnp.einsum("...skf,...ske->...kfe", fk, va))
    elif w:
        # the prefix's last n <= w positions join the candidates' tokens in a local sequence (tiled
        # P times: n tokens only); older prefix keys are linear for every candidate token, as
        # one state per example
        pk, pv, pmask = past
        P, Lp = q.shape[0], pk.shape[1]
        n = min(w, Lp)
        out = 0.0
        if Lp > n:
            hfk, _ = key_features(pk[:, : Lp - n], pmask[:, : Lp - n], W, cfg, exp_fn)
            state = jnp.einsum("eskf,eskd->ekfd", hfk, _with_ones(pv[:, : Lp - n]))
            out = jnp.einsum("petkgf,ekfd->petkgd", fq, state)
        tile = lambda x: jnp.broadcast_to(x[None], (P,) + x.shape)  # noqa: E731
        tmask = pmask[:, Lp - n:]
        tfk, _ = key_features(pk[:, Lp - n:], tmask, W, cfg, exp_fn)
        new_mask = jnp.ones((P,) + k.shape[1:-2], q.dtype) if key_mask is None else key_mask
        kk = jnp.concatenate([tile(pk[:, Lp - n:]), k], axis=-3)
        vv = jnp.concatenate([tile(_with_ones(pv[:, Lp - n:])), va], axis=-3)
        mm = jnp.concatenate([tile(tmask.astype(q.dtype)), new_mask.astype(q.dtype)], axis=-1)
        fk, _ = key_features(k, key_mask, W, cfg, exp_fn)
        fkk = jnp.concatenate([tile(tfk), fk], axis=-3)
        fqq = jnp.concatenate([jnp.zeros(fq.shape[:2] + (n,) + fq.shape[3:], fq.dtype), fq], axis=-4)
        lin = _causal_chunked(fqq, _shift(fkk, w, -3), _shift(vv, w, -3), cfg.chunk)[..., n:, :, :, :]
        out = out + lin + _window_part(qg, kk, vv, mm, cfg, exp_fn, sh)
    else:
        # the prefix's state S, z is per example (never tiled P times); the new keys are put on
        # the prefix keys' scale (offset), so both sums share one cancelling constant
        pk, pv, pmask = past
        pfk, offset = key_features(pk, pmask, W, cfg, exp_fn)  # [E, Lp, KV, F], offset [E, 1, KV(, 1)]
        state = jnp.einsum("eskf,eskd->ekfd", pfk, _with_ones(pv))
        fk, _ = key_features(k, key_mask, W, cfg, exp_fn, offset=None if offset is None else offset[None])
        out = _causal_chunked(fq, fk, va, cfg.chunk) + jnp.einsum("petkgf,ekfd->petkgd", fq, state)
    num, den = out[..., :D], out[..., D:]
    out = ratio(num, den, _floor(cfg, sh))
    return out.reshape(*lead, T, H, D)


def attention_weights(q, k, key_mask, W, cfg: RFAConfig, exp_fn=jnp.exp, causal: bool = True):
    """The linear attention's weights as an explicit [..., H, T, T] matrix (plaintext: fitting and
    diagnostics; quadratic, never used under MPC). Rows sum to 1 like softmax's."""
    *lead, T, H, D = q.shape
    KV = k.shape[-2]
    qg = q.reshape(*lead, T, KV, H // KV, D)
    sh = query_shift(T)  # as rfa_attention's (it cancels, but for the floor)
    fq = query_features(qg, W, cfg, exp_fn, sh)
    fk, _ = key_features(k, key_mask, W, cfg, exp_fn)
    a = jnp.einsum("...tkgf,...skf->...kgts", fq, fk)
    if cfg.window:
        diff = jnp.arange(T)[:, None] - jnp.arange(T)[None, :]
        km = jnp.ones((T,), q.dtype) if key_mask is None else key_mask[..., None, None, None, :].astype(q.dtype)
        mb = ((diff >= 0) & (diff < cfg.window)).astype(q.dtype) * km
        s = jnp.einsum("...tkgd,...skd->...kgts", qg, k) * (1.0 / np.sqrt(D))
        e = (s - _offset(s, mb, axes=-1, how=cfg.stabilizer)) * mb
        p = _cexp(e, cfg, exp_fn, sh) * mb
        a = a * (diff >= cfg.window).astype(q.dtype) + p
    a = a.reshape(*lead, H, T, T)
    if causal:
        a = a * jnp.tril(jnp.ones((T, T), a.dtype))
    return a / jnp.maximum(jnp.sum(a, axis=-1, keepdims=True), _floor(cfg, sh))


def init_learned(head_dim: int, kv_heads: int, groups: int, features: int, seed: int = 0, layer: int = 0) -> dict:
    """A starting point for a learned map: W = the first ``features`` columns of an orthogonal
    matrix (identity-like, the Hedgehog initialisation) scaled to unit rows, b = 0."""
    rng = np.random.default_rng([seed, layer, 7])
    def eyeish(*lead):
        out = np.empty(lead + (head_dim, features), np.float32)
        for idx in np.ndindex(*lead):
            blocks, left = [], features
            while left > 0:
                q, _ = np.linalg.qr(rng.standard_normal((head_dim, head_dim)))
                blocks.append(q[:, : min(left, head_dim)])
                left -= head_dim
            out[idx] = np.concatenate(blocks, axis=1) * np.sqrt(head_dim) ** 0.5
        return out
    return {"q_kernel": eyeish(kv_heads, groups), "q_bias": np.zeros((kv_heads, groups, features), np.float32),
            "k_kernel": eyeish(kv_heads), "k_bias": np.zeros((kv_heads, features), np.float32)}


def softmax_reference(q, k, v, key_mask=None, causal: bool = True):
    """Exact softmax attention with the same shapes as :func:`rfa_attention` (plaintext tests)."""
    *lead, T, H, D = q.shape
    KV = k.shape[-2]
    rep = lambda t: jnp.repeat(t, H // KV, axis=-2)  # noqa: E731
    s = jnp.einsum("...qhd,...khd->...hqk", q, rep(k)) / jnp.sqrt(jnp.float32(D))
    m = jnp.ones((T, T), bool) if not causal else jnp.tril(jnp.ones((T, T), bool))
    if key_mask is not None:
        m = m & (key_mask[..., None, None, :] > 0)
    s = jnp.where(m, s, -jnp.inf)
    p = jnp.exp(s - s.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True)
    return jnp.einsum("...hqk,...khd->...qhd", p, rep(v))
