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


def test_the_setup_row_counts_what_earlier_processes_kept():
    from bench.job import setup_row

    kept = {"calls": 9, "seconds": 90.0, "bytes": 9e9, "rounds": 90, "estimated": 2, "unknown": 1}
    mpc = {"setup": {"seconds": 10.0, "bytes": 1e9, "rounds": 10, "kept": kept},
           "setup_job": {"seconds": 100.0, "bytes": 10e9, "rounds": 100},
           "setup_all_sessions": {"seconds": 10.0, "bytes": 1e9, "rounds": 10}}
    row = setup_row(mpc)
    assert row["GB"] == 10.0 and row["MPC s"] == 100.0 and "9 outputs kept" in row["phase"]
    assert "2 priced from the same program" in row["phase"] and "1 unrecorded" in row["phase"]
    old = {"setup": {"seconds": 10.0, "bytes": 1e9, "rounds": 10}, "setup_all_sessions": mpc["setup_all_sessions"]}
    assert setup_row(old)["GB"] == 1.0  # a run from before the ledger: every session's own set-up


def test_a_runs_projection_of_itself_at_its_own_budget_is_its_measured_total():
    """projection_check's arithmetic: set-up scales with examples, generations with rows; a run
    whose generations all cost the same projects its own total exactly, and half the examples
    and rows project half the set-up and the generations."""
    from bench.job import projection_check

    c = {"seconds": 10.0, "bytes": 1000, "rounds": 1}
    job = {"popsize": 4, "shots_per_class": 2, "generations": 3, "n_test": 4, "n_train": 4, "n_dev": 4,
           "train_batch": 0, "dev_eval": "mean",
           "mpc": {"setup": {**c, "seconds": 120.0, "bytes": 12000}, "zero_shot_eval": c, "final_eval": c,
                   "per_generation_median": {"mpc_s": 20.0, "mpc_bytes": 2000, "mpc_rounds": 5}}}
    total = {"MPC s": 120 + 10 + 10 + 60, "GB": (12000 + 1000 + 1000 + 6000) / 1e9}
    check = projection_check(job, job, total)
    assert check["ratio"] == {"seconds": 1.0, "bytes": 1.0}
    small = {**job, "shots_per_class": 1, "n_train": 2, "n_dev": 2}  # 2 + 2 + 4 examples, 5 x 2 + 2 rows
    got = projection_check(small, job, total)["projected"]
    assert got["bytes"] == int(12000 * 12 / 8 + 2000 + 2000 * 3 * (5 * 4 + 4) / (5 * 2 + 2))
