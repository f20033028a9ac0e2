"""Derivative-free search over the subspace coordinates ``z`` (plaintext, at the data owner).

One ask/tell interface with explicit, serializable state (evosax style); losses are minimized:

    es = make_strategy("cma", d=500, popsize=20, seed=0)
    state = es.init()
    for _ in range(budget):
        Z, state = es.ask(state)              # [pop, d] float32
        state = es.tell(state, Z, losses(Z))  # losses [pop] from the secure forward passes
    z, loss = es.best(state)

``state_to_dict`` gives numpy arrays only (``np.savez``-able, no pickle); ``state_from_dict`` restores
the state exactly, RNG included, so a resumed run reproduces the uninterrupted one bit for bit.
NaN losses count as +inf (worst).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import numpy as np

from ..errors import UserError


class Strategy(Protocol):
    name: str
    d: int
    popsize: int

    def init(self, key_or_seed=None) -> Any: ...
    def ask(self, state) -> tuple[np.ndarray, Any]: ...
    def tell(self, state, Z, losses) -> Any: ...
    def best(self, state) -> tuple[np.ndarray, float]: ...
    def generation(self, state) -> int: ...
    def state_to_dict(self, state) -> dict: ...
    def state_from_dict(self, d: dict) -> Any: ...


def _key_data(key) -> np.ndarray:
    import jax
    if jax.dtypes.issubdtype(getattr(key, "dtype", None), jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return np.asarray(key, np.uint32)


def _seed_of(key_or_seed, default: int) -> int:
    """A non-negative int seed, from an int or from a JAX PRNG key (its raw uint32 words)."""
    if key_or_seed is None:
        return int(default) % 2**63
    if isinstance(key_or_seed, (int, np.integer)):
        return int(key_or_seed) % 2**63
    words = _key_data(key_or_seed).ravel()
    return sum(int(w) << (32 * i) for i, w in enumerate(words)) % 2**63


def _check_tell(name, d, popsize, Z, losses):
    Z = np.asarray(Z, np.float32)
    losses = np.asarray(losses, np.float64).reshape(-1)
    if Z.shape != (popsize, d) or losses.shape != (popsize,):
        raise ValueError(f"{name}.tell: expected Z [{popsize}, {d}] and losses [{popsize}], "
                         f"got {Z.shape} and {losses.shape}")
    return Z, np.where(np.isnan(losses), np.inf, losses)


def _check_kind(d: dict, kind: str):
    got = str(np.asarray(d.get("kind", "")))
    if got != kind:
        raise UserError(f"state dict is for strategy {got!r}, not {kind!r}")


# ----------------------------------------------------------------------------------------- CMA-ES

@dataclasses.dataclass(frozen=True)
class CMAState:
    key: np.ndarray  # uint32[2] raw JAX PRNG key; split on every ask
    es: Any  # evosax.strategies.cma_es.EvoState with numpy leaves (B, D are None between tell and ask)


class CMAES:
    """CMA-ES via ``evosax.CMA_ES`` (0.1.6). The mean starts at 0 (P = P0), step size ``sigma0``;
    candidates are clipped to ``bounds`` (BBT: [-5, 5]) by evosax's ask, and tell sees the clipped
    points, so the mean stays inside the box too. The evosax state is kept with numpy leaves so the
    run and its checkpoint/resume feed identical (strongly typed) inputs to evosax's jitted code."""

    name = "cma"

    def __init__(self, d: int, popsize: int, sigma0: float = 1.0, bounds=(-5.0, 5.0), seed: int = 0):
        from evosax import CMA_ES
        _check_sizes(d, popsize)
        self.d, self.popsize, self.seed = int(d), int(popsize), int(seed)
        self.sigma0, self.bounds = float(sigma0), (float(bounds[0]), float(bounds[1]))
        self._es = CMA_ES(popsize=self.popsize, num_dims=self.d, sigma_init=self.sigma0)
        self._params = self._es.default_params.replace(
            init_min=0.0, init_max=0.0, sigma_init=self.sigma0,
            clip_min=self.bounds[0], clip_max=self.bounds[1])

    @staticmethod
    def _np(tree):
        import jax
        return jax.tree_util.tree_map(np.asarray, tree)

    def init(self, key_or_seed=None) -> CMAState:
        import jax
        if key_or_seed is None or isinstance(key_or_seed, (int, np.integer)):
            key = jax.random.PRNGKey(self.seed if key_or_seed is None else int(key_or_seed))
        else:  # a JAX key, raw uint32[2] or typed
            key = _key_data(key_or_seed)
        key, sub = jax.random.split(key)
        es = self._es.initialize(sub, self._params)
        return CMAState(key=np.asarray(key), es=self._np(es))

    def ask(self, state: CMAState) -> tuple[np.ndarray, CMAState]:
        import jax
        key, sub = jax.random.split(state.key)
        x, es = self._es.ask(sub, state.es, self._params)
        return np.asarray(x, np.float32), CMAState(key=np.asarray(key), es=self._np(es))

    def tell(self, state: CMAState, Z, losses) -> CMAState:
        Z, losses = _check_tell(self.name, self.d, self.popsize, Z, losses)
        es = self._es.tell(Z, losses.astype(np.float32), state.es, self._params)
        return dataclasses.replace(state, es=self._np(es))

    def best(self, state: CMAState) -> tuple[np.ndarray, float]:
        if int(state.es.gen_counter) == 0:
            return np.asarray(state.es.best_member, np.float32), float("inf")
        return np.asarray(state.es.best_member, np.float32), float(state.es.best_fitness)

    def mean(self, state: CMAState) -> np.ndarray:
        return np.asarray(state.es.mean, np.float32)

    def generation(self, state: CMAState) -> int:
        return int(state.es.gen_counter)

    def state_to_dict(self, state: CMAState) -> dict:
        out = {"kind": np.array(self.name), "key": np.array(state.key)}
        for f in dataclasses.fields(state.es):
            v = getattr(state.es, f.name)
            if v is not None:
                out["es." + f.name] = np.array(v)
        return out

    def state_from_dict(self, d: dict) -> CMAState:
        from evosax.strategies.cma_es import EvoState
        _check_kind(d, self.name)
        es = EvoState(**{f.name: (np.array(d["es." + f.name]) if "es." + f.name in d else None)
                         for f in dataclasses.fields(EvoState)})
        if es.mean.shape != (self.d,):
            raise UserError(f"state dict has d={es.mean.shape[0]}, strategy has d={self.d}")
        return CMAState(key=np.array(d["key"]), es=es)


# ------------------------------------------------------------------------------------------ SPSA

@dataclasses.dataclass(frozen=True)
class SPSAState:
    z: np.ndarray  # [d] float32 current iterate
    best_z: np.ndarray  # [d] float32 best candidate seen
    best_loss: float
    k: int  # generation; with the seed it fixes this generation's perturbations
    seed: int


class SPSA:
    """SPSA / MeZO-style two-point search. Generation ``k`` perturbs ``z`` along ``m = popsize/2``
    directions ``u_i`` (Rademacher or Gaussian, drawn from ``default_rng([seed, k])``, so the state
    carries no RNG): ``Z = [z + c_k u_1 .. z + c_k u_m, z - c_k u_1 .. z - c_k u_m]``; tell forms
    ``g = mean_i (L+_i - L-_i) / (2 c_k) u_i`` and steps ``z <- clip(z - a_k g, bounds)`` with
    Spall's gains ``a_k = lr / (k + 1 + A)^0.602``, ``c_k = c / (k + 1)^0.101``. Best-seen tracked."""

    name = "spsa"

    def __init__(self, d: int, popsize: int, lr: float = 0.1, c: float = 0.1, A: float = 10.0,
                 alpha: float = 0.602, gamma: float = 0.101, dist: str = "rademacher",
                 bounds=(-5.0, 5.0), seed: int = 0):
        _check_sizes(d, popsize)
        if popsize % 2:
            raise UserError(f"SPSA needs an even popsize (popsize/2 +- pairs), got {popsize}")
        if dist not in ("rademacher", "gaussian"):
            raise UserError(f"unknown dist {dist!r}; known: 'rademacher', 'gaussian'")
        self.d, self.popsize, self.seed = int(d), int(popsize), int(seed)
        self.lr, self.c, self.A, self.alpha, self.gamma, self.dist = lr, c, A, alpha, gamma, dist
        self.bounds = (float(bounds[0]), float(bounds[1]))

    def _gains(self, k: int) -> tuple[float, float]:
        return self.lr / (k + 1 + self.A) ** self.alpha, self.c / (k + 1) ** self.gamma

    def _directions(self, state: SPSAState) -> np.ndarray:
        rng = np.random.default_rng([state.seed, state.k])
        shape = (self.popsize // 2, self.d)
        if self.dist == "rademacher":
            return (2.0 * rng.integers(0, 2, shape) - 1.0).astype(np.float32)
        return rng.standard_normal(shape, dtype=np.float32)

    def init(self, key_or_seed=None) -> SPSAState:
        z = np.zeros(self.d, np.float32)
        return SPSAState(z=z, best_z=z.copy(), best_loss=float("inf"), k=0,
                         seed=_seed_of(key_or_seed, self.seed))

    def ask(self, state: SPSAState) -> tuple[np.ndarray, SPSAState]:
        cu = np.float32(self._gains(state.k)[1]) * self._directions(state)
        return np.concatenate([state.z + cu, state.z - cu]), state

    def tell(self, state: SPSAState, Z, losses) -> SPSAState:
        Z, losses = _check_tell(self.name, self.d, self.popsize, Z, losses)
        a_k, c_k = self._gains(state.k)
        m = self.popsize // 2
        diff = losses[:m] - losses[m:]
        diff = np.where(np.isfinite(diff), diff, 0.0)  # an inf/NaN pair carries no usable slope
        g = (diff / (2.0 * c_k)) @ self._directions(state).astype(np.float64) / m
        z = np.clip(state.z - a_k * g, *self.bounds).astype(np.float32)
        i = int(np.argmin(losses))
        better = losses[i] < state.best_loss
        return SPSAState(z=z, best_z=Z[i].copy() if better else state.best_z,
                         best_loss=float(losses[i]) if better else state.best_loss,
                         k=state.k + 1, seed=state.seed)

    def best(self, state: SPSAState) -> tuple[np.ndarray, float]:
        return state.best_z.copy(), float(state.best_loss)

    def mean(self, state: SPSAState) -> np.ndarray:
        return state.z.copy()

    def generation(self, state: SPSAState) -> int:
        return int(state.k)

    def state_to_dict(self, state: SPSAState) -> dict:
        return {"kind": np.array(self.name), "z": state.z.copy(), "best_z": state.best_z.copy(),
                "best_loss": np.float64(state.best_loss), "k": np.int64(state.k),
                "seed": np.uint64(state.seed)}

    def state_from_dict(self, d: dict) -> SPSAState:
        _check_kind(d, self.name)
        z = np.array(d["z"], np.float32)
        if z.shape != (self.d,):
            raise UserError(f"state dict has z of shape {z.shape}, strategy has d={self.d}")
        return SPSAState(z=z, best_z=np.array(d["best_z"], np.float32),
                         best_loss=float(d["best_loss"]), k=int(d["k"]), seed=int(d["seed"]))


# ------------------------------------------------------------------------------------- factory

STRATEGIES = {"cma": CMAES, "spsa": SPSA}


def _check_sizes(d, popsize):
    if int(d) < 1:
        raise UserError(f"d must be >= 1, got {d}")
    if int(popsize) < 2:
        raise UserError(f"popsize must be >= 2, got {popsize}")


def make_strategy(name: str, d: int, popsize: int, seed: int = 0, **kw) -> Strategy:
    """``make_strategy("cma"|"spsa", d, popsize, seed, **strategy_kwargs)``."""
    if name not in STRATEGIES:
        raise UserError(f"unknown strategy {name!r}; known: {', '.join(sorted(STRATEGIES))}")
    return STRATEGIES[name](d, popsize, seed=seed, **kw)
