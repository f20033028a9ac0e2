"""`bench compare`: paired per-seed differences, the t interval and its reading against the margin."""
import json

import numpy as np
import pytest

from bench.compare import main, paired

ARGS = {"task": "mr", "shots": 16, "popsize": 20, "budget": 25, "n_test": 200, "init": "text: x"}


def _table(path, tuned, zero_shot, seeds=None, **args):
    seeds = seeds if seeds is not None else range(len(tuned))
    rows = [{"task": "mr", "seed": s, "zero-shot": z, "tuned": t} for s, t, z in zip(seeds, tuned, zero_shot)]
    path.write_text(json.dumps({"rows": rows, "args": {**ARGS, **args}}))
    return str(path)


def test_paired_interval_matches_a_hand_computed_t_interval():
    a, b = np.array([0.80, 0.78, 0.82, 0.79]), np.array([0.79, 0.78, 0.80, 0.80])
    st = paired(a, b, margin=0.01)
    d = b - a
    half = 3.182446 * d.std(ddof=1) / 2  # t_{0.975, 3}
    assert st["mean_diff"] == pytest.approx(d.mean())
    assert st["ci95"] == pytest.approx([d.mean() - half, d.mean() + half], abs=1e-6)
    assert st["verdict"] == "unresolved"  # interval [-2.1, +1.1] points straddles -1


def test_verdicts_and_seeds_needed():
    a = np.array([0.80, 0.70, 0.75, 0.85, 0.78, 0.72])
    assert paired(a, a + np.array([0.001, -0.002, 0.0, 0.002, -0.001, 0.0]), 0.01)["verdict"] == "within"
    assert paired(a, a - np.array([0.10, 0.11, 0.09, 0.10, 0.12, 0.10]), 0.01)["verdict"] == "worse"
    noisy = paired(a, a + np.array([0.05, -0.06, 0.04, -0.05, 0.06, -0.04]), 0.01)
    assert noisy["verdict"] == "unresolved"
    # with sd ~5.5 points, a +-1 point interval needs ~ (1.96 * 5.5)^2 ~ 120 seeds
    assert 100 < noisy["seeds_for_margin"] < 140


def test_compare_pairs_by_seed_across_merged_tables(tmp_path):
    a1 = _table(tmp_path / "a1.json", [0.72, 0.81], [0.75, 0.745])
    a2 = _table(tmp_path / "a2.json", [0.80], [0.77], seeds=[3])
    b = _table(tmp_path / "b.json", [0.745, 0.80, 0.70, 0.79], [0.75, 0.745, 0.7, 0.76])  # seed 2: no partner
    main(["--a", f"{a1},{a2}", "--b", b, "--out", str(tmp_path / "out"), "--tag", "t"])
    res = json.loads((tmp_path / "out" / "compare_mr_t.json").read_text())
    assert [r["seed"] for r in res["rows"]] == [0, 1, 3]
    assert res["stats"]["tuned"]["diffs"] == pytest.approx([0.025, -0.01, -0.01])
    assert (tmp_path / "out" / "compare_mr_t.png").stat().st_size > 0


def test_compare_refuses_tables_that_are_not_comparable(tmp_path):
    a = _table(tmp_path / "a.json", [0.7, 0.8], [0.7, 0.8])
    b = _table(tmp_path / "b.json", [0.7, 0.8], [0.7, 0.8], budget=50)
    with pytest.raises(ValueError, match="differ in budget"):
        main(["--a", a, "--b", b, "--out", str(tmp_path)])
    dup = _table(tmp_path / "d.json", [0.7], [0.7], seeds=[1])
    with pytest.raises(ValueError, match="seed 1 is in two tables"):
        main(["--a", f"{a},{dup}", "--b", a, "--out", str(tmp_path)])
    one = _table(tmp_path / "one.json", [0.7], [0.7], seeds=[0])
    with pytest.raises(ValueError, match="needs >= 2"):
        main(["--a", a, "--b", one, "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="no accuracy table"):
        main(["--a", str(tmp_path / "missing.json"), "--b", a, "--out", str(tmp_path)])


def test_accuracy_table_keeps_the_seeds_of_earlier_invocations(tmp_path, capsys):
    from bench.tune_accuracy import merge_rows

    path = tmp_path / "accuracy_mr.json"
    args = {**ARGS, "model": "m", "backend": "plaintext", "policy": "aby3", "mode": "cached", "strategy": "cma",
            "icl_demos": 0, "tag": "_x", "seeds": "0,1,2"}
    rows = lambda seeds, acc: [{"seed": s, "tuned": acc} for s in seeds]  # noqa: E731
    assert merge_rows(path, rows([0, 1], 0.7), args) == rows([0, 1], 0.7)  # no table yet
    path.write_text(json.dumps({"rows": rows([0, 1, 2], 0.7), "args": args}))
    merged = merge_rows(path, rows([4, 2], 0.8), {**args, "seeds": "4,2"})  # seeds are not a setting
    assert [(r["seed"], r["tuned"]) for r in merged] == [(0, 0.7), (1, 0.7), (2, 0.8), (4, 0.8)]
    assert merge_rows(path, rows([3], 0.8), {**args, "budget": 50}) == rows([3], 0.8)  # other settings
    assert "other settings (budget)" in capsys.readouterr().out


def test_compare_pairs_named_columns(tmp_path):
    """--pairs reads one column of A against another of B: here a zero-shot verbalizer against the
    zero-shot of a fitted head, in the same table."""
    path = tmp_path / "h.json"
    rows = [{"task": "mr", "seed": s, "zero-shot": z, "zero-shot head": h, "tuned": t}
            for s, (z, h, t) in enumerate([(0.75, 0.80, 0.81), (0.74, 0.79, 0.80), (0.80, 0.82, 0.83)])]
    path.write_text(json.dumps({"rows": rows, "args": ARGS}))
    main(["--a", str(path), "--b", str(path), "--pairs", "zero-shot:zero-shot head", "--out", str(tmp_path / "o"),
          "--tag", "h"])
    res = json.loads((tmp_path / "o" / "compare_mr_h.json").read_text())
    assert list(res["stats"]) == ["zero-shot / zero-shot head"]
    assert res["stats"]["zero-shot / zero-shot head"]["diffs"] == pytest.approx([0.05, 0.05, 0.02])
    with pytest.raises(ValueError, match="missing"):
        main(["--a", str(path), "--b", str(path), "--pairs", "tuned:nope", "--out", str(tmp_path / "o")])
    with pytest.raises(ValueError, match="expected"):
        main(["--a", str(path), "--b", str(path), "--pairs", "tuned", "--out", str(tmp_path / "o")])


def test_compare_vary_names_the_one_setting_allowed_to_differ(tmp_path):
    a = _table(tmp_path / "a.json", [0.79, 0.80], [0.75, 0.74])
    b = _table(tmp_path / "b.json", [0.80, 0.81], [0.75, 0.74], budget=100)
    with pytest.raises(ValueError, match="budget"):
        main(["--a", a, "--b", b, "--out", str(tmp_path / "o")])
    main(["--a", a, "--b", b, "--vary", "budget", "--out", str(tmp_path / "o"), "--tag", "v"])
    assert "budget: A 25, B 100" in (tmp_path / "o" / "compare_mr_v.md").read_text()
