"""The head fitted at the data owner (--head fit) and the prompt selection (--select): the
arithmetic on hand-made logits, and a real run on the tiny model where the probe words change
nothing the parties compute for the search, and only verbalizer logits leave them."""
import argparse
import json

import numpy as np
import pytest

from tuning.data_owner import head as fitted


def _toy(n, w, informative, seed=0, noise=1.0):
    """Word logits [n, w] whose word ``informative`` carries the label (+-2), the rest pure noise."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    X = rng.normal(0, noise, (n, w))
    X[:, informative] += np.where(y == 1, 2.0, -2.0)
    return X, y


def test_features_ignore_a_shift_common_to_all_words():
    z = np.array([[1.0, 2.0, -0.5], [0.0, 3.0, 1.0]])
    np.testing.assert_allclose(fitted.features(z), fitted.features(z + 7.5))
    np.testing.assert_allclose(np.exp(fitted.features(z)).sum(-1), 1.0)


def test_fit_finds_the_informative_word_and_apply_gives_log_probabilities():
    X, y = _toy(64, 10, informative=7)
    head = fitted.fit(X, y, 2, c=1.0)
    assert int(np.argmax(np.abs(head.weight[:, 1] - head.weight[:, 0]))) == 7
    Xt, yt = _toy(200, 10, informative=7, seed=1)
    logp = fitted.apply(head, Xt)
    np.testing.assert_allclose(np.exp(logp).sum(-1), 1.0, rtol=1e-9)
    assert (logp.argmax(-1) == yt).mean() > 0.9


def test_stronger_regularisation_shrinks_the_weights():
    X, y = _toy(32, 6, informative=0)
    small, large = fitted.fit(X, y, 2, c=0.003), fitted.fit(X, y, 2, c=1.0)
    assert np.abs(small.weight).sum() < 0.5 * np.abs(large.weight).sum()


def test_folds_are_stratified_and_partition_the_examples():
    y = np.array([0] * 10 + [1] * 6)
    folds = fitted.folds(y, 4, seed=3)
    assert sorted(np.concatenate(folds).tolist()) == list(range(16))
    for f in folds:
        assert 2 <= (y[f] == 0).sum() <= 3 and 1 <= (y[f] == 1).sum() <= 2


def test_choose_c_by_cross_validation():
    """Pure noise: the k-fold loss prefers the strongest regularisation (a flat head); a clean
    signal: a weaker one."""
    rng = np.random.default_rng(0)
    noise, y = rng.normal(size=(48, 12)), np.arange(48) % 2
    assert fitted.choose_c(noise, y, 2) == min(fitted.C_GRID)
    X, y = _toy(48, 12, informative=3, noise=0.3)
    assert fitted.choose_c(X, y, 2) > min(fitted.C_GRID)
    with pytest.raises(ValueError):
        fitted.choose_c(X, y, 2, grid=())


def test_run_id_of_older_runs_unchanged_by_the_new_settings():
    from tuning.data_owner.trainer import LATER_DEFAULTS, TuneConfig, run_id

    cfg = TuneConfig.of(model="tiny-llama", seed=3)
    assert {k: getattr(cfg, k) for k in LATER_DEFAULTS} == LATER_DEFAULTS
    # an older run's config.json has none of them: it loads with the defaults, and keeps its id
    old = {k: v for k, v in cfg.flat().items() if k not in LATER_DEFAULTS}
    assert run_id(TuneConfig.of(**old)) == run_id(cfg) == run_id(old)
    assert run_id(cfg.replace(head="fit")) != run_id(cfg)


def _toy_csv(tmp_path):
    rows = ["text,label"] + [f"good fun great film {i},positive" for i in range(10)] + \
        [f"dull bad boring mess {i},negative" for i in range(10)]
    path = tmp_path / "toy.csv"
    path.write_text("\n".join(rows) + "\n")
    return str(path)


def test_fitted_head_run_keeps_the_search_and_reveals_only_verbalizer_logits(tmp_path):
    """--head fit on the tiny model under SPU's simulator: the probe words are extra head rows,
    so the search (losses, dev) is exactly the --head words run's; the summary reports both
    classifiers and the zero-shot head; the only values opened are verbalizer logits."""
    from tuning.data_owner.trainer import TuneConfig, tune

    kw = dict(model="tiny-llama", backend="sim", task=None, train=_toy_csv(tmp_path),
              verbalizer="positive=g,negative=b", shots=3, n_test=6, popsize=4, budget=2, d=8,
              prompt_depth=1, prompt_form="virtual", train_batch=4, dev_eval="mean")
    quiet = dict(show_progress=False, log=lambda *a: None)
    words = tune(TuneConfig.of(**kw, out=str(tmp_path / "words")), **quiet)
    fit = tune(TuneConfig.of(**kw, head="fit", probe_words="d,m,f,x", out=str(tmp_path / "fit")), **quiet)

    def losses(d):
        return [(m["loss_best"], m["loss_mean"], m["dev_loss_of_mean"]) for m in
                map(json.loads, (tmp_path / d / "metrics.jsonl").read_text().splitlines())]

    np.testing.assert_allclose(losses("fit"), losses("words"), atol=2e-3)  # SPU noise only
    assert words["fitted_head"] is None and words["tuned_words_test_acc"] == words["tuned_test_acc"]
    h = fit["fitted_head"]
    assert h["words"] == 2 + h["probe_words"] and h["probe_words"] >= 2
    assert h["extra_rows_final"] == fit["n_train"] + fit["n_dev"]
    assert 0 <= h["zero_shot_head_test_acc"] <= 1 and h["c"] in fitted.C_GRID
    assert abs(fit["tuned_words_test_acc"] - words["tuned_test_acc"]) <= 1 / fit["n_test"] + 1e-9
    saved = np.load(tmp_path / "fit" / "head.npz")
    assert saved["weight"].shape == (h["words"], 2)
    assert {r["what"] for r in fit["reveals"]} == {"verbalizer_logits"}
    assert all(r["shape"][-1] == h["words"] for r in fit["reveals"])  # W logits per row, each to the data owner


def test_bad_probe_words_and_heads_are_refused_before_anything_is_written(tmp_path):
    from tuning.errors import UserError
    from tuning.data_owner.trainer import TuneConfig, tune

    with pytest.raises(UserError, match="names no word"):
        tune(TuneConfig.of(model="tiny-llama", backend="plaintext", task=None, train=_toy_csv(tmp_path),
                           head="fit", probe_words=" , ,", shots=2, n_test=4, popsize=2, budget=1, d=4,
                           out=str(tmp_path / "r")),
             show_progress=False, log=lambda *a: None)
    assert not (tmp_path / "r").exists()
    with pytest.raises(UserError, match="--head"):
        tune(TuneConfig.of(model="tiny-llama", backend="plaintext", task="mr", head="linear", out=str(tmp_path / "r")),
             show_progress=False, log=lambda *a: None)


@pytest.mark.parametrize("objective", [pytest.param("head", marks=pytest.mark.soak), "refit"])  # one resume path
def test_head_objective_resumes_exactly(tmp_path, objective):
    """--objective head / refit: the search reads the head fitted at P0 (refit: its regularisation),
    which a resumed run restores from its checkpoint (not refitted): 2 + 1 generations replay 3
    exactly, and differ from the verbalizer objective's search."""
    from tuning.errors import UserError
    from tuning.data_owner.trainer import TuneConfig, tune

    kw = dict(model="tiny-llama", backend="plaintext", task=None, train=_toy_csv(tmp_path),
              verbalizer="positive=g,negative=b", probe_words="d,m,f,x", head="fit", shots=3, n_test=6,
              popsize=4, d=8, prompt_depth=1, prompt_form="virtual")
    quiet = dict(show_progress=False, log=lambda *a: None)
    with pytest.raises(UserError, match="needs --head fit"):
        tune(TuneConfig.of(**{**kw, "head": "words"}, objective=objective, budget=1, out=str(tmp_path / "x")), **quiet)
    full = tune(TuneConfig.of(**kw, objective=objective, budget=3, out=str(tmp_path / "full")), **quiet)
    tune(TuneConfig.of(**kw, objective=objective, budget=2, out=str(tmp_path / "part")), **quiet)
    part = tune(TuneConfig.of(out=str(tmp_path / "part")), resume=True, budget=3, **quiet)
    tune(TuneConfig.of(**kw, budget=3, out=str(tmp_path / "words")), **quiet)

    def lines(d):
        return [{k: v for k, v in json.loads(ln).items() if not k.startswith("mpc")}
                for ln in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]

    assert lines("part") == lines("full") and full["objective"] == objective
    assert part["tuned_test_acc"] == full["tuned_test_acc"]
    assert [m["loss_mean"] for m in lines("words")] != [m["loss_mean"] for m in lines("full")]


def test_benches_rescore_a_head_objective_run_as_its_search_did(tmp_path):
    """`bench agreement` and `bench heads` rebuild a finished run's scorer in plaintext
    (bench.common.rescorer): for an --objective head run under SPU's simulator the opened scores
    it saved are the P0 head's, and the plaintext rescoring reads the same head from the checkpoint,
    so the two agree; `bench heads` reads the run every way."""
    from bench.agreement import main as agreement
    from bench.heads import READS, read_run
    from tuning.data_owner.trainer import TuneConfig, tune

    run = tmp_path / "run"
    tune(TuneConfig.of(model="tiny-llama", backend="sim", task=None, train=_toy_csv(tmp_path),
                       verbalizer="positive=g,negative=b", probe_words="d,m,f,x", head="fit", objective="head",
                       shots=3, n_test=6, popsize=4, budget=2, d=8, prompt_depth=1, prompt_form="virtual",
                       save_logits=True, out=str(run)), show_progress=False, log=lambda *a: None)
    agreement(["--run", str(run), "--out", str(tmp_path / "o")])
    res = json.loads((tmp_path / "o" / "agreement_run.json").read_text())
    assert res["rows"][-1]["argmax agree"] == 1.0
    # what the search saved are the head's log-probabilities (they normalise), and plaintext reads the same
    saved = np.load(run / "logits" / "gen0002.npz")["train_logits"]
    np.testing.assert_allclose(np.log(np.exp(saved).sum(-1)), 0.0, atol=1e-6)
    assert float(res["rows"][-1]["max abs logit err"]) < 0.2  # SPU's fixed point through a standardised head
    reads = read_run(run)
    assert set(reads) == set(READS) and all(0 <= v <= 1 for v in reads.values())


def test_the_generation_curve_holds_the_kept_prompt_and_the_head_at_p0(tmp_path):
    """`bench heads --curve`: the head refitted at each generation's search mean, on test. With dev
    scoring the mean only, the kept prompt is one of those means, so its reading is on the curve
    and equals the run's reported accuracy (plaintext: exactly), as the head at P0 does its own."""
    from bench.heads import curve_main, generation_curve
    from tuning.data_owner.trainer import TuneConfig, tune

    run = tmp_path / "run"
    s = tune(TuneConfig.of(model="tiny-llama", backend="plaintext", task=None, train=_toy_csv(tmp_path),
                           verbalizer="positive=g,negative=b", probe_words="d,m,f,x", head="fit", shots=3, n_test=6,
                           popsize=4, budget=3, d=8, prompt_depth=1, prompt_form="virtual", dev_eval="mean",
                           save_logits=True, out=str(run)), show_progress=False, log=lambda *a: None)
    c = generation_curve(run)
    assert len(c["curve"]) == 3 and c["ceiling"] == max(c["curve"]) and c["kept"] in c["curve"]
    assert c["kept"] == s["tuned_test_acc"] and c["head P0"] == s["fitted_head"]["zero_shot_head_test_acc"]
    # k-fold selection reads train + dev only: its pick is P0 or one generation's mean, read on the curve
    assert len(c["cv loss"]) == 4 and c["k-fold"] == ([c["head P0"]] + c["curve"])[c["k-fold generation"]]
    assert len(c["dev head loss"]) == 4 and c["dev-head"] == ([c["head P0"]] + c["curve"])[c["dev-head generation"]]
    losses = np.asarray(c["held-out losses"])  # [P0 + 3 generations, 12 train + dev examples]
    assert losses.shape == (4, 12) and np.allclose(losses.mean(1), c["cv loss"], atol=1e-4)
    assert np.isclose(c["cv gain"], c["cv loss"][0] - min(c["cv loss"][1:]), atol=1e-4) and c["cv gain se"] >= 0
    curve_main(argparse.Namespace(curve=[str(run)], tag="", out=str(tmp_path)))
    assert (tmp_path / "heads_curve.png").stat().st_size > 1000
    assert json.loads((run / "logits" / "curve.json").read_text())["curve"] == c["curve"]  # kept for the next call
    assert json.loads((tmp_path / "heads_curve.json").read_text())["summary"][0]["task"] == c["task"]


def test_kfold_selection_and_the_curve_summary_arithmetic():
    """The lowest held-out loss wins (the first on ties, P0 first of all); the summary's points are
    paired with each run's head at P0, and the average row uses only seeds with every task."""
    from bench.heads import curve_summary, lowest

    assert lowest([0.5, 0.4, 0.45]) == 1 and lowest([0.3, 0.3, 0.4]) == 0
    rows = [{"task": t, "seed": s, "head P0": 0.8, "kept": 0.8 + g, "k-fold": 0.8, "dev-head": 0.8 - g,
             "ceiling": 0.8 + 2 * g}
            for t, s, g in (("a", 0, 0.01), ("a", 1, 0.03), ("b", 0, 0.02), ("b", 1, 0.0), ("b", 2, 0.1))]
    by = {r["task"]: r for r in curve_summary(rows)}
    assert by["a"]["kept"].startswith("+2.0 [") and by["a"]["kept"].endswith("(2)")
    assert by["b"]["ceiling"].startswith("+8.0 [") and by["b"]["k-fold"].startswith("+0.0")
    assert by["a"]["dev-head"].startswith("-2.0 [")
    assert by["average (2 tasks)"]["kept"].startswith("+1.5 [") and by["average (2 tasks)"]["kept"].endswith("(2)")


def test_auto_pool_comes_from_the_training_texts_alone():
    from tuning.data_owner.head import auto_pool

    train = [("a superb and lovely film", "pos"), ("lovely acting, superb plot", "pos"), ("the film was fine", "pos"),
             ("a dull and awful film", "neg"), ("awful plot, dull acting", "neg"), ("the film was long", "neg")]
    pool = auto_pool(train, ["pos", "neg"], k=4)
    assert set(pool) == {" superb", " lovely", " dull", " awful"}  # in 2 of 3 texts of one class, none of the other
    assert " film" not in auto_pool(train, ["pos", "neg"], k=6)  # in every text: says nothing
    assert auto_pool(train, ["pos", "neg"], k=4) == pool  # deterministic
    assert all(w.startswith(" ") for w in pool)


def test_head_fit_on_a_users_task_without_a_pool_runs(tmp_path):
    """--head fit on a user's CSV (no task pool, no --probe-words): the pool comes from its k-shot
    training texts, and the run reads it through the head."""
    from tuning.data_owner.trainer import TuneConfig, tune

    s = tune(TuneConfig.of(model="tiny-llama", backend="plaintext", task=None, train=_toy_csv(tmp_path),
                           verbalizer="positive=g,negative=b", head="fit", shots=3, n_test=6, popsize=4, budget=1,
                           d=8, prompt_depth=1, prompt_form="virtual", out=str(tmp_path / "r")),
             show_progress=False, log=lambda *a: None)
    assert s["fitted_head"]["probe_words"] > 0 and s["head"] == "fit"


def test_the_curve_over_many_runs_reads_their_kept_readings(tmp_path):
    """`bench heads --curve` over runs already read (RUN/logits/curve.json, as many generations as
    the run has): nothing is re-scored, and the mean gain by generation is paired per run."""
    from bench.heads import curve_main

    runs = []
    for seed, curve in ((0, [0.80, 0.82]), (1, [0.78, 0.80])):
        run = tmp_path / f"mr_fo_s{seed}"
        (run / "logits").mkdir(parents=True)
        for g in (1, 2):
            (run / "logits" / f"gen{g:04d}.npz").write_bytes(b"")
        (run / "logits" / "curve.json").write_text(json.dumps(
            {"run": str(run), "task": "mr", "seed": seed, "head P0": 0.80, "kept": curve[1], "k-fold": 0.80,
             "k-fold generation": 0, "dev-head": 0.80, "dev-head generation": 0, "ceiling": max(curve),
             "best generation": 2, "curve": curve,
             "cv loss": [0.4, 0.41, 0.39], "held-out losses": [], "cv gain": 0.01, "cv gain se": 0.02}))
        runs.append(str(run))
    curve_main(argparse.Namespace(curve=runs, tag="_t", out=str(tmp_path)))
    got = json.loads((tmp_path / "heads_curve_t.json").read_text())
    assert np.allclose(got["mean gain by generation"], [-1.0, +1.0])
    assert got["summary"][0]["kept"].startswith("+1.0 [") and got["summary"][0]["ceiling"].startswith("+1.0 [")
