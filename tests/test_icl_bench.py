"""`bench accuracy`'s ICL column runs under the run's policy: a converted or RFA model's ICL is its
own, not the softmax model's (the bug: ICL always ran policy aby3, i.e. softmax attention)."""
import tuning.transports as backends
from bench.tune_accuracy import prompt_accuracy
from tuning.model_owner.models import load_model
from tuning.data_owner.tasks import Task
from tuning.policy import load_policy

EXAMPLES = [("a fine film", "positive"), ("a warm, funny story", "positive"),
            ("dull and slow", "negative"), ("a tired mess", "negative")]


def test_icl_runs_the_policy_attention(monkeypatch):
    seen = []
    real = backends.make_backend

    def spy(name, bundle, policy, **kw):  # the real back end, recording what it computes with
        seen.append((bundle.execution.attention, policy.name))
        return real(name, bundle, policy, **kw)

    monkeypatch.setattr(backends, "make_backend", spy)
    bundle = load_model("tiny-llama")
    task = Task("toy", EXAMPLES, EXAMPLES, ["positive", "negative"],
                {"positive": " positive", "negative": " negative"}, "Review: {text}\nSentiment:")
    for name in ("aby3", "aby3-rfa"):
        raw, cal = prompt_accuracy(bundle, load_policy(name), task, EXAMPLES, EXAMPLES, 1, seed=0)
        assert 0.0 <= raw <= 1.0 and 0.0 <= cal <= 1.0
    assert seen == [("softmax", "aby3"), ("rfa", "aby3-rfa")]
