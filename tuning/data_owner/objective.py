"""What the search reads from the opened word logits (plaintext, at the data owner).

An :class:`Objective` turns one call's opened word logits [P, E, W] into class log-scores
[P, E, R]; the loop's loss (``trainer.losses_from_logits``) and accuracies read those scores:

    obj = refit_head(n_classes=2, c=0.1)
    train = obj.train(words, cf, labels)          # [P, E, R]: each candidate's own out-of-fold head
    dev = obj.dev(dev_words, dev_cf, words, labels)  # [P', E_dev, R]: a head fitted on its train rows

- ``verbalizer``: the class words' logits (combined, calibrated: ``SecureScorer.class_scores``);
- ``frozen_head``: the head fitted at P0, applied to every candidate;
- ``refit_head``: every candidate gets its own head, fitted on its own opened logits of the scored
  training examples; the loss is that head's k-fold held-out cross-entropy, so a prompt scores
  well when *some* head reads its logits well, not only the head that suited P0. No MPC cost: the
  logits are opened for the search anyway.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from . import head as fitted


@dataclasses.dataclass(frozen=True)
class Objective:
    name: str
    train: Callable  # (words [P, E, W], cf words or None, labels [E]) -> [P, E, R]
    dev: Callable  # (dev words [Q, F, W], cf or None, train words [Q, E, W], train labels [E]) -> [Q, F, R]


def verbalizer(class_scores: Callable) -> Objective:
    """The verbalizer's class scores (``class_scores(words, cf)``), as without a fitted head."""
    return Objective("words", lambda w, cf, y: class_scores(w, cf), lambda w, cf, tw, ty: class_scores(w, cf))


def frozen_head(head0: fitted.Head) -> Objective:
    """The head fitted at P0, read for every candidate."""
    read = lambda w, *_: fitted.apply(head0, fitted.features(w))  # noqa: E731
    return Objective("head", read, read)


def refit_head(n_classes: int, c: float, k: int = 4, seed: int = 0) -> Objective:
    """Each candidate's own head (regularisation ``c``, e.g. the one k-fold chose at P0): train
    scores out-of-fold over ``k`` stratified folds of the scored examples (the same folds for
    every candidate); dev scores from a head fitted on all of that candidate's training rows."""
    def train(words, cf, y):
        return np.stack([fitted.out_of_fold(fitted.features(w), y, n_classes, c, k, seed) for w in words])

    def dev(words, cf, train_words, train_y):
        heads = [fitted.fit(fitted.features(tw), train_y, n_classes, c) for tw in train_words]
        return np.stack([fitted.apply(h, fitted.features(w)) for h, w in zip(heads, words)])

    return Objective("refit", train, dev)
