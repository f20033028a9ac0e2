"""The search objectives on hand-made word logits (tuning.data_owner.objective)."""
import numpy as np

from tuning.data_owner import head as fitted
from tuning.data_owner.head import out_of_fold
from tuning.data_owner.objective import frozen_head, refit_head, verbalizer
from tuning.data_owner.trainer import losses_from_logits


def _words(seed=0, E=24):
    """Two candidates' word logits [2, E, 3] (verbalizer words 0, 1; probe word 2) and labels:
    candidate 0 carries the class in the probe word only, candidate 1 carries nothing."""
    rng = np.random.default_rng(seed)
    y = np.arange(E) % 2
    base = rng.normal(0, 1, (2, E, 3))
    base[0, :, 2] += 4.0 * (2 * y - 1)  # readable by a head, invisible to the verbalizer's words 0 and 1
    return base, y


def test_refit_sees_what_only_a_head_can_read_and_the_verbalizer_cannot():
    words, y = _words()
    refit = refit_head(2, c=1.0, k=4)
    loss = losses_from_logits(refit.train(words, None, y), y)
    assert loss[0] < 0.3 < 0.6 < loss[1]  # candidate 0 is separable, 1 is noise
    verb = verbalizer(lambda w, cf: w[..., :2])
    vloss = losses_from_logits(verb.train(words, None, y), y)
    assert abs(vloss[0] - vloss[1]) < 0.5  # the verbalizer's words say nothing for either


def test_train_scores_are_out_of_fold():
    words, y = _words(1, E=16)
    X = fitted.features(words[0])
    got = out_of_fold(X, y, 2, 0.5, 4, seed=3)
    for held in fitted.folds(y, 4, 3):
        keep = np.setdiff1d(np.arange(len(y)), held)
        np.testing.assert_allclose(got[held], fitted.apply(fitted.fit(X[keep], y[keep], 2, 0.5), X[held]))
    # an example whose label contradicts its features is scored wrong out of fold (a head fitted
    # on it, with weak regularisation, would have memorised it)
    X2, y2 = X.copy(), y.copy()
    y2[0] = 1 - y2[0]
    inside = fitted.apply(fitted.fit(X2, y2, 2, 1e4), X2)[0]
    held = out_of_fold(X2, y2, 2, 1e4, 4, seed=3)[0]
    assert held[y2[0]] < inside[y2[0]]


def test_dev_scores_use_a_head_fitted_on_that_candidates_train_rows():
    words, y = _words(2)
    dev, dy = _words(3, E=10)
    got = refit_head(2, c=0.3).dev(dev, None, words, y)
    for p in range(2):
        h = fitted.fit(fitted.features(words[p]), y, 2, 0.3)
        np.testing.assert_allclose(got[p], fitted.apply(h, fitted.features(dev[p])))
    assert (got[0].argmax(-1) == dy).mean() == 1.0  # candidate 0's head reads dev too


def test_frozen_head_reads_every_candidate_with_the_p0_head():
    words, y = _words(4)
    h0 = fitted.fit(fitted.features(words[0]), y, 2, 0.3)
    obj = frozen_head(h0)
    np.testing.assert_allclose(obj.train(words, None, y), fitted.apply(h0, fitted.features(words)))
    np.testing.assert_allclose(obj.dev(words[:1], None, words[:1], y), fitted.apply(h0, fitted.features(words[:1])))
