"""The forward-only tuning loop on tiny models: it learns, resumes exactly, and keeps secrets."""
import json
import signal
import subprocess
import sys

import numpy as np
import pytest

from tuning.data_owner.encode import session_batch
from tuning.data_owner.trainer import TuneConfig, accuracy, losses_from_logits, tune


@pytest.fixture(scope="module")
def toy_csv(tmp_path_factory):
    """A separable sentiment task (distinct word sets per class)."""
    rng = np.random.default_rng(0)
    pos = ["great fun", "wonderful", "loved it", "brilliant", "superb", "a joy", "excellent", "delight"]
    neg = ["terrible", "awful", "hated it", "boring", "dull mess", "a bore", "poor", "disaster"]
    rows = [(f"{pos[rng.integers(8)]} {i}", "positive") for i in range(30)] + \
           [(f"{neg[rng.integers(8)]} {i}", "negative") for i in range(30)]
    path = tmp_path_factory.mktemp("data") / "toy.csv"
    path.write_text("text,label\n" + "".join(f"{t},{l}\n" for t, l in rows))
    return path


def _cfg(csv, out, **kw):
    base = dict(model="tiny-llama", backend="plaintext", task=None, train=str(csv), verbalizer="positive=g,negative=b",
                shots=4, n_test=8, popsize=8, budget=12, d=16, n_tokens=2, sigma0=1.0, seed=0, out=str(out))
    base.update(kw)
    return TuneConfig.of(**base)


def test_losses_and_accuracy():
    logits = np.array([[[2.0, 0.0], [0.0, 3.0]], [[0.0, 1.0], [1.0, 0.0]]])
    labels = np.array([0, 1])
    ce = losses_from_logits(logits, labels, "ce")
    assert ce[0] < ce[1] and np.isclose(ce[0], np.mean([np.log1p(np.exp(-2)), np.log1p(np.exp(-3))]))
    assert losses_from_logits(logits, labels, "hinge").tolist() == [0.0, 2.0]
    assert accuracy(logits, labels).tolist() == [1.0, 0.0]


def test_loop_reduces_training_loss(toy_csv, tmp_path):
    s = tune(_cfg(toy_csv, tmp_path / "run", budget=15), show_progress=False, log=lambda *a: None)
    m = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(m) == 15
    assert min(x["loss_best"] for x in m[-5:]) < m[0]["loss_best"]  # best against best: it learned
    assert s["best_train_loss"] < m[0]["loss_mean"]
    for f in ("summary.json", "ckpt.npz", "best_z.npy", "curves.png", "config.json"):
        assert (tmp_path / "run" / f).exists()


def test_resume_after_kill_continues_exactly(toy_csv, tmp_path):
    ref = tmp_path / "ref"
    tune(_cfg(toy_csv, ref, budget=8), show_progress=False, log=lambda *a: None)
    run = tmp_path / "killed"
    argv = [sys.executable, "-m", "tuning.cli", "tune", "--model", "tiny-llama", "--backend", "plaintext",
            "--train", str(toy_csv), "--verbalizer", "positive=g,negative=b", "--shots", "4", "--n-test", "8",
            "--popsize", "8", "--budget", "8", "--d", "16", "--n-tokens", "2", "--seed", "0", "--out", str(run)]
    # SIGKILL lands at a fixed point, not wherever a poll happens to catch it (the toy run can finish
    # all 8 generations between two polls): the process kills itself as it is about to checkpoint
    # generation 3, after that generation's metrics line was written, the worst moment to die
    killer = ("import os, signal, sys\n"
              "import tuning.data_owner.trainer as t\n"
              "save, calls = t.save_checkpoint, []\n"
              "def dying(*a, **k):\n"
              "    calls.append(1)\n"
              "    if len(calls) == 4:  # call 1 is the set-up's\n"
              "        os.kill(os.getpid(), signal.SIGKILL)\n"
              "    save(*a, **k)\n"
              "t.save_checkpoint = dying\n"
              "from tuning.cli import main\n"
              "sys.exit(main(sys.argv[1:]))\n")
    proc = subprocess.run([sys.executable, "-c", killer, *argv[3:]], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    metrics = run / "metrics.jsonl"
    done = len(metrics.read_text().splitlines())
    assert done == 3, done  # the checkpoint still says generation 2: resume must drop the third line
    proc = subprocess.run([sys.executable, "-m", "tuning.cli", "tune", "--resume", str(run), "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    a = [json.loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert len(b) == 8
    for x, y in zip(a, b):  # same trajectory as the uninterrupted run
        assert x["loss_best"] == y["loss_best"] and x["loss_mean"] == y["loss_mean"]
    ra, rb = (json.loads((d / "summary.json").read_text()) for d in (ref, run))
    assert ra["tuned_test_acc"] == rb["tuned_test_acc"]
    # the audit spans both processes: the killed one's reveals (its third generation, done again
    # after the resume) stay in reveals.jsonl beside the resumed one's
    total = lambda s: sum(r["count"] for r in s["reveals"])  # noqa: E731
    lines = (run / "reveals.jsonl").read_text().splitlines()
    assert total(rb) == len(lines) > total(ra) > sum(r["count"] for r in rb["reveals_this_session"])


def test_finished_run_extends_to_a_larger_budget_exactly(toy_csv, tmp_path):
    quiet = dict(show_progress=False, log=lambda *a: None)
    tune(_cfg(toy_csv, tmp_path / "ref", budget=6), **quiet)
    short = tune(_cfg(toy_csv, tmp_path / "ext", budget=3), **quiet)
    assert short["generations"] == 3
    s = tune(TuneConfig.of(out=str(tmp_path / "ext")), resume=True, budget=6, **quiet)
    assert s["generations"] == 6
    assert json.loads((tmp_path / "ext" / "config.json").read_text())["budget"] == 6
    a, b = ([json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("ref", "ext"))
    assert [x["loss_best"] for x in a] == [y["loss_best"] for y in b]


def test_existing_run_is_not_overwritten(toy_csv, tmp_path):
    tune(_cfg(toy_csv, tmp_path / "r", budget=1), show_progress=False, log=lambda *a: None)
    with pytest.raises(ValueError, match="already holds a run"):
        tune(_cfg(toy_csv, tmp_path / "r", budget=1), show_progress=False, log=lambda *a: None)


def test_old_checkpoint_fails_with_one_line_error(tmp_path):
    from tuning.data_owner.search import make_strategy
    from tuning.data_owner.trainer import load_checkpoint

    np.savez(tmp_path / "ckpt.npz", generation=3, best_dev=0.5)  # a pre-dev-loss checkpoint
    with pytest.raises(ValueError, match="older version .*best_dev_loss"):
        load_checkpoint(tmp_path / "ckpt.npz", make_strategy("cma", 4, 4, 0))


def test_compute_parties_never_receive_labels_losses_or_z(toy_csv, tmp_path, monkeypatch):
    """Record every share the data owner makes in the SPU simulator, exactly as each party's
    runtime receives it, and every value it shares: no party's bytes hold a shared value, a label
    vector, a loss or a search vector z in the clear (fixed-point or float), and no share name
    mentions labels or losses. A control shows the detector sees a value that is sent in the clear."""
    import pickle

    from leakcheck import WindowDetector, leaks
    from spu import spu_pb2

    from tuning.transports import sim as simmod
    from tuning.data_owner.search import CMAES

    shared, received, asked, told = [], [], [], []
    orig_set, orig_ask, orig_tell = simmod.SimBackend._put, CMAES.ask, CMAES.tell

    def _set(self, name, value):  # SimBackend's own sharing, recorded per party
        if not name.startswith("w"):  # the model owner's weights are not the data owner's
            shared.append((name, np.asarray(value, np.float32).copy()))
            shares = self.io.make_shares(np.asarray(value, np.float32), self._vis)
            received.extend(pickle.dumps(sh) for sh in shares)
        return orig_set(self, name, value)

    def ask(self, st):
        Z, st = orig_ask(self, st)
        asked.append(np.asarray(Z).copy())
        return Z, st

    def tell(self, st, Z, losses):
        told.append(np.asarray(losses).copy())
        return orig_tell(self, st, Z, losses)

    monkeypatch.setattr(simmod.SimBackend, "_put", _set)
    monkeypatch.setattr(CMAES, "ask", ask)
    monkeypatch.setattr(CMAES, "tell", tell)
    summary = tune(_cfg(toy_csv, tmp_path / "p", backend="sim", budget=2, popsize=4), show_progress=False,
                   log=lambda *a: None)
    assert summary["generations"] == 2 and asked and told and received
    names = {n for n, _ in shared}
    assert not any("label" in n or "loss" in n for n in names), names
    fxp = 2.0 ** 18
    big = [v for _, v in shared if v.size >= 4 and len(np.unique(v)) >= 4]  # delta, embeddings, masks...
    zs = [z for Z in asked for z in Z]
    detectors = {
        "shared values f32": WindowDetector(big),
        "shared values fxp": WindowDetector([np.trunc(v.astype(np.float64) * fxp).astype(np.int64) for v in big]),
        "z": WindowDetector([z.astype(np.float32) for z in zs] + [z.astype(np.float64) for z in zs]),
        "losses": WindowDetector([t.astype(np.float64) for t in told] + [t.astype(np.float32) for t in told]),
    }
    for blob in received:
        assert leaks(blob, detectors) == [], "a party's share holds a secret in the clear"
    # control: the same value shared as PUBLIC (what a mistaken visibility would send) is found
    from spu import api as spu_api

    from tuning.policy import load_policy

    io = spu_api.Io(3, load_policy("aby3").runtime_config())
    clear = pickle.dumps(io.make_shares(big[0], spu_pb2.Visibility.VIS_PUBLIC)[0])
    assert "shared values fxp" in leaks(clear, detectors)


def test_reveal_is_the_policys_and_audited(toy_csv, tmp_path):
    """Only the policy's reveals leave the parties: an unlisted output and a listed one to the wrong
    recipient are refused in one line; a short run's audit holds exactly its logits reveals."""
    import dataclasses

    from tuning.model_owner.models import load_model
    from tuning.transports import make_backend
    from tuning.transports.session import RevealError
    from tuning.policy import load_policy

    pol = load_policy("aby3")
    with make_backend("plaintext", load_model("tiny-llama"), pol) as s:
        s.put("x", np.ones((2, 3), np.float32))
        with pytest.raises(RevealError, match="reveals no 'weights'") as e:
            s.reveal("x", what="weights")
        assert "\n" not in str(e.value)
        with pytest.raises(RevealError, match="only to the data_owner, not to the model_owner"):
            s.reveal("x", what="verbalizer_logits", to="model_owner")
        other = dataclasses.replace(pol, reveal={"verbalizer_logits": "model_owner"})
        s.policy = other
        with pytest.raises(RevealError, match="cannot reveal to the model_owner"):
            s.reveal("x", what="verbalizer_logits", to="model_owner")
        s.policy = pol
        # only an output its approved program opens as that kind: not the data owner's own input,
        # nor any output of a program of its own
        with pytest.raises(RevealError, match="not an output its approved program opens as 'verbalizer_logits'"):
            s.reveal("x")
        s.run(lambda params, x: {"y": x, "z": 2 * x}, {"x": "x"}, ["y", "z"], key="id")
        for v in ("y", "z"):
            with pytest.raises(RevealError, match=f"'{v}' is not an output its approved program opens"):
                s.reveal(v)
        assert s.reveals == []  # nothing left the parties
        batch = session_batch(s, ["a fine film", "dull"], [" yes", " no"])
        for k, v in batch.items():
            s.put(f"b_{k}", v)
        s.run("forward", {k: f"b_{k}" for k in batch}, {"logits": "y"})  # its approval opens the logits
        assert s.reveal("y").shape == (2, 2)
        assert [(r["what"], r["var"], r["shape"], r["to"]) for r in s.reveals] == \
            [("verbalizer_logits", "y", [2, 2], "data_owner")]
        s.put("y", np.zeros((2, 3), np.float32))  # overwritten by an input: the mark is gone
        with pytest.raises(RevealError, match="'y' is not an output its approved program opens"):
            s.reveal("y")
    from collections import Counter

    for dev_eval in ("all", "mean"):  # mean (the default): only the search mean is scored on dev
        summary = tune(_cfg(toy_csv, tmp_path / dev_eval, budget=2, popsize=4, dev_eval=dev_eval),
                       show_progress=False, log=lambda *a: None)
        P1, n_train, n_dev, n_test = 5, summary["n_train"], summary["n_dev"], summary["n_test"]
        got = Counter({(r["what"], tuple(r["shape"]), r["to"]): r["count"] for r in summary["reveals"]})
        want = Counter()
        for shape, count in (((P1, n_train, 2), 2),                                 # each generation: train,
                             ((P1 if dev_eval == "all" else 1, n_dev, 2), 2),       # then dev,
                             ((1, n_test, 2), 2)):                                  # zero-shot and tuned test
            want[("verbalizer_logits", shape, "data_owner")] += count
        assert got == want, dev_eval


def test_deep_prompt_minibatches_and_dev_mean_run_and_resume(toy_csv, tmp_path):
    """The cheap configuration end to end (virtual deep prompt in the top layer, mini-batches of
    the training set, dev scored for the search mean only, batch calibration): it learns, its
    summary says what it ran, it scores the rows it claims, and a resumed run continues exactly."""
    kw = dict(prompt_depth=1, prompt_form="virtual", train_batch=4, dev_eval="mean", calibrate="batch",
              shots=4, popsize=6)
    ref = tune(_cfg(toy_csv, tmp_path / "ref", budget=6, **kw), show_progress=False, log=lambda *a: None)
    assert (ref["prompt_depth"], ref["prompt_form"], ref["train_batch"], ref["dev_eval"], ref["calibrate"]) == \
        (1, "virtual", 4, "mean", "batch")
    assert ref["rows_per_generation"] == (6 + 1) * 4 + 1 * ref["n_dev"]
    m = [json.loads(x) for x in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    assert all(x["dev_acc_of_best_loss"] is None for x in m)  # only the mean is scored on dev
    assert min(x["loss_best"] for x in m[-3:]) < m[0]["loss_best"]
    reveals = {tuple(r["shape"]): r["count"] for r in ref["reveals"]}
    same_shape_tests = 2 if ref["n_test"] == ref["n_dev"] else 0  # zero-shot and tuned test look alike
    assert reveals[(7, 4, 2)] == 6 and reveals[(1, ref["n_dev"], 2)] == 6 + same_shape_tests  # mini-batch; dev: the mean
    short = tune(_cfg(toy_csv, tmp_path / "ext", budget=3, **kw), show_progress=False, log=lambda *a: None)
    assert short["generations"] == 3
    again = tune(TuneConfig.of(out=str(tmp_path / "ext")), resume=True, budget=6, show_progress=False,
                 log=lambda *a: None)
    a = [json.loads(x)["loss_best"] for x in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x)["loss_best"] for x in (tmp_path / "ext" / "metrics.jsonl").read_text().splitlines()]
    assert a == b and again["tuned_test_acc"] == ref["tuned_test_acc"]


def test_summary_reads_the_search_against_the_head_at_p0(capsys, tmp_path):
    """With --head fit, tune's last lines test the tuned head against the head fitted at P0 (the
    baseline the search must beat) as they test it against zero-shot."""
    from tuning.cli import _print_tune_summary

    def sig(gained, lost, p):
        return {"n": 200, "zero_shot_ci95": [0.5, 0.6], "tuned_ci95": [0.9, 0.95], "gained": gained, "lost": lost,
                "mcnemar_p": p}
    summary = {"zero_shot_test_acc": 0.6, "tuned_test_acc": 0.95, "tuned_words_test_acc": 0.9, "n_test": 200,
               "n_train": 80, "generations": 25, "backend": "plaintext", "policy": "aby3-fast",
               "mpc": {"per_generation_median": {}}, "projection": {}, "test_significance": sig(68, 3, 0.0),
               "fitted_head": {"words": 33, "probe_words": 28, "zero_shot_head_test_acc": 0.95,
                               "test_significance_vs_zero_shot_head": sig(3, 9, 0.146)}}
    _print_tune_summary(summary, False, tmp_path)
    out = capsys.readouterr().out
    assert "68 test examples right that zero-shot got wrong and 3 the other way (exact McNemar p = 0: a real gain)" in out
    assert "against the head at P0: 3 test examples gained, 9 lost (exact McNemar p = 0.146: not significant)" in out
    summary["fitted_head"]["test_significance_vs_zero_shot_head"] = sig(2, 20, 0.0001)
    _print_tune_summary(summary, False, tmp_path)
    assert "2 test examples gained, 20 lost (exact McNemar p = 0.0001: a real loss)" in capsys.readouterr().out
