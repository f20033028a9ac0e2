"""The low-dimensional search space of BBT (Sun et al., 2022): soft prompt ``P = P0 + A z``.

Plaintext, at the data owner. ``A`` is a fixed random projection from the ``d``-dimensional search
space to the ``n_tokens * H`` prompt embedding space; ``P0`` is the initial prompt. Only ``z`` is
searched; the secure forward pass sees the ``[pop, n_tokens, H]`` prompts built here.

    sub = make_subspace(E, n_tokens=5, d=500, seed=0)
    P = sub.prompts(Z)          # Z [pop, d] -> [pop, n_tokens, H]; z [d] -> [n_tokens, H]
    D = sub.offsets(Z)          # A z alone: what the tuning loop shares (P0 is resident)

A needs only public statistics of the embedding table (its shape and the std of its entries):
``subspace_from_stats(EmbeddingStats(V, H, std), ...)`` builds the same A without the table, so a
data owner that never holds the model owner's weights (the cluster back end) can still search.
Its P0 is then None: the compute parties embed the initial prompt's ids themselves.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from ..model_owner.models import EmbeddingStats
from ..errors import UserError

N_SPECIAL = 20  # SmolLM2 ids < 20 are special tokens (<|endoftext|>, <|im_start|>, ...)
_CHUNK_ROWS = 4096  # rows of A / of the embedding table processed at a time


@dataclasses.dataclass(frozen=True, eq=False)
class Subspace:
    A: np.ndarray  # [n_tokens*H, d] float32
    P0: np.ndarray | None  # [n_tokens, H] float32; None when built from statistics alone
    n_tokens: int
    d: int
    seed: int
    init: str  # e.g. "vocab(seed=0)" or "text"
    init_ids: tuple = ()  # token ids whose embeddings form P0
    scale: float = 0.0  # std of the entries of A
    hidden: int = 0
    shape: tuple = ()  # of one candidate's offset A z: (n_tokens, hidden), or a deep prompt's

    def offsets(self, Z) -> np.ndarray:
        """``A z`` for Z [pop, d] -> [pop, n_tokens, H], or z [d] -> [n_tokens, H] (float32)."""
        Z = np.asarray(Z, np.float32)
        if Z.shape[-1] != self.d or Z.ndim not in (1, 2):
            raise ValueError(f"expected z of shape [d] or [pop, d] with d={self.d}, got {Z.shape}")
        D = (np.atleast_2d(Z) @ self.A.T).reshape(-1, *(self.shape or (self.n_tokens, self.hidden)))
        return D[0] if Z.ndim == 1 else D

    def prompts(self, Z) -> np.ndarray:
        """``P0 + A z``, shaped as :meth:`offsets` (needs P0: a subspace made from the table)."""
        if self.P0 is None:
            raise UserError("this subspace was built from embedding statistics and holds no P0; "
                             "use offsets(Z) (= prompts(Z) - P0), which the parties add to their P0")
        return self.P0 + self.offsets(Z)


def make_subspace(embedding_table: np.ndarray, n_tokens: int = 5, d: int = 500, seed: int = 0,
                  init: str = "vocab", init_ids=None, alpha: float = 1.0,
                  dist: str = "normal") -> Subspace:
    """Build the BBT subspace for an embedding table ``E`` [V, H]: :func:`subspace_from_stats` of
    the table's statistics, plus ``P0`` (the initial prompt's rows of ``E``) in plaintext."""
    E = embedding_table
    sub = subspace_from_stats(EmbeddingStats.of(E), n_tokens, d, seed, init, init_ids, alpha, dist)
    P0 = np.asarray(E[np.asarray(sub.init_ids)], np.float32).reshape(n_tokens, sub.hidden)
    return dataclasses.replace(sub, P0=P0)


def subspace_from_stats(stats: EmbeddingStats, n_tokens: int = 5, d: int = 500, seed: int = 0,
                        init: str = "vocab", init_ids=None, alpha: float = 1.0,
                        dist: str = "normal", shape: tuple | None = None) -> Subspace:
    """Build the BBT subspace from the embedding table's statistics (no P0).

    ``shape``: a deep prompt's offset shape (``scorer.delta_shape``). Its A has unit scale
    (``alpha / sqrt(d)``, the embedding std plays no part): the secure program multiplies the
    offsets by a per-channel scale it measures itself.

    Projection (fixed, never trained), with ``s = std(E)`` over all entries of the table:

    * ``dist="normal"`` (BBT): ``A_ij ~ N(0, (alpha * s)^2 / d)``. Then for ``z ~ N(0, I_d)`` each
      entry of ``A z`` has std ``alpha * s``: a CMA-ES step of sigma=1 moves the prompt on the scale
      of the word embeddings. (BBT divides by the CMA-ES sigma as well; with ``sigma0=1`` that is
      the same.) ``P0 + A z`` then has entry std ``sqrt(std(P0)^2 + (alpha s)^2)``, i.e.
      ``sqrt(2) * s`` for ``alpha=1`` and a P0 of typical embeddings.
    * ``dist="he"``: ``A_ij ~ N(0, 2 / d) * alpha * s`` (He-style; ``A z`` has std ``sqrt(2) alpha s``).

    P0's ids: ``init="vocab"`` -> ``n_tokens`` distinct vocabulary tokens drawn with the seed from
    ids >= 20 (SmolLM2 specials excluded); ``init="text"`` -> ``init_ids`` (the token ids of a
    text prompt; their number must equal ``n_tokens``).

    Deterministic for a seed: A comes from ``np.random.default_rng(seed)`` (float32, generated in
    row chunks), the vocabulary ids from ``default_rng([seed, 1])``, so A does not depend on ``init``.
    """
    V, H = stats.vocab_size, stats.hidden
    if n_tokens < 1 or d < 1:
        raise UserError(f"n_tokens and d must be >= 1, got n_tokens={n_tokens}, d={d}")
    if dist not in ("normal", "he"):
        raise UserError(f"unknown dist {dist!r}; known: 'normal', 'he'")

    if init == "vocab":
        if V - N_SPECIAL < n_tokens:
            raise UserError(f"vocabulary of {V} has fewer than {n_tokens} non-special tokens")
        ids = N_SPECIAL + np.random.default_rng([seed, 1]).choice(V - N_SPECIAL, n_tokens, replace=False)
        desc = f"vocab(seed={seed})"
    elif init == "text":
        if init_ids is None:
            raise UserError("init='text' needs init_ids (the token ids of the text prompt)")
        ids = np.asarray(init_ids, np.int64).reshape(-1)
        if len(ids) != n_tokens:
            raise UserError(f"init='text': {len(ids)} init_ids but n_tokens={n_tokens}; they must match")
        if ids.min() < 0 or ids.max() >= V:
            raise UserError(f"init_ids out of range [0, {V})")
        desc = "text"
    else:
        raise UserError(f"unknown init {init!r}; known: 'vocab', 'text'")

    unit = shape is not None and tuple(shape) != (n_tokens, H)
    scale = alpha * (1.0 if unit else stats.std) * (np.sqrt(1.0 / d) if dist == "normal" else np.sqrt(2.0 / d))
    shape = tuple(shape) if shape is not None else (n_tokens, H)
    rng = np.random.default_rng(seed)
    A = np.empty((int(np.prod(shape)), d), np.float32)
    for i in range(0, A.shape[0], _CHUNK_ROWS):
        block = A[i:i + _CHUNK_ROWS]
        rng.standard_normal(block.shape, dtype=np.float32, out=block)
        block *= np.float32(scale)
    return Subspace(A=A, P0=None, n_tokens=n_tokens, d=d, seed=seed, init=desc,
                    init_ids=tuple(int(i) for i in ids), scale=float(scale), hidden=H, shape=shape)
