"""A verbalizer fitted at the data owner: a small logistic regression over opened word logits.

With ``--head fit`` the secure head opens the logits of a word *pool* (the task's verbalizer
words and its probe words, ``assets.tasks.PROBE_WORDS``) instead of one word per class. The
parties compute the same program, with a few more rows in the final [W, H] product, and open W
numbers per example instead of R. Everything below runs in plaintext, at the data owner:

    X = features(word_logits)                    # log-probabilities within the pool, [E, W]
    C = choose_c(X_trdev, y_trdev, n_classes)    # k-fold over train + dev: no dev overfit
    head = fit(X_trdev, y_trdev, n_classes, C)   # a Head: standardisation and weights
    scores = apply(head, X_test)                 # [E, R] class scores

Small pure functions over explicit state (a frozen ``Head``), numpy and scipy only.
"""
from __future__ import annotations

import dataclasses
import re
from collections import Counter

import numpy as np

C_GRID = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)


@dataclasses.dataclass(frozen=True)
class Head:
    mean: np.ndarray  # [W] feature standardisation (from the fitting examples)
    scale: np.ndarray  # [W]
    weight: np.ndarray  # [W, R]
    bias: np.ndarray  # [R]
    c: float  # inverse L2 strength it was fitted with


def to_json(head: Head) -> dict:
    """The head as JSON-able lists (a run's checkpoint keeps its P0 head this way)."""
    return {k: np.asarray(v).tolist() for k, v in dataclasses.asdict(head).items()}


def from_json(d: dict) -> Head:
    return Head(**{k: float(v) if k == "c" else np.asarray(v) for k, v in d.items()})


def features(word_logits: np.ndarray) -> np.ndarray:
    """[..., W] opened word logits -> log-probabilities renormalised over the pool (shift-free:
    a constant added to every word's logit, e.g. by the rest of the vocabulary, changes nothing)."""
    z = word_logits - word_logits.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def fit(X: np.ndarray, y: np.ndarray, n_classes: int, c: float) -> Head:
    """Multinomial logistic regression on standardised ``X`` [E, W], labels ``y`` [E]: minimises
    c * sum_e CE_e + |weight|^2 / 2 (bias unpenalised), by L-BFGS."""
    from scipy.optimize import minimize

    X = np.asarray(X, np.float64)
    y = np.asarray(y, np.int64)
    mean, scale = X.mean(0), X.std(0) + 1e-6
    Xs = (X - mean) / scale
    E, W = Xs.shape
    onehot = np.eye(n_classes)[y]

    def loss_grad(theta):
        w, b = theta[: W * n_classes].reshape(W, n_classes), theta[W * n_classes:]
        logp = _log_softmax(Xs @ w + b)
        err = np.exp(logp) - onehot  # d CE / d logits
        loss = -c * (logp * onehot).sum() + 0.5 * (w * w).sum()
        return loss, np.concatenate([(c * Xs.T @ err + w).ravel(), c * err.sum(0)])

    res = minimize(loss_grad, np.zeros(W * n_classes + n_classes), jac=True, method="L-BFGS-B",
                   options={"maxiter": 500})
    w, b = res.x[: W * n_classes].reshape(W, n_classes), res.x[W * n_classes:]
    return Head(mean, scale, w, b, float(c))


def apply(head: Head, X: np.ndarray) -> np.ndarray:
    """Class scores [..., R] (log-probabilities) for features ``X`` [..., W]."""
    return _log_softmax(((np.asarray(X, np.float64) - head.mean) / head.scale) @ head.weight + head.bias)


def folds(y: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    """Stratified fold index per example: each class's examples, shuffled, dealt round-robin."""
    rng = np.random.default_rng([seed, 11])
    fold = np.zeros(len(y), np.int64)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        fold[idx] = np.arange(len(idx)) % k
    return [np.flatnonzero(fold == f) for f in range(k)]


def out_of_fold(X: np.ndarray, y: np.ndarray, n_classes: int, c: float, k: int = 4, seed: int = 0) -> np.ndarray:
    """[E, R] log-probabilities of each example under ``fit(c)`` without its fold (``k`` stratified folds)."""
    out = np.zeros((len(y), n_classes))
    for held in folds(y, k, seed):
        keep = np.setdiff1d(np.arange(len(y)), held)
        out[held] = apply(fit(X[keep], y[keep], n_classes, c), X[held])
    return out


def cv_loss(X: np.ndarray, y: np.ndarray, n_classes: int, c: float, k: int = 4, seed: int = 0) -> float:
    """Mean held-out cross-entropy of ``fit(c)`` over ``k`` stratified folds."""
    return float(-out_of_fold(X, y, n_classes, c, k, seed)[np.arange(len(y)), y].mean())


def choose_c(X: np.ndarray, y: np.ndarray, n_classes: int, grid=C_GRID, k: int = 4, seed: int = 0) -> float:
    """The regularisation with the lowest k-fold cross-entropy over the fitting examples (train and
    dev together: no example is used to pick C and then to judge the same fit)."""
    return min(grid, key=lambda c: cv_loss(X, y, n_classes, c, k, seed))


def auto_pool(examples: list, labels: list, k: int = 30, min_docs: int = 2) -> tuple:
    """Probe words for a task without a hand-picked pool, from the labelled training texts alone
    (never dev or test): the ``k`` words whose presence differs most between one class's texts and
    the rest's (difference of the fractions of texts containing it, if not zero; words of three or
    more letters in at least ``min_docs`` texts; ties by frequency, then alphabetically), each with its leading
    space, as the verbalizer's words are given."""
    docs = [(set(re.findall(r"[a-z]{3,}", text.lower())), label) for text, label in examples]
    n = Counter(label for _, label in docs)
    df = Counter(w for words, _ in docs for w in words)
    by = {c: Counter(w for words, label in docs if label == c for w in words) for c in labels}

    def score(w):
        return max(abs(by[c][w] / max(n[c], 1) - (df[w] - by[c][w]) / max(len(docs) - n[c], 1)) for c in labels)

    ranked = sorted((w for w, d in df.items() if d >= min_docs and score(w) > 0), key=lambda w: (-score(w), -df[w], w))
    return tuple(" " + w for w in ranked[:k])
