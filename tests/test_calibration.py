"""Calibration and multi-word verbalizers at the data owner: the arithmetic on hand-made logits, and
the content-free rows travelling to the parties as shares like every other example."""
import pickle

import numpy as np
import pytest

from tuning.data_owner.tasks import parse_verbalizer
from tuning.data_owner.scorer import CONTENT_FREE, calibrated, combine_words


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_words_combine_per_class():
    words = np.array([[[1.0, 3.0, 0.5], [0.0, 0.0, 2.0]]])  # [P=1, E=2, W=3]: class 0 has words 0 and 1
    groups = np.array([0, 0, 1])
    lse = combine_words(words, groups, "lse")
    np.testing.assert_allclose(lse[0, 0], [np.log(np.e + np.e ** 3), 0.5])
    np.testing.assert_allclose(lse[0, 1], [np.log(2.0), 2.0])
    np.testing.assert_allclose(combine_words(words, groups, "mean")[0], [[2.0, 0.5], [0.0, 2.0]])
    one = combine_words(words[..., [0, 2]], np.array([0, 1]), "lse")  # one word per class: unchanged
    np.testing.assert_allclose(one, words[..., [0, 2]])


def test_calibration_removes_a_constant_class_bias():
    rng = np.random.default_rng(0)
    signal = rng.normal(size=(2, 40))
    labels = (signal[0] > 0).astype(int)  # the true class follows the signal's sign
    logits = np.stack([signal, -signal], -1)[:1]  # [1, 40, 2]: class 0 when signal > 0
    logits = logits.copy()
    logits[..., 0] -= 3.0  # a prompt biased against class 0: raw argmax says class 1 almost always
    raw = (logits.argmax(-1)[0] == 1 - labels).mean()
    assert raw < 0.7
    cf = np.array([[[-3.0, 0.0]]])  # what a content-free input scores under the same prompt
    got = calibrated(logits, "cf", cf)
    np.testing.assert_allclose(got, _log_softmax(logits) - np.log(np.exp(_log_softmax(cf)).mean(1, keepdims=True)))
    assert ((got.argmax(-1)[0] == 1 - labels).mean()) == 1.0
    batch = calibrated(logits, "batch")
    p_ref = np.exp(_log_softmax(logits)).mean(1, keepdims=True)
    np.testing.assert_allclose(batch, _log_softmax(logits) - np.log(p_ref))
    assert (batch.argmax(-1)[0] == 1 - labels).mean() > raw + 0.2  # most of the bias is gone
    np.testing.assert_array_equal(calibrated(logits, "none"), logits)


def test_verbalizer_spec_with_several_words():
    v = parse_verbalizer("positive=great|good,negative= terrible|bad")
    assert v == {"positive": " great| good", "negative": " terrible| bad"}
    with pytest.raises(ValueError, match="same word"):
        parse_verbalizer("positive=great|good,negative=good")
    with pytest.raises(ValueError, match="empty word"):
        parse_verbalizer("positive=great||good,negative=bad")


def test_content_free_rows_reach_the_parties_only_as_shares(tmp_path, monkeypatch):
    """A tuning run with contextual calibration under SPU's simulator: the content-free texts are
    extra rows of every chunk, secret-shared like the examples (their embeddings never appear in
    the clear in any party's bytes), and cost exactly len(CONTENT_FREE) rows per call."""
    from leakcheck import WindowDetector, leaks
    from spu_models.forward import embedding_table
    from tuning.model_owner.models import load_model
    from tuning.transports import sim as simmod
    from tuning.data_owner.trainer import TuneConfig, tune

    rows = ["text,label"] + [f"good fun {i},positive" for i in range(8)] + [f"dull mess {i},negative" for i in range(8)]
    csv = tmp_path / "toy.csv"
    csv.write_text("\n".join(rows) + "\n")
    shared, received = [], []
    orig_set = simmod.SimBackend._put

    def _set(self, name, value):
        if not name.startswith("w"):
            shared.append((name, np.asarray(value, np.float32).copy()))
            received.extend(pickle.dumps(sh) for sh in self.io.make_shares(np.asarray(value, np.float32), self._vis))
        return orig_set(self, name, value)

    monkeypatch.setattr(simmod.SimBackend, "_put", _set)
    # embedding: data_owner, the opt-in under which the data owner holds the rows as embeddings in
    # the clear (under the default, one-hot tokens, they are shared the same way)
    import dataclasses

    from tuning.policy import dump_policy, load_policy

    policy = dump_policy(dataclasses.replace(load_policy("aby3"), embedding="data_owner"), tmp_path / "do.yaml")
    s = tune(TuneConfig.of(model="tiny-llama", backend="sim", policy=str(policy), task=None, train=str(csv),
                           verbalizer="positive=g,negative=b", shots=2, n_test=4, popsize=4, budget=1, d=8, n_tokens=2,
                           calibrate="cf", out=str(tmp_path / "r")),
             show_progress=False, log=lambda *a: None)
    assert s["content_free_rows_per_call"] == len(CONTENT_FREE)
    texts = [v for n, v in shared if n.endswith("_text")]
    assert texts and all(v.shape[0] in (s["n_train"] + len(CONTENT_FREE), s["n_dev"] + len(CONTENT_FREE),
                                        s["n_test"] + len(CONTENT_FREE)) for v in texts)
    table = np.asarray(embedding_table(load_model("tiny-llama").config, load_model("tiny-llama").params), np.float32)
    cf_rows = [v[-len(CONTENT_FREE):] for v in texts]  # the content-free rows as the data owner shared them
    assert any(np.isin(r, table).all() for r in cf_rows)  # they are embedding rows, in the clear here
    fxp = 2.0 ** 18
    det = {"content-free rows f32": WindowDetector([r for r in cf_rows]),
           "content-free rows fxp": WindowDetector([np.trunc(r.astype(np.float64) * fxp).astype(np.int64) for r in cf_rows])}
    assert all(leaks(blob, det) == [] for blob in received)
