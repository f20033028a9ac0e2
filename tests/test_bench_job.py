"""bench job's per-example agreement of two runs' kept test predictions, on hand-made files."""
import numpy as np

from bench.job import agreement


def _run(root, name, predictions, labels=(0, 1, 1, 0)):
    (root / name / "logits").mkdir(parents=True)
    np.savez(root / name / "logits" / "test_tuned.npz", labels=np.array(labels), predictions=np.array(predictions),
             logits=np.zeros((len(labels), 2)))
    return root / name


def test_agreement_counts_equal_predictions_and_names_the_others(tmp_path):
    a, b = _run(tmp_path, "spu", [0, 1, 0, 0]), _run(tmp_path, "plain", [0, 1, 1, 0])
    assert agreement(a, b) == {"equal": 3, "n": 4, "fraction": 0.75, "differ_at": [2]}


def test_no_agreement_without_both_runs_predictions_on_the_same_examples(tmp_path):
    a = _run(tmp_path, "spu", [0, 1, 0, 0])
    assert agreement(a, tmp_path / "none") is None
    assert agreement(a, _run(tmp_path, "other", [0, 1, 0, 0], labels=(1, 1, 1, 0))) is None
