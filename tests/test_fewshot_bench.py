"""bench fewshot: the table's arithmetic on hand-made rows, the gradient baselines' selection of the
earliest best dev step, and one tiny end-to-end run of its methods on the shipped sentences."""
import json
import math

import pytest

from bench import fewshot


def test_interval_is_the_t_interval_of_the_mean():
    m, h = fewshot.interval([0.7, 0.8, 0.9])
    assert m == pytest.approx(0.8) and h == pytest.approx(4.302653 * 0.1 / math.sqrt(3), rel=1e-5)
    m, h = fewshot.interval([0.5])
    assert m == 0.5 and math.isnan(h)


def test_summary_averages_only_complete_seeds_and_pairs_per_seed():
    rows = [{"task": "a", "seed": 0, "fo": 0.9, "head@P0": 0.8},
            {"task": "b", "seed": 0, "fo": 0.7, "head@P0": 0.7},
            {"task": "a", "seed": 1, "fo": 0.8, "head@P0": 0.8},
            {"task": "b", "seed": 1, "fo": 0.6, "head@P0": 0.5},
            {"task": "a", "seed": 2, "fo": 0.1, "head@P0": 0.9}]  # seed 2 lacks task b: not averaged
    s = fewshot.summarize(rows, tasks=("a", "b"))
    assert s["cells"][("a", "fo")]["n"] == 3 and s["cells"][("a", "fo")]["mean"] == pytest.approx(0.6)
    assert s["average"]["fo"]["seeds"] == [0, 1] and s["average"]["fo"]["mean"] == pytest.approx(0.75)
    d = s["paired"]["fo - head@P0"]
    assert d["per_seed"] == pytest.approx([0.05, 0.05]) and d["n"] == 2
    assert d["ci95"][0] == pytest.approx(0.05) and d["ci95"][1] == pytest.approx(0.05)  # no spread
    assert "fo - sft" not in s["paired"]  # no seed has both


def test_a_deeper_levers_rows_are_priced_at_its_depth():
    pr = {"row_by_depth": {"2": {"bytes": 10.0, "s": 1.0}, "4": {"bytes": 30.0, "s": 2.0}}}
    assert fewshot.row_price(pr, 4) == {"bytes": 30.0, "s": 2.0}  # measured
    assert fewshot.row_price(pr, 8) == pytest.approx({"bytes": 70.0, "s": 4.0})  # along the line through 2 and 4
    row = {"n_train": 2, "n_dev": 2, "fo-k8 generations": 3, "fo-k8 rows_per_generation": 5}
    pr.update(prefill={"bytes": 1.0, "s": 1.0}, row=pr["row_by_depth"]["4"])
    assert fewshot.method_costs(row, pr)["fo-k8"]["bytes"] == pytest.approx(4 * 1.0 + 15 * 70.0)


def test_adam_keeps_the_earliest_step_of_the_best_dev_accuracy():
    import jax.numpy as jnp

    devs = iter([0.5, 0.75, 0.75, 0.6])  # before any step, then after steps 1..3
    seen = []

    def dev(x):
        seen.append(float(x[0]))
        return next(devs)

    r = fewshot.adam_to_best_dev(lambda x: (jnp.sum(x ** 2), 2 * x), dev, jnp.array([1.0]), 0.1, 3,
                                 log=lambda *a: None)
    assert r["curve"] == [0.5, 0.75, 0.75, 0.6] and r["best_step"] == 1
    assert float(r["x"][0]) == pytest.approx(seen[1]) and seen[1] < 1.0  # the parameters after step 1


def test_tiny_run_writes_each_method_and_the_table(mini_home, tmp_path):
    out = tmp_path / "fs"
    fewshot.main(["run", "--model", "tiny-llama", "--tasks", "mr", "--seeds", "0,1", "--methods",
                  "fo,fo-refit,fo-d100,pt,sft", "--shots", "4", "--n-test", "8", "--depth", "1", "--budget", "2", "--pt-steps", "2",
                  "--sft-steps", "1", "--sft-micro", "3", "--save-logits", "--out", str(out)])
    for seed in (0, 1):
        row = json.loads((out / "runs" / f"mr_s{seed}.json").read_text())
        assert row["done"] == ["fo", "fo-refit", "fo-d100", "pt", "sft"]
        # --save-logits: fo's and the levers' runs keep every generation's opened logits (bench heads --curve)
        assert len(list((out / "runs" / f"mr_fo_s{seed}" / "logits").glob("gen*.npz"))) == 2
        assert json.loads((out / "runs" / f"mr_fo-refit_s{seed}" / "config.json").read_text())["save_logits"]
        refit = json.loads((out / "runs" / f"mr_fo-refit_s{seed}" / "config.json").read_text())
        assert refit["objective"] == "refit" and row["fo-refit generations"] == 2
        d100 = json.loads((out / "runs" / f"mr_fo-d100_s{seed}" / "config.json").read_text())
        assert d100["d"] == 100 and d100["objective"] == "words" and row["fo-d100 generations"] == 2
        assert row["n_test"] == 8 and len(row["pt dev curve"]) == 3 and len(row["sft dev curve"]) == 2
        for k in ("zero-shot", "head@P0", "fo", "fo words", "fo-refit", "fo-refit words", "fo-d100", "pt", "sft"):
            assert round(row[k] * 8) == pytest.approx(row[k] * 8)  # a count of the 8 test examples
    table = (out / "fewshot.md").read_text()
    assert "| mr |" in table and "| average (1 tasks) |" in table and "fo - head@P0" in table and "fo-refit - fo" in table
    assert "fo-d100 - head@P0" in table
    assert (out / "fewshot.png").stat().st_size > 1000
    # a second invocation finds every method done and only rebuilds the table
    before = (out / "runs" / "mr_s0.json").read_text()
    fewshot.main(["run", "--model", "tiny-llama", "--tasks", "mr", "--seeds", "0", "--methods", "fo,fo-refit,pt,sft",
                  "--shots", "4", "--n-test", "8", "--depth", "1", "--out", str(out)])
    assert (out / "runs" / "mr_s0.json").read_text() == before


def test_costs_charge_every_step_a_method_ran_and_its_dev_evaluations():
    unit = lambda b: {"bytes": float(b), "s": float(b) / 10}  # noqa: E731
    pr = {"prefill": unit(100), "row": unit(1), "sft_step_32": unit(3200), "pt_step_example": unit(7)}
    row = {"n_train": 32, "n_dev": 32, "generations": 25, "rows_per_generation": 52, "pt steps": 50,
           "sft steps": 12}
    c = fewshot.method_costs(row, pr)
    assert c["head@P0"]["bytes"] == 64 * 100  # one forward of train + dev
    assert c["fo"]["bytes"] == 64 * 100 + 25 * 52 * 1 and c["fo words"] == c["fo"]
    assert "fo-refit" not in c
    c2 = fewshot.method_costs({**row, "fo-refit generations": 10, "fo-refit rows_per_generation": 52}, pr)
    assert c2["fo-refit"]["bytes"] == 64 * 100 + 10 * 52 * 1
    assert c["pt"]["bytes"] == 64 * 100 + 50 * 32 * 7 + 50 * 32 * 1  # prefill, steps, dev rows per step
    assert c["sft"]["bytes"] == 12 * 3200 + 13 * 32 * 100  # full-batch steps, dev forward before and after each
    assert c["sft"]["s"] == pytest.approx(c["sft"]["bytes"] / 10)
    assert c["icl"]["bytes"] == c["zero-shot"]["bytes"] == 0.0
    assert "pt" not in fewshot.method_costs({"n_train": 32, "n_dev": 32}, pr)  # not run: not priced


def test_prices_read_the_committed_measurements():
    pr = fewshot.prices()
    assert pr["prefill"]["bytes"] > 1e9 and 0 < pr["row"]["bytes"] < pr["prefill"]["bytes"]
    assert pr["sft_step_32"]["bytes"] > 100 * pr["pt_step_example"]["bytes"] > 0
